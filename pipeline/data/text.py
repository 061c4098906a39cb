"""Labelled text: ``text:PATH`` (a CSV, JSONL or Parquet table) and ``textdir:PATH`` (one
folder per class, ``.txt`` files in it).

A text dataset's inputs are the documents themselves: :meth:`TextDataset.inputs` returns a
numpy array of ``str`` (dtype object), never numbers. What turns them into numbers belongs to
whoever reads them: the teacher's tokenizer (``teacher=hf:DIR``, :mod:`pipeline.hf`), or a text
student's own vectoriser. The fingerprint hashes every document's UTF-8 bytes, so a cache or a
student can never be paired with other text under the same file name.

Labels may be integers or strings (or booleans). Classes are the sorted distinct values; a
label's id is its position among them, and the mapping is kept in the manifest
(``dataset.classes``). Splits: a ``split`` column (``train``/``val``/``test``) when the table
has one; otherwise test (``test_fraction``) and then val (``val_fraction``) are carved from the
rows, stratified and seeded. ``sample_id`` is the row's position in the file (``text:``), or a
63-bit hash of the file's path below PATH (``textdir:``): the same file and spec always give the
same ids.

Files must be UTF-8 (checked before parsing, so a bad byte is named by line and offset rather
than silently replaced); a CSV may carry a byte-order mark, CRLF line ends and quoted
multi-line fields. Every rule is in docs/CACHE_FORMAT.md ("Text datasets").
"""

from __future__ import annotations

import codecs
import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.dataset import BLOCK, SPLITS, Dataset, carve
from pipeline.data.registry import DATASETS
from pipeline.errors import KdError, first_line

TABLE_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json",
                  ".ndjson": "json", ".parquet": "parquet", ".pq": "parquet"}
SPLIT_COLUMN = "split"
SPLIT_VALUES = ("train", "val", "test")


@dataclass
class TextRows:
    """A pool of documents held in memory (``text:``), read by position."""

    texts: list[str]
    labels: np.ndarray
    ids: np.ndarray

    def read(self, positions: np.ndarray) -> np.ndarray:
        out = np.empty(len(positions), dtype=object)
        out[:] = [self.texts[int(p)] for p in positions]
        return out

    def subset(self, positions: np.ndarray) -> "TextRows":
        return TextRows([self.texts[int(p)] for p in positions], self.labels[positions],
                        self.ids[positions])


@dataclass
class TextFiles:
    """A pool of ``.txt`` files (``textdir:``), read lazily and decoded as UTF-8."""

    paths: list[Path]
    labels: np.ndarray
    ids: np.ndarray

    def read(self, positions: np.ndarray) -> np.ndarray:
        out = np.empty(len(positions), dtype=object)
        out[:] = [_read_text_file(self.paths[int(p)]) for p in positions]
        return out

    def subset(self, positions: np.ndarray) -> "TextFiles":
        return TextFiles([self.paths[int(p)] for p in positions], self.labels[positions],
                         self.ids[positions])


class TextDataset(Dataset):
    """A :class:`Dataset` of documents: inputs are ``str``, unnormalised, shape ``()``."""

    modality = "text"

    def __init__(self, spec: str, pools: dict, classes: list, cfg: DataConfig,
                 notes: dict | None = None):
        self.classes = [c if isinstance(c, str) else c.item() if hasattr(c, "item") else c
                        for c in classes]
        super().__init__(spec, pools, (), len(classes), cfg, normalise=False,
                         notes={"modality": "text", "classes": self.classes, **(notes or {})})

    def normalise(self, x: np.ndarray) -> np.ndarray:
        return x  # text reaches its tokenizer as it is

    def inputs(self, split: str, start: int, stop: int) -> np.ndarray:
        """Documents (``str``, dtype object) of cache rows ``[start, stop)`` of ``split``."""
        return self.raw(split, start, stop)

    @property
    def preprocessing(self) -> dict:
        # how text becomes numbers is the tokenizer's (recorded with the teacher), not the data's
        return {"text": "utf-8, as stored", "normalise": "none"}

    def texts(self, split: str) -> np.ndarray:
        """Every document of ``split``, in cache row order."""
        return self.inputs(split, 0, len(self.splits[split]))

    @cached_property
    def fingerprint(self) -> str:
        """The :class:`Dataset` fingerprint (spec, splits, ids, labels, and every document as
        its UTF-8 bytes, each after its length as 8 little-endian bytes, in cache row order),
        hashed once more with the class names and the columns they came from: the same ids
        under other names, or another column of equal text, is other data."""
        h = hashlib.sha256(Dataset.fingerprint.func(self).encode())
        h.update(json.dumps({"classes": self.classes,
                             "columns": [self.notes.get("text_column"),
                                         self.notes.get("label_column")]},
                            sort_keys=True).encode())
        return h.hexdigest()

    def _hash_inputs(self, h, name: str) -> None:
        for start, stop in self.blocks(name):
            for text in self.raw(name, start, stop):
                data = text.encode("utf-8")
                h.update(len(data).to_bytes(8, "little"))  # no two documents run together
                h.update(data)


# =========================================================================== text:PATH

@DATASETS.register("text", path=True)
def text(arg: str, cfg: DataConfig) -> TextDataset:
    """Documents in a table: ``text:PATH`` to a CSV/TSV, JSONL or Parquet file with a text column
    (``text_column=``, default ``text``) and a label column (``label_column=``, default
    ``label``; integers or strings), and optionally a ``split`` column (train/val/test).
    sample_id = the row's position in the file."""
    if not arg:
        raise KdError("dataset text needs a path: dataset=text:PATH.csv (or .jsonl, .parquet)")
    path = Path(arg)
    _check_file(path)
    if cfg.text_column == cfg.label_column:
        raise KdError(f"text_column and label_column are both {cfg.text_column!r}; name the "
                      "column of documents and the column of labels")
    table = _read_table(path, cfg.text_column)
    columns = table.column_names
    for role, name, key in (("text", cfg.text_column, "text_column"),
                            ("label", cfg.label_column, "label_column")):
        if name not in columns:
            raise KdError(f"{path} has no {role} column {name!r} (its columns: "
                          f"{', '.join(columns[:8])}{'…' if len(columns) > 8 else ''}); pass "
                          f"{key}=NAME")
    if table.num_rows == 0:
        raise KdError(f"{path} holds no rows; give it labelled documents")
    texts = _text_column(path, table.column(cfg.text_column), cfg.text_column)
    raw_labels = _label_values(path, table.column(cfg.label_column), cfg.label_column)
    classes, labels = _encode_labels(path, raw_labels, cfg.label_column)
    ids = np.arange(len(texts), dtype=np.int64)
    everything = TextRows(texts, labels, ids)
    if SPLIT_COLUMN in columns:
        pools = _pools_from_column(path, everything, table.column(SPLIT_COLUMN))
    else:
        pools = _carved_pools(everything, cfg)
    uncarved = pools["train"].labels if SPLIT_COLUMN in columns else labels
    dataset = TextDataset(f"text:{path}", pools, classes, cfg,
                          notes={"text_column": cfg.text_column, "label_column": cfg.label_column})
    _check_train_classes(path, dataset, uncarved)
    return dataset


def _check_file(path: Path) -> None:
    try:
        if path.is_file():
            if path.suffix.lower() not in TABLE_SUFFIXES:
                raise KdError(f"{path} is not a .csv, .tsv, .jsonl or .parquet file; save the "
                              "documents as one (or use dataset=textdir:FOLDER for .txt files)")
            return
        exists = path.exists()
    except OSError as exc:
        raise KdError(f"text file {path} cannot be opened ({exc.strerror or type(exc).__name__}); "
                      "pass dataset=text:PATH to an existing file") from None
    if exists:
        raise KdError(f"text file {path} is a folder; pass dataset=text:PATH to a .csv/.jsonl/"
                      ".parquet file, or dataset=textdir:PATH for a folder of class folders")
    raise KdError(f"text file {path} does not exist; pass dataset=text:PATH to an existing file")


def _read_table(path: Path, text_column: str):
    """The whole file as a pyarrow Table (CSV/TSV and JSONL checked to be UTF-8 first)."""
    import pyarrow as pa

    kind = TABLE_SUFFIXES[path.suffix.lower()]
    if kind != "parquet":
        # pyarrow's JSON reader silently replaces bad bytes with U+FFFD, and its CSV reader
        # turns a column with them into bytes: check the encoding ourselves, to name the spot
        _check_utf8(path)
    # a block must hold a whole record (a long document, a quoted multi-line field): one block
    # for files up to 1 GiB, so no record can straddle two
    block = int(min(max(path.stat().st_size + 1, 1 << 20), 1 << 30))
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if kind == "json":
            import pyarrow.json as pj

            return pj.read_json(path, read_options=pj.ReadOptions(block_size=block))
        import pyarrow.csv as pc

        parse = pc.ParseOptions(delimiter="\t" if path.suffix.lower() == ".tsv" else ",",
                                newlines_in_values=True)
        # documents are text even when they look like numbers or dates ("2024-01-01", "42")
        convert = pc.ConvertOptions(column_types={text_column: pa.string()})
        return pc.read_csv(path, parse_options=parse, convert_options=convert,
                           read_options=pc.ReadOptions(block_size=block))
    except pa.ArrowException as exc:
        what = {"json": "JSON Lines (one object per line)", "csv": "CSV",
                "parquet": "Parquet"}[kind]
        if path.suffix.lower() == ".tsv":
            what = "TSV (tab-separated)"
        raise KdError(f"{path} cannot be read as {what} ({first_line(exc)}); check its "
                      "format") from None
    except OSError as exc:
        raise KdError(f"{path} cannot be read ({type(exc).__name__}: {first_line(exc, 120)}); "
                      "check the file") from None


def _check_utf8(path: Path, chunk: int = 1 << 20) -> None:
    """Refuse a file that is not UTF-8, naming the line and byte of the first bad sequence."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    try:
        with open(path, "rb") as f:
            while True:
                data = f.read(chunk)
                # bytes of a character cut by the chunk's end wait in the decoder, and exc.start
                # counts from them: they hold no newline (never part of a multi-byte sequence)
                pending = len(decoder.getstate()[0])
                try:
                    decoder.decode(data, final=not data)
                except UnicodeDecodeError as exc:
                    at = offset - pending + exc.start
                    line += data.count(b"\n", 0, max(exc.start - pending, 0))
                    raise KdError(f"{path} is not valid UTF-8 (line {line}, byte {at}); re-save "
                                  "it as UTF-8") from None
                if not data:
                    return
                offset += len(data)
                line += data.count(b"\n")
    except OSError as exc:
        raise KdError(f"{path} cannot be read ({type(exc).__name__}: {first_line(exc, 120)}); "
                      "check the file") from None


def _row(path: Path, row: int) -> str:
    """Row ``row`` (0-based) of a table, as a person looking at the file counts it."""
    kind = TABLE_SUFFIXES[path.suffix.lower()]
    if kind == "csv":
        return f"row {row + 1} below the header"
    return f"{'record' if kind == 'json' else 'row'} {row + 1}"


def _text_column(path: Path, column, name: str) -> list[str]:
    import pyarrow as pa

    kind = column.type
    if pa.types.is_dictionary(kind):  # a categorical column (pandas category in Parquet)
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise KdError(f"{path}: column {name!r} holds {column.type}, not text; pass "
                      "text_column=NAME of the column with the documents")
    texts = column.to_pylist()
    for row, value in enumerate(texts):
        if value is None or not value.strip():
            raise KdError(f"{path}: {_row(path, row)} has an empty {name!r}; remove the row or "
                          "give it text")
    return texts


def _label_values(path: Path, column, name: str) -> list:
    import pyarrow as pa

    kind = column.type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        raise KdError(f"{path}: label column {name!r} holds {kind} numbers; labels must be "
                      "integers or strings (class names), not a regression target")
    if not (pa.types.is_integer(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_boolean(kind)):
        raise KdError(f"{path}: label column {name!r} holds {kind}; labels must be integers or "
                      "strings")
    values = column.to_pylist()
    for row, value in enumerate(values):
        if value is None or (isinstance(value, str) and not value.strip()):
            raise KdError(f"{path}: {_row(path, row)} has no label in {name!r}; label it or "
                          "remove it")
    return values


def _encode_labels(path, values: list, name: str) -> tuple[list, np.ndarray]:
    """Classes are the sorted distinct labels; a label's id is its class's position."""
    classes = sorted(set(values))
    if len(classes) < 2:
        raise KdError(f"{path}: every row has the label {classes[0]!r} in {name!r}; a classifier "
                      "needs at least 2 classes")
    lookup = {c: k for k, c in enumerate(classes)}
    return classes, np.array([lookup[v] for v in values], dtype=np.int64)


def _pools_from_column(path: Path, rows: TextRows, column) -> dict[str, TextRows]:
    raw = column.to_pylist()
    values = np.array(["" if v is None else str(v).strip().lower() for v in raw])
    if (values == "").any():
        row = int(np.flatnonzero(values == "")[0])
        raise KdError(f"{path}: {_row(path, row)} has no {SPLIT_COLUMN!r} value; mark it train, "
                      "val or test")
    unknown = sorted(set(values) - set(SPLIT_VALUES))
    if unknown:
        row = int(np.flatnonzero(values == unknown[0])[0])
        raise KdError(f"{path}: column {SPLIT_COLUMN!r} holds {raw[row]!r} ({_row(path, row)}); "
                      "its values must be train, val or test (rename the column to carve the "
                      "splits instead)")
    pools = {name: rows.subset(np.flatnonzero(values == name)) for name in SPLIT_VALUES
             if (values == name).any()}
    for needed in ("train", "test"):
        if needed not in pools:
            raise KdError(f"{path}: column {SPLIT_COLUMN!r} has no {needed} rows; mark some rows "
                          f"{needed}, or drop the column to carve the splits")
    return pools


def _carved_pools(rows, cfg: DataConfig) -> dict:
    """train and test, test carved stratified and seeded (val is carved from train later)."""
    # a seed of its own for the test carve: val's carve from train uses cfg.seed itself
    keep, test_positions = carve(rows.labels, cfg.test_fraction, cfg.seed + 1)
    return {"train": rows.subset(keep), "test": rows.subset(test_positions)}


def _check_train_classes(where: Path, dataset: TextDataset, uncarved: np.ndarray) -> None:
    """Every class must reach the train split the teacher learns from (after any carving);
    ``uncarved``: the labels of the train rows before test or val were carved from them."""
    present = set(np.unique(dataset.splits["train"].labels).tolist())
    missing = [k for k in range(dataset.num_classes) if k not in present]
    if not missing:
        return
    name = dataset.classes[missing[0]]
    if (uncarved == missing[0]).any():  # it had training rows: carving val (or test) took them
        rows = sum(int((dataset.splits[s].labels == missing[0]).sum()) for s in SPLITS)
        raise KdError(f"{where}: class {name!r} has {rows} row(s), none left for training once "
                      "test and val are carved; give it more rows or remove it")
    raise KdError(f"{where}: class {name!r} has no training rows; give it training rows or "
                  "remove it")


# =========================================================================== textdir:PATH

TEXT_SUFFIXES = {".txt", ".text", ".md"}


@DATASETS.register("textdir", path=True)
def textdir(arg: str, cfg: DataConfig) -> TextDataset:
    """A folder of your documents, ``textdir:PATH`` with ``PATH/train/CLASS/*.txt`` (and
    optionally ``PATH/val/CLASS/`` and ``PATH/test/CLASS/``; missing ones are carved from train,
    stratified and seeded). Files are read lazily as UTF-8 (a leading byte-order mark dropped).
    sample_id is a 63-bit hash of the file's path relative to PATH, so it survives adding other
    files."""
    if not arg:
        raise KdError("dataset textdir needs a path: dataset=textdir:PATH")
    root = Path(arg)
    if not root.exists():
        raise KdError(f"text folder {root} does not exist; pass dataset=textdir:PATH to a folder "
                      "with train/CLASS/*.txt")
    if not (root / "train").is_dir():
        raise KdError(f"{root} must hold a train/ folder of class subfolders of .txt files "
                      "(optionally val/ and test/ too)")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if len(classes) < 2:
        raise KdError(f"{root}/train must hold at least two class folders")
    pools = {}
    for name in SPLIT_VALUES:
        if not (root / name).is_dir():
            continue
        # a class the teacher never trains on would be silently dropped: refuse it instead
        foreign = sorted(p.name for p in (root / name).iterdir()
                         if p.is_dir() and p.name not in classes)
        if foreign:
            raise KdError(f"{root}/{name} has class folders that {root}/train lacks: "
                          f"{', '.join(foreign[:3])}{'…' if len(foreign) > 3 else ''}; add them "
                          "to train/ or remove them")
        paths, labels = [], []
        for k, cls in enumerate(classes):
            for p in sorted((root / name / cls).glob("*")):
                if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES:
                    paths.append(p)
                    labels.append(k)
        if not paths:
            raise KdError(f"{root}/{name} holds no text files (*.txt, *.text, *.md) in its class "
                          "folders")
        ids = np.array([_path_id(p.relative_to(root)) for p in paths], dtype=np.int64)
        pools[name] = TextFiles(paths, np.array(labels, np.int64), ids)
    uncarved = pools["train"].labels
    if "test" not in pools:
        pools.update(_carved_pools(pools["train"], cfg))
    for pool in pools.values():  # an empty or undecodable file is refused now, not mid-build
        for start in range(0, len(pool.paths), BLOCK):
            positions = np.arange(start, min(start + BLOCK, len(pool.paths)))
            for position, value in zip(positions, pool.read(positions)):
                if not value.strip():
                    raise KdError(f"{pool.paths[position]} is empty; remove it or give it text")
    dataset = TextDataset(f"textdir:{root}", pools, classes, cfg)
    _check_train_classes(root / "train", dataset, uncarved)
    return dataset


def _read_text_file(path: Path) -> str:
    try:
        # utf-8-sig: an editor's byte-order mark is not part of the document (the CSV reader
        # drops it too)
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise KdError(f"{path} is not valid UTF-8 (byte {exc.start}); re-save it as "
                      "UTF-8") from None
    except OSError as exc:
        raise KdError(f"{path} cannot be read ({type(exc).__name__}: {first_line(exc, 120)}); "
                      "check the file") from None


def _path_id(rel: Path) -> int:
    digest = hashlib.blake2b(rel.as_posix().encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF
