"""The stage contract, declared once for every stage: what it runs, what its result depends on (settings
and input files: `key`; other stages' outputs: `upstream`), and how to check its outputs beyond their
existence (`verify`). The runner (stage.run_stage) derives the stage key from these, skips complete
work, redoes stale work, and brings missing or stale upstream stages up to date first, so any stage can
be run alone on a fresh clone (with --data-dir or $NT_DATA_DIR).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .config import Config


@dataclass(frozen=True)
class Stage:
    name: str
    key: Callable[[Config], dict]  # settings and input files the outputs depend on
    run: Callable[[Config, bool], tuple[list, dict]]  # (cfg, force) -> (output paths, summary)
    upstream: tuple[str, ...] = ()  # stages whose outputs this one reads
    verify: Callable[[Config], bool] | None = None  # outputs' contents still good (False: redo)


def stages() -> dict[str, Stage]:
    """Every stage by name (imported here, not at module load: the stage functions pull in torch)."""
    from .data import prepare_input, prepare_key
    from .dna_tasks import mirna, mirna_key, promoter, promoter_key, viral, viral_key
    from .ensemble import ensemble, ensemble_key
    from .openvaccine import predict_key, predict_test, train_folds, train_key
    from .pretrain import pretrain_key, run_pretraining
    from .semi_supervised import pseudo_key, pseudo_label, semi_key, semi_supervised
    from .structures import fold_key, fold_structures, structures_complete

    prepared, folded = "00_prepare_input", "01_fold_structures"
    declared = [
        Stage(prepared, prepare_key, prepare_input),
        Stage(folded, fold_key, fold_structures, (prepared,), structures_complete),
        Stage("02_pretrain", pretrain_key, run_pretraining, (prepared, folded)),
        Stage("03_train_folds", train_key, train_folds, (prepared, folded, "02_pretrain")),
        Stage("04_pseudo_label", pseudo_key, pseudo_label, ("03_train_folds",)),
        Stage("05_semi_supervised", semi_key, semi_supervised, ("03_train_folds", "04_pseudo_label")),
        Stage("06_predict", predict_key, predict_test, ("03_train_folds",)),
        Stage("07_ensemble", ensemble_key, ensemble, ("03_train_folds", "05_semi_supervised", "06_predict")),
        Stage("10_promoter", promoter_key, promoter),
        Stage("11_viral", viral_key, viral),
        Stage("12_mirna", mirna_key, mirna),
    ]
    return {stage.name: stage for stage in declared}
