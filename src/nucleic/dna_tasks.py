"""Classification stages 10 (promoter), 11 (viral) and 12 (mirna): classifiers evaluated by
cross-validation or held-out splits, with metrics JSONs, OOF probabilities, figures and attention motifs."""
from __future__ import annotations

import collections
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .classify import (
    RunContextStacker,
    SharedKmerNeighbours,
    SharedPeptideNeighbours,
    contig_mean,
    encode_sequences,
    feature_spec,
    fewest_mismatches,
    fit_classifier,
    log_odds,
    model_settings,
    predict_proba,
    save_classifier,
    sequence_features,
)
from .config import Config, Paths
from .dna_data import read_mirna, read_promoter, read_viral
from .engine import setup_device
from .io_utils import read_cache, write_csv, write_json, write_pickle
from .metrics import binary_classification_metrics
from .stage import artifact_meta, claim_work_dir

SUMMARY_METRICS = ("accuracy", "mcc", "sensitivity", "specificity", "f1", "auc", "pr_auc")


def stratified_subset(frame: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    """At most `limit` rows with the class balance kept (smoke runs)."""
    if limit is None or limit >= len(frame):
        return frame.reset_index(drop=True)
    share = limit / len(frame)
    parts = [group.sample(max(1, round(len(group) * share)), random_state=seed) for _, group in frame.groupby("label")]
    return pd.concat(parts).sort_index().reset_index(drop=True)


def run_cv(cfg: Config, task_cfg, frame: pd.DataFrame, work: Path, device, splits=None) -> dict:
    """Stratified K-fold CV of task_cfg.model (or the given (training, held-out) splits); fold results
    cached in `work` (resumable). Each fold keeps task_cfg.validation_fraction of its training rows apart
    and scores the held-out fold with the weights of the epoch with the best AUC on them (the rule every
    classifier follows). A network with task_cfg.seeds = n >= 2 is trained n times per fold from other
    random starts (the same rows), and the fold's probability is their mean."""
    kind = task_cfg.model
    tokens = encode_sequences(list(frame.sequence))
    pairs = structure_input(cfg, kind, frame, tokens.shape[1])
    labels = frame.label.to_numpy()
    folds = np.zeros(len(frame), dtype=np.int64)
    probabilities = np.zeros(len(frame))
    per_fold, histories, motifs = [], [], collections.Counter()
    for fold, (train_idx, val_idx) in enumerate(splits or cv_splits(labels, task_cfg.folds, cfg.seed)):
        cache = work / f"fold{fold}.pkl"
        result = read_cache(cache)
        if result is None and kind in FEATURE_KINDS:  # no epochs to choose: it learns from every training row
            probs, = fit_feature_model_and_score(cfg, task_cfg, kind, frame, train_idx, [val_idx],
                                                 cache.with_suffix(weights_suffix(kind)))
            result = {"probs": probs, "history": [], "motifs": {}}
            write_pickle(cache, result)
        if result is None:
            names = network_members(work, fold, task_cfg)
            members = []
            for member, name in enumerate(names):  # a one-seed fold is cached as the fold, members each alone
                found = read_cache(name.with_suffix(".pkl")) if len(names) > 1 else None
                if found is None:
                    found = fit_network_member(cfg, task_cfg, frame, tokens, pairs, train_idx, val_idx, fold, member,
                                               name, device)
                    if len(names) > 1:
                        write_pickle(name.with_suffix(".pkl"), found)
                members.append(found)
            result = {"probs": np.mean([m["probs"] for m in members], axis=0), "history": members[0]["history"],
                      "motifs": members[0]["motifs"]}  # (the first member's curve and motifs: each row counted once)
            write_pickle(cache, result)
        folds[val_idx], probabilities[val_idx] = fold, result["probs"]
        per_fold.append({"fold": fold, **scores_where_given(labels[val_idx], result["probs"])})
        histories.append(result["history"])
        motifs.update(result["motifs"])
    summary = mean_over_folds(per_fold)
    return {"summary": summary, "per_fold": per_fold, "histories": histories, "motifs": motifs,
            "folds": folds, "probabilities": probabilities}


NETWORK_MEMBER_SEED_STEP = 1000  # member m of fold f trains with seed cfg.seed + f + 1000 m (m = 0: the one-seed run's)


def network_members(work: Path, fold: int, task_cfg) -> list[Path]:
    """The folders of a CV fold's networks (task_cfg.seeds of them): work/fold<f> for one, else
    work/fold<f>_seed<m>; each network's weights lie beside its folder (+ weights suffix)."""
    seeds = int(task_cfg.get("seeds") or 1)
    return [work / f"fold{fold}"] if seeds == 1 else [work / f"fold{fold}_seed{m}" for m in range(seeds)]


def fit_network_member(cfg: Config, task_cfg, frame: pd.DataFrame, tokens: torch.Tensor, pairs, train_idx, val_idx,
                       fold: int, member: int, name: Path, device) -> dict:
    """One network of a CV fold, trained in the folder `name` (resumable) on the fold's training rows less
    its validation share (the same rows for every member), from seed cfg.seed + fold + 1000 member; its
    best validated weights are saved to `name` + the weights suffix. Returns its held-out probabilities,
    history and attention motifs."""
    kind, labels = task_cfg.model, frame.label.to_numpy()
    fit_idx, watch_idx = stratified_split(train_idx, labels, task_cfg.validation_fraction, cfg.seed + fold)
    model, history = fit_classifier(kind, model_settings(task_cfg, kind), task_cfg, tokens[fit_idx],
                                    labels[fit_idx], tokens[watch_idx], labels[watch_idx],
                                    cfg.seed + fold + NETWORK_MEMBER_SEED_STEP * member, device, run_dir=name,
                                    desc=name.name.replace("fold", "fold ").replace("_seed", " seed "),
                                    select_best=True, pairs=_take(pairs, fit_idx), val_pairs=_take(pairs, watch_idx))
    probs = predict_proba(model, tokens[val_idx], device, 256, _take(pairs, val_idx))
    found = (attention_motifs(model, tokens[val_idx], labels[val_idx], probs, frame.sequence.iloc[val_idx], device)
             if kind == "nt" else {})
    save_classifier(name.with_suffix(weights_suffix(kind)), kind, model_settings(task_cfg, kind), tokens.shape[1], model)
    return {"probs": probs, "history": history, "motifs": dict(found)}


def where_given(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The labels and probabilities of the rows with a probability (a homology model abstains: NaN)."""
    given = ~np.isnan(probs)
    return np.asarray(labels)[given], probs[given]


def scorable(labels: np.ndarray, probs: np.ndarray) -> bool:
    """Whether the rows with a probability hold both classes (an AUC exists)."""
    return len(np.unique(where_given(labels, probs)[0])) == 2


def scores_where_given(labels: np.ndarray, probs: np.ndarray) -> dict:
    """The metrics on the rows the model has a probability for (a homology model abstains on the others,
    NaN), and where it abstains on some, the share it scores as "coverage"."""
    given = ~np.isnan(probs)
    if not given.any():
        return {**dict.fromkeys(SUMMARY_METRICS, float("nan")), "coverage": 0.0}
    return binary_classification_metrics(labels[given], probs[given]) | ({} if given.all() else
                                                                         {"coverage": float(given.mean())})


def cv_splits(labels: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The stratified K-fold (training rows, held-out rows) of the CV stages, in fold order."""
    from sklearn.model_selection import StratifiedKFold

    return list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels))


def promoter_frame(cfg: Config) -> pd.DataFrame:
    """The promoter rows stage 10 reads (a stratified subset under promoter.max_rows)."""
    return stratified_subset(read_promoter(task_input(cfg, "promoter") / "v9d3.csv"), cfg.promoter.max_rows, cfg.seed)


def structure_input(cfg: Config, kind: str, frame: pd.DataFrame, length: int) -> torch.Tensor | None:
    """Base-pairing probabilities of every sequence for a classifier that reads them, else None."""
    from .classify import STRUCTURE_KINDS
    from .structures import pairing_probabilities

    return pairing_probabilities(cfg, list(frame.sequence), length) if kind in STRUCTURE_KINDS else None


def _take(pairs: torch.Tensor | None, rows) -> torch.Tensor | None:
    return None if pairs is None else pairs[torch.as_tensor(rows)]


@torch.no_grad()
def attention_motifs(model, tokens: torch.Tensor, labels: np.ndarray, probs: np.ndarray,
                     sequences: pd.Series, device: torch.device, top: int = 3) -> collections.Counter:
    """For correctly predicted positives, count the k-mers among the `top` most attended (column sums of
    the last attention map, over heads and queries), as paper Fig. 9."""
    chosen = np.flatnonzero((labels == 1) & (probs >= 0.5))
    counts = collections.Counter()
    for batch in np.array_split(chosen, max(1, len(chosen) // 64)):
        if not len(batch):
            continue
        attention = model.attention_maps(tokens[batch].to(device))[-1].sum(dim=(1, 2)).cpu()  # (B, L-k+1)
        for row, index in enumerate(batch):
            sequence = sequences.iloc[index]
            for position in attention[row].topk(top).indices.tolist():
                counts[sequence[position:position + model.k]] += 1
    return counts


KNOWN_BOXES = ("TATAAT", "TTGACA")  # sigma-70 consensus: the -10 (Pribnow) and -35 boxes


def closest_box(kmer: str) -> tuple[str, int]:
    """(the known box the k-mer comes closest to holding, its fewest mismatches over the alignments)."""
    mismatches, box = min((fewest_mismatches(kmer.upper(), box), box) for box in KNOWN_BOXES)
    return box, mismatches


def box_frequencies(sequences, labels: np.ndarray) -> pd.DataFrame:
    """Share of promoters and of non-promoters holding each known box exactly / with <= 1 mismatch."""
    upper = [s.upper() for s in sequences]
    rows = []
    for box in KNOWN_BOXES:
        fewest = np.array([fewest_mismatches(s, box) for s in upper])
        for allowed in (0, 1):
            holds = fewest <= allowed
            rows.append({"box": box, "mismatches": allowed, "promoters": float(holds[labels == 1].mean()),
                         "non_promoters": float(holds[labels == 0].mean())})
    return pd.DataFrame(rows)


def task_input(cfg: Config, task: str) -> Path:
    """A classification task's raw folder: <data dir>/<task> when the data folder (--data-dir,
    $NT_DATA_DIR) holds it, else input/<task> (copied there by stage 00), so stages 10-12 run alone."""
    given = Path(cfg.data_dir) / task
    return given if given.is_dir() else Paths(cfg).input / task


def promoter_key(cfg: Config) -> dict:
    path = task_input(cfg, "promoter") / "v9d3.csv"
    digest = hashlib.sha1(path.read_bytes()).hexdigest() if path.exists() else None
    return {"promoter": dict(cfg.promoter), "seed": cfg.seed, "data_sha1": digest}


def promoter_fits_key(cfg: Config) -> dict:
    """What stage 10's fitted folds depend on: its key but SERVING_KEYS (the blend: how the served mean averages them)."""
    return _without_serving(promoter_key(cfg), "promoter")


# which fits are served and how: no fit depends on them
SERVING_KEYS = ("blend", "choose_on", "models", "run_context", "contig_mean")


def _without_serving(key: dict, section: str) -> dict:
    """The key without SERVING_KEYS: each model's fit is cached under its kind, so adding a model to the
    list, or another blend or rule, reuses the others' fits."""
    return {**key, section: {k: v for k, v in key[section].items() if k not in SERVING_KEYS}}


def promoter_network_key(cfg: Config) -> dict:
    """What stage 10's network folds depend on: every promoter setting but the linear and homology models',
    so tuning those (seconds) never retrains the network (minutes)."""
    key = promoter_fits_key(cfg)
    for kind in PROMOTER_BESIDE_NETWORK:
        key["promoter"].pop(kind, None)
    return key


def promoter(cfg: Config, force: bool = False) -> tuple[list[Path], dict]:
    """Stratified K-fold CV of the network promoter.model and, in the same folds, where set, of a
    logistic regression on position-specific features (promoter.linear, sequence_features) and of a
    homology model (promoter.homology: the share of promoters among the training sequences sharing a
    k-mer with the row; no opinion without any). Served (reported, written as the OOF probability, loaded
    by the predict command): per row, the mean probability of the models that give one, fixed
    beforehand, so no choice is made on the scored rows."""
    from .plots import plot_classifier_learning_curves, plot_confusion, plot_motifs, plot_roc_pr

    paths, pc = Paths(cfg), cfg.promoter
    device = setup_device(cfg.train)
    frame = promoter_frame(cfg)
    labels = frame.label.to_numpy()
    results = {}
    for kind in promoter_models(cfg):
        key = promoter_network_key(cfg) if kind == pc.model else promoter_fits_key(cfg)
        work = claim_work_dir(paths.run / "promoter" / kind, key, force)
        results[kind] = run_cv(cfg, with_kind(pc, kind), frame, work, device)
    result, folds = results[pc.model], results[pc.model]["folds"]
    served = served_mean([r["probabilities"] for r in results.values()], task_blend(pc))
    per_fold = per_fold_metrics(labels, folds, served)
    summary = mean_over_folds(per_fold)
    name = " + ".join(results)
    oof = paths.oof / "promoter_oof.csv"
    write_csv(oof, pd.DataFrame({"id": frame.id, "label": frame.label, "probability": served, "fold": folds,
                                 **({f"probability_{k}": r["probabilities"] for k, r in results.items()}
                                    if len(results) > 1 else {})}))
    metrics = paths.oof / "promoter_metrics.json"
    write_json(metrics, {**summary, "per_fold": per_fold, "model": pc.model, "served": list(results),
                         "models": {k: {**r["summary"], "per_fold": r["per_fold"]} for k, r in results.items()},
                         "n_sequences": len(frame), **artifact_meta(cfg)})
    figures = [paths.figures / "promoter_learning_curves.png", paths.figures / "promoter_confusion.png"]
    plot_classifier_learning_curves(figures[0], f"promoter ({pc.model})", result["histories"])
    plot_confusion(figures[1], f"promoter ({name}), {pc.folds}-fold CV", labels, served)
    roc_pr = paths.figures / "promoter_roc_pr.png"
    curves = {kind: where_given(labels, r["probabilities"]) for kind, r in results.items()
              if scorable(labels, r["probabilities"])}  # a homology model: the rows it has an opinion on
    if len(results) > 1:
        curves[f"served: mean of {name}"] = (frame.label, served)
    plot_roc_pr(roc_pr, f"promoter, {pc.folds}-fold CV (OOF)", curves)
    outputs = [oof, metrics, *figures, roc_pr]
    if result["motifs"]:
        motif_csv = paths.oof / "promoter_motifs.csv"
        table = pd.DataFrame(result["motifs"].most_common(), columns=["kmer", "count"])
        closest = [closest_box(kmer) for kmer in table.kmer]
        table["box"], table["mismatches"] = [c[0] for c in closest], [c[1] for c in closest]
        write_csv(motif_csv, table)
        boxes = box_frequencies(frame.sequence, labels)
        write_csv(paths.oof / "promoter_boxes.csv", boxes)
        motif_png = paths.figures / "promoter_motifs.png"
        plot_motifs(motif_png, "k-mers most attended in correctly predicted promoters", table.head(10), boxes)
        outputs += [motif_csv, paths.oof / "promoter_boxes.csv", motif_png]
    return outputs, {k: round(v, 4) for k, v in summary.items() if k in ("accuracy", "mcc")}


PROMOTER_BESIDE_NETWORK = ("linear", "homology")  # stage 10's models beside the network, each where set


BLENDS = ("probability", "logit")
BLEND_CLIP = 1e-3  # logit blend: probabilities clipped to [1e-3, 1 - 1e-3], so one model's log-odds stay within +-6.9


def served_mean(probabilities: list[np.ndarray], blend: str = "probability") -> np.ndarray:
    """Per row, the mean of the models that give a probability (a homology model abstains, NaN); NaN
    where none does. blend "probability": the mean probability; "logit": the sigmoid of the mean log-odds
    (each clipped at BLEND_CLIP), so a model whose probabilities are squeezed near 0 (a forest's vote
    share) weighs as much in the ranking as one that spreads them."""
    import warnings

    if blend not in BLENDS:
        from .config import ConfigError
        raise ConfigError(f"blend: expected one of {', '.join(BLENDS)}; got {blend!r}")
    stacked = np.stack(probabilities).astype(np.float64)
    in_log_odds = blend == "logit" and len(stacked) > 1  # (a model alone is served as it is, unclipped)
    if in_log_odds:
        stacked = log_odds(stacked, BLEND_CLIP)
    with warnings.catch_warnings():  # numpy warns of a row with no probability at all
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(stacked, axis=0)
    return 1 / (1 + np.exp(-mean)) if in_log_odds else mean


def task_blend(section) -> str:
    """A task section's `blend` (how its served models are averaged); probability where it has none (mirna)."""
    return section.get("blend", "probability")


def promoter_models(cfg: Config) -> list[str]:
    """Stage 10's models: the network promoter.model, then "linear" and "homology" where they are set."""
    return [cfg.promoter.model] + [kind for kind in PROMOTER_BESIDE_NETWORK if cfg.promoter.get(kind)]


def _data_key(cfg: Config, section: str, task: str) -> dict:
    path = task_input(cfg, task)
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    digest = hashlib.sha1(b"".join(f.read_bytes() for f in files if f.exists())).hexdigest()
    return {section: dict(cfg[section]), "seed": cfg.seed, "data_sha1": digest}


def fit_and_score(cfg: Config, task_cfg, kind: str, frame: pd.DataFrame, train_idx, val_idx, test_idx,
                  cache: Path, device) -> dict:
    """Train `kind` on train_idx, score test_idx; cached, with the model beside the cache (weights_suffix).
    With val_idx, the epoch with the best validation AUC is kept and the
    validation rows' probabilities are returned too ("val_probs", for choosing a blend); without (None),
    the last epoch (the test set then only draws the curves)."""
    result = read_cache(cache)
    if result is None or (val_idx is not None and "val_probs" not in result):
        labels = frame.label.to_numpy()
        scored = [test_idx] if val_idx is None else [test_idx, val_idx]
        if kind in FEATURE_KINDS:
            probs = fit_feature_model_and_score(cfg, task_cfg, kind, frame, train_idx, scored,
                                                cache.with_suffix(weights_suffix(kind)))
            history = []
        else:
            tokens = encode_sequences(list(frame.sequence))
            pairs = structure_input(cfg, kind, frame, tokens.shape[1])
            watch = test_idx if val_idx is None else val_idx
            model, history = fit_classifier(kind, model_settings(task_cfg, kind), task_cfg, tokens[train_idx],
                                            labels[train_idx], tokens[watch], labels[watch], cfg.seed, device,
                                            run_dir=cache.with_suffix(""), desc=cache.stem,
                                            select_best=val_idx is not None, pairs=_take(pairs, train_idx),
                                            val_pairs=_take(pairs, watch))
            probs = [predict_proba(model, tokens[rows], device, 256, _take(pairs, rows)) for rows in scored]
            save_classifier(cache.with_suffix(weights_suffix(kind)), kind, model_settings(task_cfg, kind), tokens.shape[1], model)
        result = {"probs": probs[0], "history": history} | ({} if val_idx is None else {"val_probs": probs[1]})
        write_pickle(cache, result)
    return {**result, "metrics": scores_where_given(frame.label.to_numpy()[test_idx], result["probs"])}


FEATURE_KINDS = ("rf", "linear", "homology", "peptides")  # no epochs (scikit-learn on sequence_features; neighbours), joblib
HOMOLOGY_KINDS = ("homology", "peptides")  # of those, the neighbour votes (no sequence_features)


def fit_feature_model_and_score(cfg: Config, task_cfg, kind: str, frame: pd.DataFrame, train_idx, scored: list,
                                weights: Path) -> list[np.ndarray]:
    """The feature model `kind` fitted on train_idx and saved to `weights`: its probabilities of each row set in scored."""
    estimator, spec = fit_feature_model(cfg, task_cfg, kind, frame, train_idx), feature_spec(task_cfg[kind])
    save_feature_model(weights, kind, estimator, spec)
    with_groups = getattr(estimator, "groups", None) is not None  # a homology model across experiments
    return [feature_model_proba(estimator, spec, list(frame.sequence.iloc[rows]),
                                frame.group.to_numpy()[rows] if with_groups else None) for rows in scored]


def fit_feature_model(cfg: Config, task_cfg, kind: str, frame: pd.DataFrame, train_idx, features=None):
    """On the train_idx rows: kind "rf", a random forest of task_cfg.rf.trees trees, and kind "linear", a
    logistic regression with L2 strength 1 / task_cfg.linear.C on standardized features, both on
    sequence_features (task_cfg[kind]: ks, ends, globals, positions, boxes; with neighbours = k, also each
    row's SharedKmerNeighbours.features among the other training rows, the index kept as the fitted
    model's neighbours_) and weighing the classes equally; kind "homology", the SharedKmerNeighbours of
    the training rows (task_cfg.homology: k, both_strands, max_base_share, max_holders; with
    other_groups_only, a row of one experiment finds its neighbours in the other experiments only, as a new
    experiment's would); kind "peptides", their SharedPeptideNeighbours (task_cfg.peptides: k,
    max_base_share, max_holders, other_groups_only). features: the train_idx rows' sequence_features, where
    already computed."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    settings, sequences = task_cfg[kind], list(frame.sequence.iloc[train_idx])
    labels = frame.label.to_numpy()[train_idx]
    if kind in HOMOLOGY_KINDS:
        groups = frame.group.to_numpy()[train_idx] if settings.get("other_groups_only") else None
        if kind == "peptides":
            return SharedPeptideNeighbours(sequences, labels, settings.k, settings.get("max_base_share"), groups,
                                           settings.get("max_holders"))
        return SharedKmerNeighbours(sequences, labels, settings.k, settings.get("both_strands", False),
                                    settings.get("max_base_share"), groups, settings.get("max_holders"))
    spec = feature_spec(settings)
    features = sequence_features(sequences, spec) if features is None else features
    neighbours = (SharedKmerNeighbours(sequences, labels, spec["neighbours"], spec["neighbours_both_strands"])
                  if spec["neighbours"] else None)
    if neighbours is not None:
        features = np.concatenate([features, neighbours.features(sequences, self_rows=np.arange(len(sequences)))], 1)
    if kind == "rf":
        estimator = RandomForestClassifier(n_estimators=settings.trees, class_weight="balanced_subsample",
                                           n_jobs=-1, random_state=cfg.seed)
    else:
        estimator = make_pipeline(StandardScaler(), LogisticRegression(C=settings.C, class_weight="balanced",
                                                                       max_iter=2000))
    estimator.fit(features, labels)
    estimator.neighbours_ = neighbours
    return estimator


def feature_model_proba(estimator, spec: dict, sequences: list[str], groups=None, features=None) -> np.ndarray:
    """The fitted model's probabilities (a homology model's: NaN where a sequence has no neighbour; with
    the sequences' groups, neighbours of another group only). features: the sequences' sequence_features,
    where already computed."""
    if isinstance(estimator, SharedKmerNeighbours):
        return estimator.proba(sequences, groups)
    features = sequence_features(sequences, feature_spec(spec)) if features is None else features
    neighbours = getattr(estimator, "neighbours_", None)
    if neighbours is not None:
        features = np.concatenate([features, neighbours.features(sequences)], axis=1)
    return estimator.predict_proba(features)[:, 1]


def save_feature_model(path: Path, kind: str, estimator, spec: dict) -> None:
    """The fitted model and its feature settings (feature_spec), with joblib (the predict command loads it)."""
    import joblib

    from .io_utils import atomic_path

    with atomic_path(path) as tmp:
        joblib.dump({"kind": kind, **feature_spec(spec), "estimator": estimator}, tmp)


def save_run_context(path: Path, stacker: RunContextStacker) -> None:
    """The fitted RunContextStacker, with joblib, as the predict command loads it beside the served models."""
    import joblib

    from .io_utils import atomic_path

    with atomic_path(path) as tmp:
        joblib.dump({"kind": RUN_CONTEXT, "estimator": stacker}, tmp)


def choose_blend(labels: np.ndarray, val_probs: dict[str, np.ndarray],
                 groups: np.ndarray | None = None, blend: str = "probability") -> tuple[tuple[str, ...], float]:
    """Of every model alone and every mean of two or more (per row, of the models with an opinion:
    served_mean with `blend`), the one with the best validation AUC (on a tie, fewer models): (its
    models, that AUC). A candidate must score every row, so a homology model, which abstains where a row
    has no neighbour, is chosen only beside a model that does not. With `groups` (viral: each row's
    sequencing experiment), the AUC is computed within each group holding both classes and averaged,
    so a blend is chosen for ranking contigs inside one run, which is what a new run needs, not for
    telling runs apart."""
    import itertools

    best, best_auc = None, -1.0
    for size in range(1, len(val_probs) + 1):
        for models in itertools.combinations(val_probs, size):
            mean = served_mean([val_probs[m] for m in models], blend)
            if np.isnan(mean).any():
                continue
            auc = grouped_auc(labels, mean, groups)
            if auc > best_auc + 1e-12:
                best, best_auc = models, float(auc)
    return best, best_auc


def choose_served(cfg: Config, vc, frame: pd.DataFrame, train_idx, val_idx, val_probs: dict[str, np.ndarray],
                  cache: Path) -> tuple[tuple[str, ...], float]:
    """Stage 11's served models and the AUC they were chosen by (choose_blend within each experiment, viral.blend).
    viral.choose_on "experiments": on every training row, each feature model's probability from a fit on the
    other experiments' rows (cross_experiment_probs, cached at `cache`), so the blend is chosen for runs
    a model never saw, as a user's run will be; the networks, which would need a fit per experiment, are
    not candidates. "rows": on the validation rows, every model's probability (val_probs) from fits on the
    same experiments, which rates a model that knows the run too well (README: the rule then chose
    networks that lowered the held-out AUC)."""
    from .config import ConfigError

    groups, labels = frame.group.to_numpy(), frame.label.to_numpy()
    if vc.choose_on == "rows":
        return choose_blend(labels[val_idx], val_probs, groups[val_idx], task_blend(vc))
    if vc.choose_on != "experiments":
        raise ConfigError(f"config key 'viral.choose_on': expected experiments or rows; got {vc.choose_on!r}")
    kinds = [kind for kind in val_probs if kind in FEATURE_KINDS]
    if not kinds:
        raise ConfigError("config key 'viral.choose_on': experiments needs a feature model (rf, linear) in "
                          f"viral.models; got {list(val_probs)} (or choose_on: rows)")
    rows = np.sort(np.concatenate([train_idx, val_idx]))
    probs = cross_experiment_probs(cfg, vc, kinds, frame, rows, cache)
    return choose_blend(labels[rows], probs, groups[rows], task_blend(vc))


def cross_experiment_probs(cfg: Config, task_cfg, kinds: list[str], frame: pd.DataFrame, rows: np.ndarray,
                           cache: Path) -> dict[str, np.ndarray]:
    """For each feature model kind, its probability of each of `rows` from a fit on the rows of the other
    experiments among them (one fit per experiment; NaN where a homology model has no neighbour). Cached
    per kind in one pickle (the fitted models are not kept), so a killed run resumes at the next kind. A
    forest's or linear model's features are computed once for all rows, not once per fit."""
    done = read_cache(cache) or {}
    groups, sequences = frame.group.to_numpy()[rows], list(frame.sequence.iloc[rows])
    for kind in kinds:
        if kind in done:
            continue
        spec, probs = feature_spec(task_cfg[kind]), np.full(len(rows), np.nan)
        table = None if kind in HOMOLOGY_KINDS else sequence_features(sequences, spec)
        for group in tqdm(np.unique(groups), desc=f"{kind}: each training experiment from the others", leave=False):
            mine, other = groups == group, groups != group
            estimator = fit_feature_model(cfg, task_cfg, kind, frame, rows[other], None if table is None else table[other])
            probs[mine] = feature_model_proba(estimator, spec, [s for s, m in zip(sequences, mine) if m],
                                              features=None if table is None else table[mine])
        done[kind] = probs
        write_pickle(cache, done)
    return {kind: done[kind] for kind in kinds}


RUN_CONTEXT = "run_context"  # the kind of stage 11's saved RunContextStacker


def served_steps(vc, stacker: RunContextStacker | None, frame: pd.DataFrame, rows: np.ndarray,
                 probs: np.ndarray) -> dict[str, np.ndarray]:
    """The served rule after the blend, applied to the blend's probabilities of `rows`, step by step (stage 11
    and the leave-one-experiment-out benchmark alike): "blend" where the run context follows (each experiment
    scored as one run), "served_by_segment" where viral.contig_mean follows (the segments of one contig
    scored together), and last "served"."""
    steps = {}
    if stacker is not None:
        steps["blend"] = probs
        probs = stacker.proba(probs, list(frame.sequence.iloc[rows]), frame.group.to_numpy()[rows])
    if vc.get("contig_mean"):
        steps["served_by_segment"] = probs
        probs = contig_mean(probs, frame.contig.to_numpy()[rows])
    steps["served"] = probs
    return steps


def fit_run_context(cfg: Config, vc, frame: pd.DataFrame, train_idx, val_idx, served: tuple[str, ...],
                    cache: Path, held_out: tuple[np.ndarray, np.ndarray] | None = None) -> RunContextStacker | None:
    """With viral.run_context set: a RunContextStacker over the served blend, fitted on the training rows
    as fits on the other experiments score them (cross_experiment_probs, the cache choose_served filled),
    each experiment its own run. held_out: (rows, the blend's probabilities) of an experiment outside the
    training rows, as the fits on them score it (protocol (a)'s test experiment), fitted on as one more
    run: the stacker that is served, fitted on every experiment. None where viral.run_context is not set."""
    from .config import ConfigError

    settings = vc.get("run_context")
    if not settings:
        return None
    if vc.choose_on != "experiments" or not set(served) <= set(FEATURE_KINDS):
        raise ConfigError("config key 'viral.run_context': needs choose_on: experiments (a blend of feature models, "
                          f"scored on runs they never saw); got choose_on {vc.choose_on!r}, served {list(served)} "
                          "(or set viral.run_context=null)")
    rows = np.sort(np.concatenate([train_idx, val_idx]))
    probs = cross_experiment_probs(cfg, vc, list(served), frame, rows, cache)
    blend = served_mean([probs[kind] for kind in served], task_blend(vc))
    if held_out is not None:
        rows, blend = np.concatenate([rows, held_out[0]]), np.concatenate([blend, held_out[1]])
    stacker = RunContextStacker(**settings)  # (the config's keys: k, max_base_share, max_holders, min_run, each_run_equal)
    return stacker.fit(blend, list(frame.sequence.iloc[rows]), frame.group.to_numpy()[rows], frame.label.to_numpy()[rows])


def grouped_auc(labels: np.ndarray, probs: np.ndarray, groups: np.ndarray | None = None) -> float:
    """AUC-ROC of all rows, or with `groups` the mean of the AUCs within each group that holds both classes."""
    from sklearn.metrics import roc_auc_score

    if groups is None:
        return float(roc_auc_score(labels, probs))
    both = [g for g in np.unique(groups) if 0 < labels[groups == g].sum() < (groups == g).sum()]
    if not both:
        raise ValueError("no group holds both classes: cannot score a blend within groups")
    return float(np.mean([roc_auc_score(labels[groups == g], probs[groups == g]) for g in both]))


def stratified_split(indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    return tuple(train_test_split(indices, test_size=fraction, stratify=labels[indices], random_state=seed))


def _imbalance_note(vc) -> str:
    ratio = vc.negatives_per_positive
    sampling = (f"each epoch: every positive + {ratio}x as many negatives drawn afresh; " if ratio
                else "each epoch: every row; ")
    return sampling + "BCE pos_weight = negatives/positives of the epoch; RF class_weight=balanced_subsample"


def viral_key(cfg: Config) -> dict:
    return _data_key(cfg, "viral", "viral")


def viral_fits_key(cfg: Config) -> dict:
    """What stage 11's fitted models depend on: its key but the served models, blend and rule, so changing
    those reruns the stage from its cached fits."""
    return _without_serving(viral_key(cfg), "viral")


def viral(cfg: Config, force: bool = False) -> tuple[list[Path], dict]:
    """(a) one whole experiment held out, train/validate on the others; (b) a stratified random split
    (viral.protocols). The served model: of every model and every mean of two or more (viral.blend), the one with the
    best AUC within each training experiment, averaged (choose_served: on each experiment's contigs as models
    fitted on the other experiments score them, or on protocol (a)'s validation rows), retrained on
    every experiment (10 % kept apart for the best epoch) and written to
    work/<preset>/viral/serve_<kind>.{pt,joblib} for the predict command. With viral.run_context, the held-out
    experiment is scored by a stacker fitted on the training experiments; the one served
    (serve_run_context.joblib) is refitted with the held-out experiment as one more run. With
    viral.contig_mean, the segments of one contig are then scored together (contig_mean; "served_by_segment":
    each alone).
    Class imbalance (~2 % viral): optionally undersampled negatives per epoch (viral.negatives_per_positive),
    positives weighted by negatives/positives in the BCE loss, balanced class weights in the random
    forest, and PR-AUC reported beside AUC-ROC."""
    from .plots import plot_classifier_learning_curves, plot_confusion, plot_roc_pr

    paths, vc = Paths(cfg), cfg.viral
    device = setup_device(cfg.train)
    frame = stratified_subset(read_viral(task_input(cfg, "viral")), vc.max_rows, cfg.seed)
    labels = frame.label.to_numpy()
    everything = np.arange(len(frame))
    held_out = everything[frame.group.to_numpy() == vc.holdout_experiment]
    if not len(held_out):
        from .stage import InputError
        raise InputError(task_input(cfg, "viral"), f"no sequences of experiment '{vc.holdout_experiment}' "
                         f"(viral.holdout_experiment; found {', '.join(sorted(frame.group.unique()))})")
    unknown = set(vc.protocols) - {"experiment", "random_split"}
    if unknown or "experiment" not in vc.protocols:
        from .config import ConfigError
        raise ConfigError(f"config key 'viral.protocols': expected experiment, optionally with random_split; "
                          f"got {list(vc.protocols)}")
    protocols = {"experiment": (*stratified_split(np.setdiff1d(everything, held_out), labels,
                                                  vc.validation_fraction, cfg.seed), held_out)}
    if "random_split" in vc.protocols:
        train_val, random_test = stratified_split(everything, labels, vc.test_fraction, cfg.seed)
        protocols["random_split"] = (*stratified_split(train_val, labels, vc.validation_fraction, cfg.seed),
                                     random_test)
    work = claim_work_dir(paths.run / "viral", viral_fits_key(cfg), force)
    results = {(p, kind): fit_and_score(cfg, vc, kind, frame, *idx, work / f"{p}_{kind}.pkl", device)
               for p, idx in protocols.items() for kind in vc.models}
    blend = task_blend(vc)
    cross_experiment = work / "experiment_cross_experiment.pkl"  # choose_served fills it, fit_run_context reads it
    served, served_val_auc = choose_served(cfg, vc, frame, *protocols["experiment"][:2],
                                           {k: results[("experiment", k)]["val_probs"] for k in vc.models},
                                           cross_experiment)
    stacker = fit_run_context(cfg, vc, frame, *protocols["experiment"][:2], served, cross_experiment)
    for p, (_, _, test_idx) in protocols.items():
        steps = served_steps(vc, stacker, frame, test_idx,
                             served_mean([results[(p, k)]["probs"] for k in served], blend))
        for kind, probs in steps.items():
            results[(p, kind)] = {"probs": probs, "history": [],
                                  "metrics": binary_classification_metrics(labels[test_idx], probs)}
    serving_stacker = None if stacker is None else fit_run_context(  # refitted with the held-out experiment too
        cfg, vc, frame, *protocols["experiment"][:2], served, cross_experiment,
        (held_out, results[("experiment", "blend")]["probs"]))
    if serving_stacker is not None:
        save_run_context(work / "serve_run_context.joblib", serving_stacker)
    serve_train, serve_val = stratified_split(everything, labels, vc.validation_fraction, cfg.seed)
    for kind in tqdm(served, desc="served model, every experiment", leave=False):
        fit_and_score(cfg, vc, kind, frame, serve_train, serve_val, serve_val, work / f"serve_{kind}.pkl", device)
    report = {f"{p}/{kind}": {m: r["metrics"][m] for m in ("auc", "pr_auc", "accuracy", "mcc", "coverage")
                              if m in r["metrics"]} |
              {"n_test": len(protocols[p][2]), "n_test_viral": int(labels[protocols[p][2]].sum())}
              for (p, kind), r in results.items()}
    headline = report["experiment/served"]
    metrics = paths.oof / "viral_metrics.json"
    write_json(metrics, {"auc": headline["auc"], "pr_auc": headline["pr_auc"],
                         "holdout_experiment": vc.holdout_experiment,
                         "served": {"models": list(served), "blend": blend, "chosen_on": vc.choose_on,
                                    "validation_auc": served_val_auc, "contig_mean": bool(vc.get("contig_mean")),
                                    "weights": [str(served_weights(work, k)) for k in served],
                                    "run_context": None if stacker is None else
                                    {**stacker.settings(), "coefficients": serving_stacker.coefficients(),
                                     "fitted_on": "every experiment",
                                     "coefficients_scoring_held_out": stacker.coefficients(),
                                     "weights": str(work / "serve_run_context.joblib")}},
                         "results": report, "imbalance": _imbalance_note(vc), **artifact_meta(cfg)})
    figures = [paths.figures / "viral_roc_pr.png", paths.figures / "viral_learning_curves.png",
               paths.figures / "viral_confusion.png"]
    plot_roc_pr(figures[0], "viral contigs: every model and protocol (a homology model: the contigs it scores)",
                {f"{p}/{k}": where_given(labels[protocols[p][2]], r["probs"]) for (p, k), r in results.items()
                 if scorable(labels[protocols[p][2]], r["probs"])})
    curves = {f"{p}/{k}": r["history"] for (p, k), r in results.items() if r["history"]}
    plot_classifier_learning_curves(figures[1], "viral: training loss and validation AUC", list(curves.values()),
                                    list(curves))
    plot_confusion(figures[2], f"held-out experiment (served: {' + '.join(served)})", labels[held_out],
                   results[("experiment", "served")]["probs"])
    return [metrics, *figures], {k: round(v["auc"], 4) for k, v in report.items()}


def weights_suffix(kind: str) -> str:
    """The file suffix of a trained model of `kind`: joblib for the feature models, torch for the networks."""
    return ".joblib" if kind in FEATURE_KINDS else ".pt"


def is_feature_model(weights: Path) -> bool:
    return Path(weights).suffix == ".joblib"


def served_weights(work: Path, kind: str) -> Path:
    """Where stage 11 writes the served model `kind`, trained on every experiment."""
    return (work / f"serve_{kind}").with_suffix(weights_suffix(kind))


def mirna_key(cfg: Config) -> dict:
    return _data_key(cfg, "mirna", "mirna")


def mirna(cfg: Config, force: bool = False) -> tuple[list[Path], dict]:
    """Mirtron vs canonical pre-miRNA: the paper's stratified 70/30 split (fixed seed) and stratified
    K-fold CV, for every model in mirna.models. The served model (reported and used by the predict
    command): of every model and every mean of two or more, the one with the best AUC on the CV
    predictions of the 70 % training rows, so the 30 % test labels are read only to score it."""
    from .plots import plot_classifier_learning_curves, plot_confusion, plot_roc_pr

    paths, mc = Paths(cfg), cfg.mirna
    device = setup_device(cfg.train)
    frame = stratified_subset(read_mirna(task_input(cfg, "mirna")), mc.max_rows, cfg.seed)
    labels = frame.label.to_numpy()
    train_idx, test_idx = stratified_split(np.arange(len(frame)), labels, 0.3, cfg.seed)
    work = claim_work_dir(paths.run / "mirna", mirna_key(cfg), force)
    rows, figures, roc_curves, test_probs, cv_probs = {}, [], {}, {}, {}
    for kind in mc.models:
        # The paper protocol has no validation set: train for mirna.epochs, score once on the 30 %.
        split = fit_and_score(cfg, with_kind(mc, kind), kind, frame, train_idx, None, test_idx,
                              work / f"paper_{kind}.pkl", device)
        cv = run_cv(cfg, with_kind(mc, kind), frame, work / f"cv_{kind}", device)
        rows[kind] = {"paper_protocol": _five(split["metrics"]), "cv": _five(cv["summary"])}
        roc_curves[f"{kind}, 30 % test"] = (labels[test_idx], split["probs"])
        roc_curves[f"{kind}, {mc.folds}-fold CV"] = (labels, cv["probabilities"])
        test_probs[kind], cv_probs[kind], folds = split["probs"], cv["probabilities"], cv["folds"]
        confusion = paths.figures / f"mirna_confusion_{kind}.png"
        plot_confusion(confusion, f"mirtron vs canonical ({kind}), 30 % test", labels[test_idx], split["probs"])
        figures.append(confusion)
        if kind != "rf":  # a forest has no epochs
            figures.append(paths.figures / f"mirna_learning_curves_{kind}.png")
            plot_classifier_learning_curves(figures[-1], f"mirna {kind}: {mc.folds}-fold CV (validation AUC)",
                                            cv["histories"])
    blend = task_blend(mc)
    served, served_auc = choose_blend(labels[train_idx], {k: p[train_idx] for k, p in cv_probs.items()}, blend=blend)
    served_test = served_mean([test_probs[k] for k in served], blend)
    served_cv = served_mean([cv_probs[k] for k in served], blend)
    served_row = {"paper_protocol": _five(binary_classification_metrics(labels[test_idx], served_test)),
                  "cv": _five(per_fold_mean(labels, folds, served_cv))}
    roc_curves[f"served ({' + '.join(served)}), 30 % test"] = (labels[test_idx], served_test)
    figures.append(paths.figures / "mirna_roc_pr.png")
    plot_roc_pr(figures[-1], "mirtron vs canonical: every model and protocol", roc_curves)
    metrics = paths.oof / "mirna_metrics.json"
    write_json(metrics, {"mcc": served_row["paper_protocol"]["mcc"],
                         "accuracy": served_row["paper_protocol"]["accuracy"],
                         "served": {"models": list(served), "cv_auc_training_rows": served_auc, **served_row,
                                    "weights": [str(work / f"paper_{k}{weights_suffix(k)}") for k in served]},
                         "models": rows, "n_sequences": len(frame), **artifact_meta(cfg)})
    summary = {k: round(v["paper_protocol"]["mcc"], 4) for k, v in rows.items()}
    return [metrics, *figures], summary | {"served": round(served_row["paper_protocol"]["mcc"], 4)}


def per_fold_mean(labels: np.ndarray, folds: np.ndarray, probs: np.ndarray) -> dict:
    """Each metric computed on every CV fold's held-out rows, then averaged (as run_cv's summary)."""
    return mean_over_folds(per_fold_metrics(labels, folds, probs))


def per_fold_metrics(labels: np.ndarray, folds: np.ndarray, probs: np.ndarray) -> list[dict]:
    """{"fold", every metric} of each CV fold's held-out rows, in fold order."""
    return [{"fold": int(f), **binary_classification_metrics(labels[folds == f], probs[folds == f])}
            for f in np.unique(folds)]


def mean_over_folds(per_fold: list[dict]) -> dict:
    metrics = SUMMARY_METRICS + (("coverage",) if any("coverage" in f for f in per_fold) else ())
    return {m: float(np.mean([f.get(m, 1.0) for f in per_fold])) for m in metrics}


def with_kind(task_cfg, kind: str) -> Config:
    return Config({**task_cfg, "model": kind})


def _five(metrics: dict) -> dict:
    return {m: metrics[m] for m in ("sensitivity", "specificity", "f1", "mcc", "accuracy")}
