"""Model inputs derived from sequences and structures."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

# Vocabularies; token 0 of each is NULL (masked or unknown), letters start at 1.
SEQUENCE_TOKENS = "ACGU"
STRUCTURE_TOKENS = "()."
LOOP_TOKENS = "SHBIMXE"
NULL_TOKEN = 0


def check_letters(text: str, alphabet: str, as_given: str | None = None) -> None:
    """The one sequence validator (ingest, classification readers, predict command, tokenize): raises
    ValueError naming the first letter of `text` outside `alphabet` and its position, quoted from
    `as_given` (the user's text before normalizing) when given."""
    bad = next((i for i, ch in enumerate(text) if ch not in alphabet), None)
    if bad is not None:
        raise ValueError(f"character {(as_given or text)[bad]!r} at position {bad} is not one of '{alphabet}'")


def clean_sequence(raw: str, alphabet: str) -> str:
    """A user's sequence as the models read it: stripped, upper case, U and T written as the alphabet
    has them; ValueError when empty or when a letter is foreign (position counted after stripping)."""
    sequence = raw.strip().upper()
    sequence = sequence.replace("U", "T") if "T" in alphabet else sequence.replace("T", "U")
    if not sequence:
        raise ValueError("empty sequence")
    check_letters(sequence, alphabet, as_given=raw.strip())
    return sequence


def tokenize(text: str, alphabet: str) -> np.ndarray:
    """Letters to token ids 1..len(alphabet); raises ValueError naming the first foreign letter."""
    table = np.zeros(256, dtype=np.int64)
    table[np.frombuffer(alphabet.encode(), dtype=np.uint8)] = np.arange(1, len(alphabet) + 1)
    codes = np.frombuffer(text.encode(), dtype=np.uint8)
    tokens = table[codes]
    if (tokens == 0).any():
        check_letters(text, alphabet)
    return tokens


@lru_cache(maxsize=16)
def covalent_distance_features(length: int) -> np.ndarray:
    """(3, L, L) float32: 1/d, 1/d^2, 1/d^3 with d = |i - j| covalent bonds along the backbone (paper 2.2.4).

    d is clipped to 1 on the diagonal, so a nucleotide counts as close to itself as to its
    neighbours and every feature stays in [0, 1].
    """
    idx = np.arange(length)
    inverse = 1.0 / np.maximum(np.abs(idx[:, None] - idx[None, :]), 1).astype(np.float32)
    features = np.stack([inverse, inverse ** 2, inverse ** 3])
    features.setflags(write=False)  # shared through the cache
    return features


def pair_features(bpp: np.ndarray) -> np.ndarray:
    """(..., 4, L, L) float32: base-pairing probabilities (..., L, L) stacked on the distance features
    (M in eq. 10); a batch of matrices gives a batch of feature stacks."""
    bpp = np.asarray(bpp, dtype=np.float32)
    distance = covalent_distance_features(bpp.shape[-1])
    distance = np.broadcast_to(distance, (*bpp.shape[:-2], *distance.shape))
    return np.concatenate([bpp[..., None, :, :], distance], axis=-3)
