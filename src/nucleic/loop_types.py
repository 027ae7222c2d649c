"""bpRNA-style loop-type annotation of a dot-bracket structure.

Letters: S stem (paired), H hairpin, B bulge, I internal loop, M multiloop,
X external loop between top-level helices, E dangling end (5' or 3').
"""
from __future__ import annotations

import numpy as np

_OPEN_TO_CLOSE = {"(": ")", "[": "]", "{": "}", "<": ">"}
_CLOSE_TO_OPEN = {v: k for k, v in _OPEN_TO_CLOSE.items()}


def pair_table(structure: str) -> np.ndarray:
    """partner[i] = j if i pairs with j, else -1. Raises ValueError if unbalanced."""
    partner = np.full(len(structure), -1, dtype=np.int64)
    stacks: dict[str, list[int]] = {b: [] for b in _OPEN_TO_CLOSE}
    for i, ch in enumerate(structure):
        if ch in _OPEN_TO_CLOSE:
            stacks[ch].append(i)
        elif ch in _CLOSE_TO_OPEN:
            stack = stacks[_CLOSE_TO_OPEN[ch]]
            if not stack:
                raise ValueError(f"unbalanced dot-bracket: unmatched '{ch}' at position {i}")
            j = stack.pop()
            partner[i], partner[j] = j, i
        elif ch != ".":
            raise ValueError(f"invalid dot-bracket character {ch!r} at position {i}")
    for bracket, stack in stacks.items():
        if stack:
            raise ValueError(f"unbalanced dot-bracket: unmatched '{bracket}' at position {stack[-1]}")
    return partner


def loop_types(structure: str, exterior_between_helices: str = "X") -> str:
    """Annotate every position of `structure` with its loop type.

    Pseudoknotted brackets ([]{}<>) count as paired (S) but do not close loops,
    as in bpRNA, where the nested page-one helices define the loops.
    """
    partner = pair_table(structure)
    nested = np.array([ch in "()" for ch in structure])
    n = len(structure)
    enclosing = np.full(n, -1, dtype=np.int64)  # innermost nested pair opener around i
    branches = np.zeros(n, dtype=np.int64)  # helices directly inside pair opened at p
    top_level_helices = 0
    stack: list[int] = []
    for i in range(n):
        if nested[i] and partner[i] > i:
            if stack:
                branches[stack[-1]] += 1
            else:
                top_level_helices += 1
            enclosing[i] = stack[-1] if stack else -1
            stack.append(i)
        elif nested[i]:
            stack.pop()
        else:
            enclosing[i] = stack[-1] if stack else -1

    paired_positions = np.flatnonzero(partner >= 0)
    first, last = (paired_positions[0], paired_positions[-1]) if len(paired_positions) else (n, -1)
    labels = []
    for i in range(n):
        if partner[i] >= 0:
            labels.append("S")
            continue
        p = enclosing[i]
        if p < 0:
            labels.append("E" if i < first or i > last else exterior_between_helices)
        elif branches[p] == 0:
            labels.append("H")
        elif branches[p] >= 2:
            labels.append("M")
        else:
            labels.append(_bulge_or_internal(p, partner))
    return "".join(labels)


def _bulge_or_internal(p: int, partner: np.ndarray) -> str:
    q = partner[p]
    r = p + 1
    while partner[r] < 0:
        r += 1
    s = partner[r]
    return "B" if (r - p - 1 == 0) or (q - s - 1 == 0) else "I"
