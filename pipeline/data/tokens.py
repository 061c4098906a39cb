"""Token windows for language models: ``tokens:PATH``.

PATH is a ``.txt`` file (documents separated by blank lines), a folder of ``.txt`` files (each
read the same way; files in the order of their paths), or a CSV/TSV, JSONL or Parquet table
with a text column (``text_column=``, default ``text``) and optionally a ``split`` column
(train/val/test; a table without val rows has val carved from train). Without a split column,
test (``test_fraction``) and then val (``val_fraction``) are carved from the documents, seeded:
documents, never windows, are split, so no document is in two splits.

Each document becomes ``tokenize(doc) + [EOS]`` with the tokenizer of DataConfig key
``tokenizer=DIR`` (a Hugging Face tokenizer folder, or ``DIR/NAME.gguf``: the tokenizer inside
a GGUF model file; no special tokens are added besides the EOS). Windows hold ``seq_len`` tokens:

- ``pack=true``: a split's documents, in file order, are joined into one stream and cut every
  ``seq_len`` tokens; the last window, shorter, is right-padded;
- ``pack=false``: one window per document, truncated to ``seq_len`` tokens (its EOS dropped
  when it is cut), right-padded.

:meth:`TokenDataset.windows` gives per window ``ids`` (int64 [B, T]), ``mask`` (bool [B, T]:
position j has a target, i.e. j + 1 < T and token j + 1 is real, not padding; position j's
target is ``ids[j + 1]``), ``segments`` (int32: the document's index within the window, 0..;
-1 on padding) and ``positions`` (int32: the token's position within its document, counted
from the document's start even when the document began in an earlier window; 0 on padding).
Labels are zeros (a window has no class). ``sample_id`` is a 63-bit hash of (split, window
index). The fingerprint hashes every document's UTF-8 bytes by split, the tokenizer's
fingerprint (:meth:`TokenDataset.tokenizer_record`), ``seq_len`` and ``pack``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.dataset import SPLITS, Dataset, carve
from pipeline.data.registry import DATASETS
from pipeline.data.text import (SPLIT_COLUMN, SPLIT_VALUES, TABLE_SUFFIXES, _check_utf8, _read_table,
                                _row, _text_column)
from pipeline.errors import KdError, first_line

DOCUMENT_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")  # a blank line (spaces allowed) ends a document
TEXT_SUFFIXES = {".txt", ".text", ".md"}
TOKENIZE_BATCH = 1024  # documents per tokenizer call (the fast tokenizer batches in Rust)


# =========================================================================== documents

def read_documents(arg: str, cfg: DataConfig) -> dict[str, list[str]]:
    """The documents of ``tokens:ARG`` by split (train, val, test; each in file order), read
    without a tokenizer: what a tokenizer is trained on before the data can be tokenized."""
    if not arg:
        raise KdError("dataset tokens needs a path: dataset=tokens:PATH (a .txt file, a folder of "
                      ".txt files, or a .csv/.jsonl/.parquet with a text column)")
    path = Path(arg)
    try:
        is_dir, is_file = path.is_dir(), path.is_file()
    except OSError as exc:
        raise KdError(f"tokens path {path} cannot be opened ({exc.strerror or type(exc).__name__}); "
                      "pass dataset=tokens:PATH to an existing file or folder") from None
    if is_dir:
        docs, column = _folder_documents(path), None
    elif not is_file:
        raise KdError(f"tokens path {path} does not exist; pass dataset=tokens:PATH to a .txt file, "
                      "a folder of .txt files, or a .csv/.jsonl/.parquet table")
    elif path.suffix.lower() in TEXT_SUFFIXES:
        docs, column = _file_documents(path), None
    elif path.suffix.lower() in TABLE_SUFFIXES:
        table = _read_table(path, cfg.text_column)
        if cfg.text_column not in table.column_names:
            names = table.column_names
            raise KdError(f"{path} has no text column {cfg.text_column!r} (its columns: "
                          f"{', '.join(names[:8])}{'…' if len(names) > 8 else ''}); pass "
                          "text_column=NAME")
        docs = _text_column(path, table.column(cfg.text_column), cfg.text_column) if table.num_rows else []
        column = table.column(SPLIT_COLUMN) if SPLIT_COLUMN in table.column_names else None
    else:
        raise KdError(f"{path} is not a .txt file, a folder, or a .csv/.tsv/.jsonl/.parquet table; "
                      "save the documents as one of them")
    if not docs:
        raise KdError(f"{path} holds no documents; give it text (documents separated by blank "
                      "lines, or one per row of its text column)")
    if column is not None:
        return _split_by_column(path, docs, column, cfg)
    keep, test = carve(np.zeros(len(docs), np.int64), cfg.test_fraction, cfg.seed + 1)
    train, val = carve(np.zeros(len(keep), np.int64), cfg.val_fraction, cfg.seed)
    return {"train": [docs[i] for i in keep[train]], "val": [docs[i] for i in keep[val]],
            "test": [docs[i] for i in test]}


def split_documents(text: str) -> list[str]:
    """The documents of one ``.txt`` text: blank-line-separated blocks, each stripped of the
    whitespace around it (CRLF line ends read as LF); blocks of whitespace only are no document."""
    text = text.replace("\r\n", "\n")
    return [d.strip() for d in DOCUMENT_BREAK.split(text) if d.strip()]


def _file_documents(path: Path) -> list[str]:
    _check_utf8(path)  # names the line and byte of a bad sequence rather than replacing it
    try:
        # utf-8-sig: an editor's byte-order mark is not part of the first document
        return split_documents(path.read_bytes().decode("utf-8-sig"))
    except OSError as exc:
        raise KdError(f"{path} cannot be read ({type(exc).__name__}: {first_line(exc, 120)}); "
                      "check the file") from None


def _folder_documents(root: Path) -> list[str]:
    files = sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise KdError(f"{root} holds no .txt files; put the documents in .txt files (separated by "
                      "blank lines) in it, or pass dataset=tokens:FILE")
    return [doc for p in files for doc in _file_documents(p)]


def _split_by_column(path: Path, docs: list[str], column, cfg: DataConfig) -> dict[str, list[str]]:
    raw = column.to_pylist()
    values = ["" if v is None else str(v).strip().lower() for v in raw]
    for row, value in enumerate(values):
        if value not in SPLIT_VALUES:
            what = "no" if not value else f"{raw[row]!r} as its"
            raise KdError(f"{path}: {_row(path, row)} has {what} {SPLIT_COLUMN!r} value; mark each "
                          "row train, val or test (or drop the column to carve the splits)")
    out = {name: [d for d, v in zip(docs, values) if v == name] for name in SPLIT_VALUES}
    for needed in ("train", "test"):
        if not out[needed]:
            raise KdError(f"{path}: column {SPLIT_COLUMN!r} marks no {needed} documents; mark some "
                          f"rows {needed}, or drop the column to carve the splits")
    if not out["val"]:  # carved from train, seeded, like every dataset without a val split
        train = out["train"]
        keep, val = carve(np.zeros(len(train), np.int64), cfg.val_fraction, cfg.seed)
        out["train"], out["val"] = [train[i] for i in keep], [train[i] for i in val]
    return out


# =========================================================================== tokenizing

def tokenizer_record(tok, directory: Path | None = None) -> dict:
    """How a token dataset turns documents into ids: the tokenizer itself
    (:func:`pipeline.hf.tokenizer_source`: backend, ``len(tokenizer)``, special tokens), the EOS
    that ends each document and the pad id of padding, and that no other special token is
    added. ``fingerprint`` is the sha256 of the rest."""
    from pipeline.hf import tokenizer_source

    record = {**tokenizer_source(tok, directory), "eos_id": eos_id(tok), "pad_id": pad_id(tok),
              "add_special_tokens": False}
    return {**record, "fingerprint": hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()}


def eos_id(tok) -> int:
    eos = tok.eos_token_id
    if eos is None:
        raise KdError("the tokenizer has no end-of-sequence token, which ends each document of a "
                      "token dataset; pass tokenizer=DIR of a tokenizer with an eos_token")
    return int(eos)


def pad_id(tok) -> int:
    # tokenizers without a padding token (GPT-style) pad with the EOS: the mask hides padding
    return int(tok.pad_token_id if tok.pad_token_id is not None else eos_id(tok))


def tokenize(tok, docs: list[str]) -> list[list[int]]:
    """``tokenize(doc) + [EOS]`` of each document (no other special token added)."""
    eos = eos_id(tok)
    out = []
    for a in range(0, len(docs), TOKENIZE_BATCH):
        batch = tok(docs[a:a + TOKENIZE_BATCH], add_special_tokens=False)["input_ids"]
        out.extend(list(ids) + [eos] for ids in batch)
    return out


@dataclass
class TokenStream:
    """One split's documents as one stream of ids (each document's ids then its EOS), with the
    offset where each document starts, and the windows cut from it. A stream may hold a stretch
    of a split's stream only (``offset``: where ``tokens[0]`` sits in it; ``end``: the split
    stream's length), to rebuild some windows from their documents alone."""

    tokens: np.ndarray  # int64 [n]
    starts: np.ndarray  # int64 [documents + 1]: document d is offsets starts[d]..starts[d + 1]
    seq_len: int
    pack: bool
    pad: int
    offset: int = 0
    end: int = -1  # -1: offset + len(tokens)

    def __post_init__(self) -> None:
        if self.end < 0:
            self.end = self.offset + len(self.tokens)

    @classmethod
    def of(cls, rows: list[list[int]], seq_len: int, pack: bool, pad: int, offset: int = 0,
           end: int = -1) -> "TokenStream":
        lengths = np.array([len(r) for r in rows], np.int64)
        starts = offset + np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.fromiter((t for r in rows for t in r), np.int64, count=int(lengths.sum()))
        return cls(tokens, starts, seq_len, pack, pad, offset, end)

    @property
    def documents(self) -> int:
        return len(self.starts) - 1

    def __len__(self) -> int:
        """The number of windows."""
        if self.pack:
            return -(-self.end // self.seq_len)
        return self.documents

    def windows(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """ids, mask, segments and positions (see the module's docstring) of windows ``rows``
        (for a stream that starts at a document other than the split's first: windows counted
        from that document, ``pack=false``; from the split stream's start, ``pack=true``)."""
        rows = np.asarray(rows, np.int64)
        T = self.seq_len
        j = np.arange(T, dtype=np.int64)
        if self.pack:
            at = rows[:, None] * T + j  # each position's offset in the split's stream
            real = at < self.end
            doc = np.searchsorted(self.starts, np.minimum(at, self.end - 1), side="right") - 1
            doc = np.clip(doc, 0, self.documents - 1)
            first = doc[:, :1]  # the document the window starts in: its segment 0
            target = (j + 1 < T) & (at + 1 < self.end)
            index = at - self.offset
        else:
            length = np.minimum(self.starts[rows + 1] - self.starts[rows], T)
            real = j < length[:, None]
            at = self.starts[rows][:, None] + np.where(real, j, 0)
            doc = np.broadcast_to(rows[:, None], at.shape)
            first = rows[:, None]
            target = (j + 1 < T) & (j + 1 < length[:, None])
            index = at - self.offset
        index = np.clip(np.where(real, index, 0), 0, max(len(self.tokens) - 1, 0))
        ids = np.where(real, self.tokens[index] if len(self.tokens) else self.pad, self.pad)
        segments = np.where(real, doc - first, -1).astype(np.int32)
        positions = np.where(real, at - self.starts[doc], 0).astype(np.int32)
        return {"ids": ids.astype(np.int64), "mask": target & real, "segments": segments,
                "positions": positions}

    def documents_of(self, row: int) -> range:
        """The documents window ``row`` holds tokens of."""
        if not self.pack:
            return range(row, row + 1)
        a, b = row * self.seq_len, min((row + 1) * self.seq_len, self.end)
        first = int(np.searchsorted(self.starts, a, side="right") - 1)
        last = int(np.searchsorted(self.starts, b - 1, side="right") - 1)
        return range(first, last + 1)


@dataclass
class WindowPool:
    """A split's windows as a :class:`pipeline.data.dataset.RowSource`: read gives the ids."""

    stream: TokenStream
    ids: np.ndarray
    labels: np.ndarray

    def read(self, positions: np.ndarray) -> np.ndarray:
        return self.stream.windows(positions)["ids"]


def window_ids(split: str, count: int) -> np.ndarray:
    """Stable sample ids of a split's windows: a 63-bit hash of ``split:index`` each."""
    out = np.empty(count, np.int64)
    for i in range(count):
        digest = hashlib.blake2b(f"{split}:{i}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF
    return out


# =========================================================================== the dataset

class TokenDataset(Dataset):
    """A :class:`Dataset` of token windows: inputs are int64 ids ``[B, seq_len]``, unnormalised;
    ``num_classes`` is ``len(tokenizer)`` (what a next-token target indexes); labels are zeros.
    :meth:`windows` gives the mask, segments and positions beside the ids."""

    modality = "tokens"

    def __init__(self, spec: str, documents: dict[str, list[str]], tokenizer, directory: Path | None,
                 cfg: DataConfig):
        """``documents`` by split; ``tokenizer`` (a transformers tokenizer) loaded from
        ``directory`` (None for one not saved yet: only a tokenizer without a Rust backend
        needs its folder, for its fingerprint)."""
        self.tokenizer = tokenizer
        self.directory = Path(directory) if directory is not None else None
        self.documents = documents
        self.seq_len, self.pack = int(cfg.seq_len), bool(cfg.pack)
        self.eos_id, self.pad_id = eos_id(tokenizer), pad_id(tokenizer)
        self.tokenizer_record = tokenizer_record(tokenizer, self.directory)
        self.streams = {s: TokenStream.of(tokenize(tokenizer, documents[s]), self.seq_len, self.pack,
                                          self.pad_id) for s in SPLITS}
        train = self.streams["train"]
        if self.pack and len(train.tokens) < self.seq_len:
            raise KdError(f"{spec}: the train split holds {len(train.tokens)} tokens, fewer than "
                          f"one window of seq_len={self.seq_len}; give it more text or pass a "
                          "smaller seq_len")
        pools = {s: WindowPool(st, window_ids(s, len(st)), np.zeros(len(st), np.int64))
                 for s, st in self.streams.items()}
        notes = {"modality": "tokens", "seq_len": self.seq_len, "pack": self.pack,
                 "tokenizer": dict(self.tokenizer_record),
                 "eos_id": self.eos_id, "pad_id": self.pad_id,
                 "documents": {s: st.documents for s, st in self.streams.items()},
                 "tokens": {s: int(len(st.tokens)) for s, st in self.streams.items()}}
        if spec_is_table(spec):
            notes["text_column"] = cfg.text_column
        super().__init__(spec, pools, (self.seq_len,), len(tokenizer), cfg, normalise=False, notes=notes)

    def normalise(self, x: np.ndarray) -> np.ndarray:
        return x  # ids reach the model as they are

    def inputs(self, split: str, start: int, stop: int) -> np.ndarray:
        """Token ids (int64 [B, seq_len]) of windows ``[start, stop)`` of ``split``."""
        return self.raw(split, start, stop)

    def windows(self, split: str, start: int, stop: int) -> dict[str, np.ndarray]:
        """Windows ``[start, stop)`` of ``split``: ``ids`` int64, ``mask`` bool (position j has
        a target: ``ids[j + 1]``, real), ``segments`` int32 (document within the window, -1
        on padding), ``positions`` int32 (within its document; 0 on padding), each [B, T]."""
        return self.windows_at(split, np.arange(start, stop, dtype=np.int64))

    def windows_at(self, split: str, rows: np.ndarray) -> dict[str, np.ndarray]:
        """:meth:`windows` of arbitrary window indices of ``split`` (any order)."""
        stream = self.streams[split]
        rows = np.asarray(rows, np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(stream)):
            raise IndexError(f"window rows outside 0..{len(stream) - 1} of split {split}")
        return stream.windows(rows)

    def retokenized(self, split: str, rows: np.ndarray) -> dict[str, np.ndarray]:
        """:meth:`windows_at` rebuilt from the text of the documents those windows hold,
        tokenized afresh (and nothing else): what ``verify`` compares with a cache's ids."""
        stream = self.streams[split]
        out = {k: [] for k in ("ids", "mask", "segments", "positions")}
        for row in np.asarray(rows, np.int64):
            docs = stream.documents_of(int(row))
            fresh = TokenStream.of(tokenize(self.tokenizer, [self.documents[split][d] for d in docs]),
                                   self.seq_len, self.pack, self.pad_id,
                                   offset=int(stream.starts[docs.start]) if self.pack else 0,
                                   end=stream.end if self.pack else -1)
            window = fresh.windows(np.array([row if self.pack else 0]))
            for k in out:
                out[k].append(window[k][0])
        return {k: np.stack(v) for k, v in out.items()} if len(rows) else self.windows_at(split, rows)

    def texts(self, split: str) -> list[str]:
        """Every document of ``split``, in stream order."""
        return list(self.documents[split])

    @property
    def preprocessing(self) -> dict:
        return {"tokenizer": self.tokenizer_record["fingerprint"], "seq_len": self.seq_len,
                "pack": self.pack, "eos": "after each document", "padding": "right"}

    def _hash_inputs(self, h, name: str) -> None:
        """The fingerprint's inputs (beside the spec, window ids and the preprocessing: the
        tokenizer fingerprint, seq_len, pack): every document of the split as its UTF-8 bytes,
        each after its length as 8 little-endian bytes, in stream order."""
        h.update(len(self.documents[name]).to_bytes(8, "little"))
        for doc in self.documents[name]:
            data = doc.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))  # no two documents run together
            h.update(data)


def spec_is_table(spec: str) -> bool:
    return Path(spec.partition(":")[2]).suffix.lower() in TABLE_SUFFIXES


@DATASETS.register("tokens", path=True)
def tokens(arg: str, cfg: DataConfig) -> TokenDataset:
    """Documents cut into windows of ``seq_len`` token ids for language models:
    ``tokens:PATH`` to a .txt file (documents separated by blank lines), a folder of .txt files,
    or a CSV/JSONL/Parquet table with a text column (``text_column=``) and optionally a
    ``split`` column. Tokenized with ``tokenizer=DIR`` (or a .gguf file's); ``pack=true``
    joins documents with EOS and cuts every ``seq_len``, ``pack=false`` gives each document a
    window."""
    documents = read_documents(arg, cfg)
    if not cfg.tokenizer:
        raise KdError("dataset=tokens: needs a tokenizer: pass tokenizer=DIR (a Hugging Face "
                      "tokenizer folder), or teacher=hf:DIR to `kdcache cache` (it takes the "
                      "teacher's), or train one: kdcache teacher dataset=tokens:PATH")
    from pipeline.hf import load_tokenizer

    tokenizer = load_tokenizer(cfg.tokenizer)
    return TokenDataset(f"tokens:{Path(arg)}", documents, tokenizer, Path(cfg.tokenizer), cfg)
