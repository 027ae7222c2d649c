"""Folding sources: each turns sequences into base-pairing probability matrices and structures.

Native sources need only pip packages (ViennaRNA, gpu-contrafold). The arnie sources call the
original packages (EternaFold, NUPACK, ...) through arnie, for users who have them installed.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata

import numpy as np

BODY_TEMPERATURE = 37.0
KELVIN = 273.15


class FoldingError(RuntimeError):
    pass


@dataclass
class Prediction:
    bpp: np.ndarray  # (L, L) float32, symmetric, row sums <= 1
    structure: str  # dot-bracket (MFE or MEA, per source)


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


_FREE_ENERGIES: dict[tuple, float] = {}  # ((parameter set, salt, temperature), sequence) -> kcal/mol


class ViennaSource:
    """ViennaRNA partition function with one of its bundled energy parameter sets; MFE structure."""

    has_temperature = True
    decoding = "mfe"

    def __init__(self, parameter_set: str, salt_molar: float | None = None):
        self.parameter_set = parameter_set
        self.salt_molar = salt_molar

    def version(self) -> str:
        return f"viennarna {_package_version('viennarna')} {self.parameter_set} salt={self.salt_molar}"

    def model_details(self, temperature: float):
        """ViennaRNA's model settings with this source's energy set loaded (a process-wide setting)."""
        import RNA

        getattr(RNA, f"params_load_RNA_{self.parameter_set}")()
        model = RNA.md()
        model.temperature = temperature
        if self.salt_molar is not None:
            model.salt = self.salt_molar
        _forget_cached_energies(RNA, model)
        return model

    def free_energies(self, sequences: list[str], temperature: float = BODY_TEMPERATURE) -> np.ndarray:
        """The minimum free energy (kcal/mol) of each sequence; T read as U. Each sequence is folded once
        per process (CV refits a forest on the same hairpins fold after fold)."""
        import RNA

        settings = (self.parameter_set, self.salt_molar, temperature)
        rna = [s.upper().replace("T", "U") for s in sequences]
        missing = sorted({s for s in rna if (settings, s) not in _FREE_ENERGIES})
        if missing:
            model = self.model_details(temperature)
            for sequence in missing:
                _FREE_ENERGIES[settings, sequence] = RNA.fold_compound(sequence, model).mfe()[1]
        return np.array([_FREE_ENERGIES[settings, s] for s in rna], dtype=np.float32)

    def fold(self, sequences: list[str], temperature: float) -> list[Prediction]:
        import RNA

        model = self.model_details(temperature)
        predictions = []
        for sequence in sequences:
            compound = RNA.fold_compound(sequence, model)
            structure, mfe = compound.mfe()
            compound.exp_params_rescale(mfe)  # avoids overflow in the partition function
            compound.pf()
            upper = np.array(compound.bpp(), dtype=np.float32)[1:, 1:]
            predictions.append(Prediction(upper + upper.T, structure))
        return predictions


def _forget_cached_energies(RNA, model) -> None:
    """Make the next fold compound use the energy set loaded last.

    ViennaRNA caches the scaled energies of the last model settings it saw and reuses them while
    the settings stay the same, even after another parameter set was loaded. Building one tiny
    compound under different settings throws that cache away (guarded by a test).
    """
    other = RNA.md()
    other.temperature = model.temperature + 1.0
    RNA.fold_compound("GGGAAACCC", other, RNA.OPTION_MFE | RNA.OPTION_PF)


class ContrafoldSource:
    """CONTRAfold 2 (complementary model, bundled parameters) via gpu-contrafold's exact CPU port.

    CONTRAfold has no temperature. Reading its log-potentials as -dG/RT at 37 C, another
    temperature scales them by (37 C)/(T) in kelvin, a flatter ensemble at 50 C.
    """

    has_temperature = False
    decoding = "mea"

    def __init__(self, gamma: float = 6.0):
        self.gamma = gamma
        self._params: dict[float, dict] = {}

    def version(self) -> str:
        return f"gpu-contrafold {_package_version('gpu-contrafold')} gamma={self.gamma}"

    def parameters(self, temperature: float) -> dict:
        if temperature not in self._params:
            from gpu_contrafold import cpu

            base = cpu.load()
            scale = (BODY_TEMPERATURE + KELVIN) / (temperature + KELVIN)
            self._params[temperature] = {k: v * scale for k, v in base.items()}
        return self._params[temperature]

    def fold(self, sequences: list[str], temperature: float) -> list[Prediction]:
        from gpu_contrafold import cpu

        params = self.parameters(temperature)
        predictions = []
        for sequence in sequences:
            # One posterior pass serves both the BPP matrix and MEA decoding.
            encoded, length, forced, posterior = cpu._posterior(sequence, params)
            pair = cpu.mea_decode(posterior, length, forced, cpu._CANON, encoded, np.float32(self.gamma))
            upper = np.triu(posterior[1:length + 1, 1:length + 1].astype(np.float32), 1)
            predictions.append(Prediction(upper + upper.T, _pairs_to_dot_bracket(pair, length)))
        return predictions


class ArnieSource:
    """Any package arnie wraps (eternafold, nupack, rnastructure, rnasoft, contrafold_2, vienna_2).

    arnie runs the external binaries listed in the file $ARNIEFILE points to. Structure: MEA
    decoding of the BPP matrix with arnie's own MEA.
    """

    has_temperature = True
    decoding = "mea"

    def __init__(self, package: str, gamma: float = 6.0):
        self.package = package
        self.gamma = gamma

    def version(self) -> str:
        return f"arnie {_package_version('arnie')} {self.package}"

    def fold(self, sequences: list[str], temperature: float) -> list[Prediction]:
        try:
            from arnie.bpps import bpps
            from arnie.mea.mea import MEA
        except OSError as err:  # arnie raises at import when no package is configured
            raise FoldingError(f"arnie source '{self.package}': {err} See README, 'arnie backend'.") from None
        predictions = []
        for sequence in sequences:
            try:
                matrix = np.asarray(bpps(sequence, package=self.package, T=temperature), dtype=np.float32)
            except Exception as err:  # arnie surfaces a missing binary as many exception types
                raise FoldingError(f"arnie source '{self.package}' failed on a {len(sequence)}-nt "
                                   f"sequence: {err}") from None
            matrix = np.triu(matrix, 1) + np.triu(matrix, 1).T
            predictions.append(Prediction(matrix, MEA(matrix.astype(np.float64), gamma=self.gamma).structure))
        return predictions


def _pairs_to_dot_bracket(pair: np.ndarray, length: int) -> str:
    """1-based partner array (0 = unpaired) to dot-bracket."""
    chars = ["."] * length
    for i in range(1, length + 1):
        if pair[i] > i:
            chars[i - 1], chars[pair[i] - 1] = "(", ")"
    return "".join(chars)


NATIVE_SOURCES = ("vienna_turner2004", "vienna_turner1999", "vienna_andronescu2007", "vienna_langdon2018",
                  "vienna_turner2004_lowsalt", "contrafold")


def make_source(name: str, fold_cfg) -> ViennaSource | ContrafoldSource | ArnieSource:
    vienna_sets = {"vienna_turner2004": "Turner2004", "vienna_turner1999": "Turner1999",
                   "vienna_andronescu2007": "Andronescu2007", "vienna_langdon2018": "Langdon2018"}
    if name in vienna_sets:
        return ViennaSource(vienna_sets[name])
    if name == "vienna_turner2004_lowsalt":
        return ViennaSource("Turner2004", salt_molar=float(fold_cfg["lowsalt_molar"]))
    if name == "contrafold":
        return ContrafoldSource(gamma=float(fold_cfg["mea_gamma"]))
    if name.startswith("arnie_"):
        return ArnieSource(name.removeprefix("arnie_"), gamma=float(fold_cfg["mea_gamma"]))
    raise FoldingError(f"unknown folding source '{name}' (native: {', '.join(NATIVE_SOURCES)}; "
                       "or arnie_<package>)")


def active_sources(fold_cfg) -> list[str]:
    if fold_cfg["backend"] == "native":
        return list(fold_cfg["native_sources"])
    if fold_cfg["backend"] == "arnie":
        return [f"arnie_{p}" for p in fold_cfg["arnie_sources"]]
    raise FoldingError(f"fold.backend must be 'native' or 'arnie', got '{fold_cfg['backend']}'")
