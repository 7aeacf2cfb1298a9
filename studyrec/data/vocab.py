"""Title vocabulary: top-K titles by count, 0 = padding, then ``<SEP>`` and an OOV slot.

Index layout (the reference's, spec §2): ``0`` padding, ``1..K`` titles by descending count (ties
keep first-seen order), ``K+1`` ``<SEP>``, ``K+2`` OOV. The model's output width is ``K+3``.
"""

from __future__ import annotations

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

    def to_json(self) -> str:
        """The reference's ``vocab.json`` layout: values as strings, ``indent=2``."""
        return json.dumps(
            {"oov": str(self.oov), "vocab": {k: str(v) for k, v in self._index.items()}}, indent=2
        )

    @classmethod
    def from_json(cls, text: str) -> Vocabulary:
        data = json.loads(text)
        return cls({k: int(v) for k, v in data["vocab"].items()}, oov=int(data["oov"]))

    def save(self, path: str | os.PathLike) -> None:
        write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocabulary:
        path = Path(path)
        try:
            return cls.from_json(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: vocabulary file not found") from None
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: not a valid vocab.json ({e})") from None
