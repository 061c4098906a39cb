"""Token ids as a cache build handles them, without any tokenizer library: their hash, length
buckets and padding.

A text teacher (:class:`pipeline.hf.HfTeacher`) turns documents into lists of token ids; this
module is what the cache build (stage one, which the image path imports too) does with them,
so that it needs neither ``transformers`` nor the teacher's module:

- :func:`update_hash` feeds a sha256 with rows of ids, each row length-prefixed, in row order:
  the hash of a shard's (or a split's) inputs, whatever the batching;
- :func:`buckets` sorts rows by token count and cuts them into batches, so a batch pads to
  the length of rows like its own, not of the longest document of the shard;
- :func:`pad` makes the ``(input_ids, attention_mask)`` arrays of one batch, padded to its
  longest row on the tokenizer's side.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

ID_DTYPE = np.dtype("<i8")  # ids hashed as little-endian int64, whatever the tokenizer's type


def update_hash(h, rows: Sequence[Sequence[int]]) -> None:
    """Feed ``h`` (a hashlib object) with ``rows`` of token ids in order: per row its length
    (8 bytes, little endian) then its ids as int64, so no two rows run together and the digest
    does not depend on how the rows were batched."""
    for ids in rows:
        h.update(len(ids).to_bytes(8, "little"))
        h.update(np.asarray(ids, dtype=ID_DTYPE).tobytes())


def buckets(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Row positions in batches of at most ``batch_size``, rows sorted by length (stable: equal
    lengths keep their row order), so each batch pads only to the longest of rows like it."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[a:a + batch_size] for a in range(0, len(order), batch_size)]


def pad(rows: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)``, int64 [B, L] with L the longest row: ids padded with
    ``pad_id`` on ``side`` (``right`` or ``left``, the tokenizer's padding side), mask 1 on
    real tokens and 0 on padding."""
    width = max((len(r) for r in rows), default=0)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        n = len(row)
        at = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, at] = row
        mask[i, at] = 1
    return ids, mask
