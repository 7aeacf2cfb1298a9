"""Title vocabulary: top-K titles by count, 0 = padding, then ``<SEP>`` and an OOV slot.

Index layout (the reference's, spec §2): ``0`` padding, ``1..K`` titles by descending count (ties
keep first-seen order), ``K+1`` ``<SEP>``, ``K+2`` OOV. The model's output width is ``K+3``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from studyrec.data.atomic import write_text_atomic

SEP = "<SEP>"
OOV = "<OOV>"
UNDEF = "<UNDEF>"
PAD = 0


def _check_layout(index: dict[str, int], oov: int) -> None:
    """Raises ValueError unless the layout is dense: titles ``1..K``, ``<SEP>`` ``K+1``, OOV ``K+2``."""
    K = len(index) - 1
    if index[SEP] != K + 1:
        raise ValueError(f"{SEP} has index {index[SEP]}, but with {K} titles it must be {K + 1}")
    if oov != K + 2:
        raise ValueError(f"oov is {oov}, but with {K} titles it must be {K + 2}")
    titles = [v for k, v in index.items() if k != SEP]
    outside = [v for v in titles if not 1 <= v <= K]
    if outside:
        raise ValueError(f"title index {outside[0]} is outside 1..{K} (titles must be numbered 1..K without gaps)")
    counts = np.bincount(np.asarray(titles, dtype=np.int64), minlength=K + 1)
    shared = np.flatnonzero(counts > 1)
    if shared.size:
        raise ValueError(f"index {shared[0]} is used by {counts[shared[0]]} titles; each index must be used once")


class Vocabulary:
    """Bidirectional map between title strings and integer tokens.

    ``len(vocab)`` is ``K + 2`` (titles, ``<SEP>`` and the OOV slot), as in the reference;
    ``vocab.logits_size`` is ``K + 3`` (plus the padding slot 0).
    """

    def __init__(self, mapping: Mapping[str, int], oov: int):
        if PAD in mapping.values():
            raise ValueError("index 0 is reserved for padding and cannot be in the vocabulary")
        if oov in mapping.values():
            raise ValueError(f"the OOV index {oov} is already used by a token")
        if SEP not in mapping:
            raise ValueError(f"the vocabulary has no {SEP} token")
        self._index = {str(k): int(v) for k, v in mapping.items()}
        self.oov = int(oov)
        _check_layout(self._index, self.oov)  # before allocating max index + 1 slots
        size = max(max(self._index.values()), self.oov) + 1
        self._tokens = np.full(size, UNDEF, dtype=object)
        for token, index in self._index.items():
            self._tokens[index] = token
        self._tokens[self.oov] = OOV
        self._lookup: pd.Index | None = None

    @classmethod
    def build(cls, titles: Iterable[str], max_size: int | None = None) -> Vocabulary:
        """Keeps the ``max_size`` most frequent titles (all when None or 0).

        ``titles`` is every interaction's title in first-seen order: repeats are counts.
        """
        if not isinstance(titles, pd.Series):
            titles = pd.Series(np.asarray(titles if isinstance(titles, np.ndarray) else list(titles), dtype=object))
        codes, uniques = pd.factorize(titles, sort=False)  # uniques in first-seen order
        counts = np.bincount(codes[codes >= 0], minlength=len(uniques))
        order = np.argsort(-counts, kind="stable")
        if max_size:
            order = order[:max_size]
        kept = [str(t) for t in uniques[order]]
        mapping = {title: i + 1 for i, title in enumerate(kept)}
        mapping[SEP] = len(kept) + 1
        return cls(mapping, oov=len(kept) + 2)

    @property
    def sep(self) -> int:
        return self._index[SEP]

    @property
    def num_titles(self) -> int:
        """K, the number of real titles (indices ``1..K``)."""
        return len(self._index) - 1

    @property
    def logits_size(self) -> int:
        """Width of the model's output layer: padding, titles, ``<SEP>`` and OOV."""
        return len(self) + 1

    def __len__(self) -> int:
        return len(self._index) + 1

    def __getitem__(self, token: str) -> int:
        return self.encode(token)

    def __contains__(self, token: str) -> bool:
        return str(token) in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self._index == other._index and self.oov == other.oov

    def encode(self, token: str) -> int:
        return self._index.get(str(token), self.oov)

    def decode(self, index: int) -> str:
        index = int(index)
        return self._tokens[index] if 0 <= index < len(self._tokens) else UNDEF

    def encode_many(self, tokens) -> np.ndarray:
        """Vectorised ``encode``: an int32 array, OOV for unknown (or missing) titles."""
        if self._lookup is None:
            self._lookup = pd.Index(list(self._index.keys()), dtype=object)
            self._lookup_ids = np.fromiter(self._index.values(), dtype=np.int32, count=len(self._index))
        codes, uniques = pd.factorize(tokens if isinstance(tokens, pd.Series) else pd.Series(np.asarray(tokens, dtype=object)))
        positions = self._lookup.get_indexer(pd.Index(np.asarray(uniques, dtype=object).astype(str), dtype=object))
        unique_ids = np.where(positions >= 0, self._lookup_ids[positions], self.oov).astype(np.int32)
        return np.where(codes >= 0, unique_ids[np.maximum(codes, 0)], self.oov).astype(np.int32)

    def decode_many(self, indices) -> np.ndarray:
        """Vectorised ``decode``: an object array of strings, ``<UNDEF>`` for unknown indices."""
        indices = np.asarray(indices)
        inside = (indices >= 0) & (indices < len(self._tokens))
        return np.where(inside, self._tokens[np.where(inside, indices, 0)], UNDEF)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON of the index and OOV slot: equal exactly for equal vocabularies."""
        canonical = json.dumps({"oov": self.oov, "vocab": self._index}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def to_json(self) -> str:
        """The reference's ``vocab.json`` layout: values as strings, ``indent=2``."""
        return json.dumps(
            {"oov": str(self.oov), "vocab": {k: str(v) for k, v in self._index.items()}}, indent=2
        )

    @classmethod
    def from_json(cls, text: str) -> Vocabulary:
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("vocab"), dict) or "oov" not in data:
            raise ValueError('expected an object {"oov": ..., "vocab": {title: index, ...}}')
        return cls({k: _index_value(k, v) for k, v in data["vocab"].items()}, oov=_index_value("oov", data["oov"]))

    def save(self, path: str | os.PathLike) -> None:
        write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocabulary:
        path = Path(path)
        try:
            return cls.from_json(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: vocabulary file not found") from None
        except UnicodeDecodeError:
            raise ValueError(
                f"{path}: not a valid vocab.json (not UTF-8 text); restore the vocab.json that training wrote"
            ) from None
        except (KeyError, ValueError, TypeError) as e:
            text = " ".join(str(e).split())
            raise ValueError(
                f"{path}: not a valid vocab.json ({text[:300]}); restore the vocab.json that training wrote"
            ) from None


def _index_value(key: str, value) -> int:
    """An index written as an integer or a string of digits (the reference writes strings)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"the index of {key!r} is {value!r}, not an integer")
    text = str(value).strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise ValueError(f"the index of {key!r} is {value!r}, not a non-negative integer")
    return int(text)
