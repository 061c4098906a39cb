"""Hashed n-gram ids: how the small torch text students (``fasttext``, ``textcnn``) turn a
document into numbers, exactly specified so that any other tool can replay it.

The featuriser is part of the student: its settings are the student's hyperparameters
(``buckets``, ``max_tokens``, ``ngrams``), they are saved with the run, and ``kdcache export``
writes them beside the ONNX model as ``featuriser.json`` (:meth:`HashedNgrams.spec`). A
document (a Python ``str``) becomes ids in six steps:

1. **Lowercase**: the Unicode default lower-case mapping (Python's ``str.lower()``).
2. **Tokens**: the maximal runs of word characters, Python's ``re.findall(r"\\w+", text)``
   on a ``str`` (a word character is one for which ``str.isalnum()`` is true, or ``_``).
3. **Truncate**: keep the first ``max_tokens`` tokens.
4. **N-grams**: the tokens themselves (order 1), then for each order n = 2 .. ``ngrams`` the
   n-grams of consecutive kept tokens, in order of position, written as the tokens joined by
   one space (tokens hold no space, so no two n-grams write the same). Row order: every
   unigram, then every bigram, and so on.
5. **Hash**: each n-gram's id is ``1 + crc32(utf8(ngram)) mod buckets``, crc32 being zlib's
   (IEEE 802.3, the one in zip and PNG; ``zlib.crc32`` returns it unsigned). Ids lie in
   1 .. ``buckets``; id 0 is padding.
6. **Pad**: a batch of documents is an int64 array ``[N, L]``, each row's ids followed by
   zeros; L is the longest row's count (at least 1). A document with no word character is a
   row of zeros. The students give the same logits for any amount of zero padding, so L may
   also be fixed (e.g. to the most a row can hold, :meth:`HashedNgrams.max_ids`).

Nothing depends on the process (Python's ``hash`` is salted per process; crc32 is not), the
platform or the order of the documents in a batch.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np

NAME = "kdcache-hashed-ngrams"
VERSION = 1  # bumped whenever a step above changes: a saved spec names the one it follows
TOKEN_PATTERN = r"\w+"
_TOKENS = re.compile(TOKEN_PATTERN)  # a str pattern: \w is Unicode-aware


@dataclass(frozen=True)
class HashedNgrams:
    """The featuriser of the module docstring, with its three settings."""

    buckets: int = 65536
    max_tokens: int = 256
    ngrams: int = 1

    def __post_init__(self) -> None:
        for name, low in (("buckets", 1), ("max_tokens", 1), ("ngrams", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")

    def tokens(self, text: str) -> list[str]:
        """Steps 1-3: the kept tokens of ``text``."""
        return _TOKENS.findall(text.lower())[:self.max_tokens]

    def grams(self, text: str) -> list[str]:
        """Step 4: the n-grams of ``text``, unigrams first."""
        tokens = self.tokens(text)
        out = list(tokens)
        for n in range(2, self.ngrams + 1):
            out += [" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        return out

    def ids(self, text: str) -> list[int]:
        """Steps 1-5: the ids of one document (no padding)."""
        if not isinstance(text, str):
            raise TypeError(f"a document must be a str, not {type(text).__name__}")
        return [1 + zlib.crc32(g.encode("utf-8")) % self.buckets for g in self.grams(text)]

    def max_ids(self) -> int:
        """The most ids a document can have: ``max_tokens`` tokens and their n-grams."""
        return sum(max(0, self.max_tokens - n + 1) for n in range(1, self.ngrams + 1))

    def __call__(self, texts: Iterable[str]) -> np.ndarray:
        """Step 6: int64 ids ``[N, L]`` of a batch of documents, zero-padded on the right."""
        rows = [self.ids(t) for t in texts]
        out = np.zeros((len(rows), max([1, *map(len, rows)])), np.int64)
        for i, row in enumerate(rows):
            out[i, :len(row)] = row
        return out

    def spec(self) -> dict:
        """Everything another tool needs to replay the featuriser (``featuriser.json``)."""
        return {"name": NAME, "version": VERSION, **asdict(self),
                "lowercase": "Unicode default lower-case mapping (Python str.lower)",
                "token_pattern": TOKEN_PATTERN,
                "tokens": "maximal runs of word characters (str.isalnum() or '_'), the first "
                          "max_tokens of them",
                "ngram_join": " ",
                "order": "unigrams in position order, then bigrams, ..., up to ngrams",
                "hash": "zlib crc32 (IEEE 802.3, unsigned) of the n-gram's UTF-8 bytes",
                "id": "1 + crc32 % buckets (1..buckets); 0 is padding",
                "padding": "right, with 0; any amount gives the same logits",
                "dtype": "int64"}

    @classmethod
    def from_spec(cls, spec: dict | str) -> "HashedNgrams":
        """The featuriser a :meth:`spec` (a dict, or its JSON text) describes; a spec of
        another featuriser or version is refused (ValueError)."""
        spec = json.loads(spec) if isinstance(spec, str) else spec
        if spec.get("name") != NAME or spec.get("version") != VERSION:
            raise ValueError(f"featuriser spec {spec.get('name')!r} version {spec.get('version')!r} "
                             f"is not {NAME} version {VERSION}")
        return cls(buckets=spec["buckets"], max_tokens=spec["max_tokens"], ngrams=spec["ngrams"])
