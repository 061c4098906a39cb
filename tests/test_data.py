"""Dataset sources: every registered dataset gives three splits of stable, uniquely identified
rows (normalised float32 arrays, or documents as ``str`` for text); bad user files are refused
with a KdError that names the problem."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import hypothesis
from hypothesis import given
from hypothesis import strategies as st

from pipeline.config import DataConfig
from pipeline.data import DATASETS, SPLITS, Dataset, dataset_slug, open_dataset
from pipeline.errors import KdError


# --------------------------------------------------------------------------- example files

def write_npz(path: Path, *, n_train=60, n_test=20, shape=(6,), classes=3, seed=0, **replace) -> Path:
    """A valid npz (inputs depend on the label so it is learnable); ``replace`` swaps arrays."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, n in (("train", n_train), ("test", n_test)):
        y = np.arange(n) % classes
        arrays[f"x_{name}"] = (rng.standard_normal((n, *shape)) + y.reshape(-1, *[1] * len(shape))).astype(np.float32)
        arrays[f"y_{name}"] = y.astype(np.int64)
    arrays.update(replace)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


def _idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) in the big-endian idx format MNIST ships in."""
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", s) for s in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, np.uint8).tobytes())


def write_fake_mnist(root: Path, n_train=40, n_test=12, size=5, classes=3) -> Path:
    """A tiny MNIST in torchvision's raw layout: ROOT/MNIST/raw/*-ubyte (uncompressed)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, size, size), dtype=np.uint8))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % classes).astype(np.uint8))
    return root


def write_imagefolder(root: Path, per_class=(4, 2), classes=("cat", "dog"), size=6) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), per_class):
        for k, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size + i, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.png")
            (folder / "notes.txt").write_text("not an image")  # ignored
    return root


WORDS = {"ham": "meeting lunch report agenda", "news": "election market storm vote",
         "spam": "win free prize cash"}


def text_rows(n: int = 60, split: bool = False, labels=None) -> list[dict]:
    """``n`` short labelled documents (classes ham, news, spam cycling, or ``labels[i % K]``);
    with ``split``, a split column of 7 train, 1 val and 2 test rows in every 10. The
    documents hold commas, quotes and newlines on purpose."""
    rows = []
    for i in range(n):
        topic = list(WORDS)[i % 3]
        words = WORDS[topic].split()
        text = f'{words[i % 4]}, "{words[(i + 1) % 4]}" no. {i}' + ("\nmore" if i % 5 == 0 else "")
        row = {"text": text, "label": topic if labels is None else labels[i % len(labels)]}
        if split:
            row["split"] = (["train"] * 7 + ["val", "test", "test"])[i % 10]
        rows.append(row)
    return rows


def write_table(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` as the file type ``path``'s suffix names: .csv/.tsv (Python's csv
    module), .jsonl (one JSON object per line) or .parquet."""
    suffix = path.suffix
    if suffix in (".csv", ".tsv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise AssertionError(suffix)
    return path


def write_textdir(root: Path, per_class=(6, 2), classes=("ham", "spam"), val: int = 0) -> Path:
    """``root/train/CLASS/*.txt`` (and ``test/`` when per_class[1], ``val/`` when ``val``)."""
    for split, n in zip(("train", "test", "val"), (*per_class, val)):
        for cls in classes:
            if not n:
                continue
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"doc{i}.txt").write_text(f"{cls} {split} document {i}\nline two",
                                                     encoding="utf-8")
            (folder / "image.png").write_bytes(b"not text")  # ignored
    return root


def write_tokens(tmp: Path, pack: bool = True) -> DataConfig:
    """A token dataset: a .txt corpus and a byte-level BPE trained on it (tests/lm_models.py)."""
    from tests.lm_models import corpus_documents, train_tokenizer, write_corpus

    corpus = write_corpus(tmp / "stories.txt", count=60)
    train_tokenizer(corpus_documents(corpus), vocab_size=300).save_pretrained(tmp / "tokenizer")
    return DataConfig(dataset=f"tokens:{corpus}", tokenizer=str(tmp / "tokenizer"), seq_len=16, pack=pack)


# At least one example per registry name, keyed NAME or NAME/VARIANT. A dataset added to the
# registry without an example here fails test_every_dataset_has_an_example.
EXAMPLES: dict[str, Callable[[Path], DataConfig]] = {
    "digits": lambda tmp: DataConfig(dataset="digits"),
    "digits3": lambda tmp: DataConfig(dataset="digits3"),
    "npz": lambda tmp: DataConfig(dataset=f"npz:{write_npz(tmp / 'rows.npz')}"),
    "torchvision": lambda tmp: DataConfig(dataset="torchvision:MNIST",
                                          data_root=str(write_fake_mnist(tmp / "tv"))),
    "imagefolder": lambda tmp: DataConfig(dataset=f"imagefolder:{write_imagefolder(tmp / 'images')}:8"),
    "synthetic": lambda tmp: DataConfig(dataset="synthetic:200:3x4x4:4"),
    "text": lambda tmp: DataConfig(dataset=f"text:{write_table(tmp / 'mail.csv', text_rows(split=True))}"),
    "text/jsonl": lambda tmp: DataConfig(dataset=f"text:{write_table(tmp / 'mail.jsonl', text_rows())}"),
    "text/parquet": lambda tmp: DataConfig(
        dataset=f"text:{write_table(tmp / 'mail.parquet', text_rows(labels=[3, 1, 7, 1]))}"),
    "textdir": lambda tmp: DataConfig(dataset=f"textdir:{write_textdir(tmp / 'docs')}"),
    "textdir/carved": lambda tmp: DataConfig(
        dataset=f"textdir:{write_textdir(tmp / 'docs', per_class=(10, 0), classes=('a', 'b', 'c'))}"),
    "tokens": write_tokens,
    "tokens/unpacked": lambda tmp: write_tokens(tmp, pack=False),
}

EXPECTED = {  # input shape and number of classes of each example
    "digits": ((1, 8, 8), 10),
    "digits3": ((1, 8, 24), 1000),
    "npz": ((6,), 3),
    "torchvision": ((1, 5, 5), 3),
    "imagefolder": ((3, 8, 8), 2),
    "synthetic": ((3, 4, 4), 4),
    "text": ((), 3),
    "text/jsonl": ((), 3),
    "text/parquet": ((), 3),
    "textdir": ((), 2),
    "textdir/carved": ((), 3),
    "tokens": ((16,), 300),  # windows of seq_len ids; classes: len(tokenizer)
    "tokens/unpacked": ((16,), 300),
}


def test_every_dataset_has_an_example():
    assert {name.split("/")[0] for name in EXAMPLES} == set(DATASETS.names())
    assert set(EXPECTED) == set(EXAMPLES)


@pytest.fixture(params=sorted(EXAMPLES))
def example(request, tmp_path):
    name = request.param
    return name, EXAMPLES[name](tmp_path)


def test_three_nonempty_splits(example):
    name, cfg = example
    ds = open_dataset(cfg)
    assert list(ds.splits) == list(SPLITS)
    shape, classes = EXPECTED[name]
    assert ds.input_shape == shape
    assert ds.num_classes == classes
    rows = ds.describe()["rows"]
    for split in SPLITS:
        assert len(ds.splits[split]) > 0
        assert rows[split] == len(ds.splits[split])


def test_sample_ids_unique_and_stable(example):
    _, cfg = example
    first, second = open_dataset(cfg), open_dataset(cfg)
    all_ids = np.concatenate([first.splits[s].sample_ids for s in SPLITS])
    assert all_ids.dtype == np.int64
    assert len(np.unique(all_ids)) == len(all_ids)
    for split in SPLITS:
        np.testing.assert_array_equal(first.splits[split].sample_ids, second.splits[split].sample_ids)
        np.testing.assert_array_equal(first.splits[split].labels, second.splits[split].labels)


def test_inputs_shape_dtype_labels(example):
    _, cfg = example
    ds = open_dataset(cfg)
    for split in SPLITS:
        n = len(ds.splits[split])
        x = ds.inputs(split, 0, n)
        assert x.shape == (n, *ds.input_shape)
        if ds.modality == "text":  # documents, as str
            assert ds.input_shape == () and x.dtype == object
            assert all(isinstance(t, str) and t.strip() for t in x)
        elif ds.modality == "tokens":  # token ids, as int64
            assert x.dtype == np.int64 and x.min() >= 0 and x.max() < ds.num_classes
        else:
            assert x.dtype == np.float32
            assert np.isfinite(x).all()
        labels = ds.splits[split].labels
        assert labels.min() >= 0 and labels.max() < ds.num_classes
        # reading a sub-range, or rows in any order, gives the same rows as the whole split
        if n > 2:
            np.testing.assert_array_equal(ds.inputs(split, 1, n - 1), x[1:n - 1])
            rows = np.array([n - 1, 0, 1])
            np.testing.assert_array_equal(ds.inputs_at(split, rows), x[rows])


def test_fingerprint_stable_across_opens(example):
    _, cfg = example
    a, b = open_dataset(cfg), open_dataset(cfg)
    assert a.fingerprint == b.fingerprint
    assert len(a.fingerprint) == 64


def test_normalisation_uses_train_statistics(example):
    name, cfg = example
    ds = open_dataset(cfg)
    if ds.modality == "text":  # documents reach their tokenizer as stored
        assert ds.preprocessing == {"text": "utf-8, as stored", "normalise": "none"}
        np.testing.assert_array_equal(ds.inputs("train", 0, 5), ds.raw("train", 0, 5))
        return
    if ds.modality == "tokens":  # ids reach the model as they are
        assert ds.preprocessing["seq_len"] == 16 and set(ds.preprocessing) >= {"tokenizer", "pack"}
        np.testing.assert_array_equal(ds.inputs("train", 0, 5), ds.raw("train", 0, 5))
        return
    if name == "synthetic":  # generated data is already standardised: left as is
        assert np.all(ds.mean == 0) and np.all(ds.std == 1)
        return
    x = ds.inputs("train", 0, len(ds.splits["train"]))
    axes = tuple(i for i in range(x.ndim) if i != 1) if x.ndim > 2 else None
    np.testing.assert_allclose(x.mean(axis=axes), 0, atol=1e-4)
    std = x.std(axis=axes)
    assert np.all((np.abs(std - 1) < 1e-3) | (std < 1e-6))


# --------------------------------------------------------------------------- per source

def test_digits_test_split_fixed_across_seeds():
    a = open_dataset(DataConfig(dataset="digits", seed=0))
    b = open_dataset(DataConfig(dataset="digits", seed=1))
    np.testing.assert_array_equal(a.splits["test"].sample_ids, b.splits["test"].sample_ids)
    assert not np.array_equal(a.splits["val"].sample_ids, b.splits["val"].sample_ids)
    # seed only moves rows between train and val
    union = lambda d: np.sort(np.concatenate([d.splits["train"].sample_ids, d.splits["val"].sample_ids]))
    np.testing.assert_array_equal(union(a), union(b))
    assert a.fingerprint != b.fingerprint
    assert sum(len(s) for s in a.splits.values()) == 1797


def test_digits_takes_no_argument():
    with pytest.raises(KdError, match="takes no argument"):
        open_dataset(DataConfig(dataset="digits:5"))


def test_val_split_is_stratified_and_sized():
    ds = open_dataset(DataConfig(dataset="digits", val_fraction=0.25))
    n_pool = len(ds.splits["train"]) + len(ds.splits["val"])
    assert abs(len(ds.splits["val"]) - 0.25 * n_pool) <= 1
    assert set(ds.splits["val"].labels.tolist()) == set(range(10))


def test_npz_sample_ids_name_file_rows(tmp_path):
    path = write_npz(tmp_path / "d.npz", n_train=50, n_test=10)
    ds = open_dataset(DataConfig(dataset=f"npz:{path}"))
    with np.load(path) as f:
        x_train, x_test = f["x_train"], f["x_test"]
    train_ids = np.concatenate([ds.splits["train"].sample_ids, ds.splits["val"].sample_ids])
    np.testing.assert_array_equal(np.sort(train_ids), np.arange(50))
    np.testing.assert_array_equal(ds.splits["test"].sample_ids, np.arange(50, 60))
    # the raw rows of a split are the file's rows its ids name
    val = ds.splits["val"]
    np.testing.assert_array_equal(ds.raw("val", 0, len(val)), x_train[val.sample_ids])
    np.testing.assert_array_equal(ds.raw("test", 0, 10), x_test)


def test_npz_with_val_split_and_image_shapes(tmp_path):
    rng = np.random.default_rng(1)
    path = write_npz(tmp_path / "img.npz", shape=(5, 5), n_train=30, n_test=9,
                     x_val=rng.random((6, 5, 5)).astype(np.float64), y_val=np.arange(6) % 3)
    ds = open_dataset(DataConfig(dataset=f"npz:{path}"))
    assert ds.input_shape == (1, 5, 5)  # (N, H, W) images get a channel axis
    assert len(ds.splits["val"]) == 6 and len(ds.splits["train"]) == 30
    np.testing.assert_array_equal(ds.splits["val"].sample_ids, np.arange(30, 36))
    np.testing.assert_array_equal(ds.splits["test"].sample_ids, np.arange(36, 45))


def test_npz_fingerprint_sees_one_changed_value(tmp_path):
    path = write_npz(tmp_path / "a.npz")
    before = open_dataset(DataConfig(dataset=f"npz:{path}")).fingerprint
    with np.load(path) as f:
        arrays = dict(f)
    arrays["x_test"][3, 2] += 0.5
    np.savez(path, **arrays)
    after = open_dataset(DataConfig(dataset=f"npz:{path}")).fingerprint
    assert after != before
    # and the val carving (seed) is part of the identity too
    assert open_dataset(DataConfig(dataset=f"npz:{path}", seed=1)).fingerprint != after


def test_imagefolder_ids_survive_added_files(tmp_path):
    root = write_imagefolder(tmp_path / "imgs")
    cfg = DataConfig(dataset=f"imagefolder:{root}:8")
    before = open_dataset(cfg)
    ids_before = {s: set(before.splits[s].sample_ids.tolist()) for s in SPLITS}
    from PIL import Image

    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(root / "test" / "cat" / "zzz.png")
    after = open_dataset(cfg)
    assert set(after.splits["test"].sample_ids.tolist()) > ids_before["test"]
    assert after.fingerprint != before.fingerprint


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("imagefolder:{tmp}/nowhere", "must hold train/ and test/"),
        ("imagefolder:{tmp}/imgs:big", "size 'big' is not an integer"),
        ("torchvision:MNIST", "not found under"),
        ("torchvision:IMAGENET", "unknown torchvision dataset 'IMAGENET'"),
        ("synthetic:10:8", "malformed"),
        ("synthetic:100:0x3", "malformed"),
        ("synthetic:100:8:1", "malformed"),
        ("synthetic:abc", "malformed"),
        ("npz:", "needs a path"),
        ("mnist", "unknown dataset 'mnist'"),
    ],
)
def test_bad_dataset_specs(tmp_path, spec, match):
    write_imagefolder(tmp_path / "imgs")
    cfg = DataConfig(dataset=spec.format(tmp=tmp_path), data_root=str(tmp_path / "empty"))
    with pytest.raises(KdError, match=match):
        open_dataset(cfg)


def test_synthetic_depends_on_seed_only_through_cfg():
    a = open_dataset(DataConfig(dataset="synthetic:100:8:3", seed=0))
    b = open_dataset(DataConfig(dataset="synthetic:100:8:3", seed=0))
    c = open_dataset(DataConfig(dataset="synthetic:100:8:3", seed=1))
    np.testing.assert_array_equal(a.inputs("train", 0, 80), b.inputs("train", 0, 80))
    assert not np.array_equal(a.inputs("train", 0, 80), c.inputs("train", 0, 80))
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert [len(a.splits[s]) for s in SPLITS] == [80, 10, 10]


def test_synthetic_rows_do_not_depend_on_read_ranges():
    ds = open_dataset(DataConfig(dataset="synthetic:3000:4:3"))  # spans generator blocks
    whole = ds.inputs("train", 0, 2400)
    parts = np.concatenate([ds.inputs("train", a, min(a + 700, 2400)) for a in range(0, 2400, 700)])
    np.testing.assert_array_equal(whole, parts)


@pytest.mark.parametrize(
    ("spec", "slug"),
    [("digits", "digits"), ("npz:/x/y/sig.npz", "npz-sig"), ("synthetic:500:8:3", "synthetic-500-8-3"),
     ("torchvision:MNIST", "torchvision-mnist"), ("imagefolder:/data/pets", "imagefolder-pets")],
)
def test_dataset_slug(spec, slug):
    assert dataset_slug(spec) == slug


# --------------------------------------------------------------------------- text

def _documents(ds) -> dict[int, str]:
    """Every document of a text dataset, by sample_id."""
    return {int(i): t for split in SPLITS
            for i, t in zip(ds.splits[split].sample_ids, ds.texts(split))}


def _open_text(path: Path, **cfg) -> Dataset:
    return open_dataset(DataConfig(dataset=f"text:{path}", **cfg))


def test_text_formats_read_the_same_rows(tmp_path):
    rows = text_rows(split=True)
    opened = [_open_text(write_table(tmp_path / f"mail.{suffix}", rows))
              for suffix in ("csv", "tsv", "jsonl", "parquet")]
    import pyarrow as pa
    import pyarrow.parquet as pq

    # a categorical column (pandas' category dtype saved to Parquet) reads as its values
    table = pa.Table.from_pylist(rows)
    for name in ("label", "split"):
        table = table.set_column(table.column_names.index(name), name,
                                 table.column(name).dictionary_encode())
    pq.write_table(table, tmp_path / "categorical.parquet")
    opened.append(_open_text(tmp_path / "categorical.parquet"))
    first = opened[0]
    # sample_id = the row's position in the file; the documents come back as written
    assert _documents(first) == {i: r["text"] for i, r in enumerate(rows)}
    for other in opened[1:]:
        assert other.describe()["classes"] == ["ham", "news", "spam"]
        for split in SPLITS:
            np.testing.assert_array_equal(other.splits[split].sample_ids, first.splits[split].sample_ids)
            np.testing.assert_array_equal(other.splits[split].labels, first.splits[split].labels)
            np.testing.assert_array_equal(other.texts(split), first.texts(split))


@pytest.mark.parametrize(("labels", "classes"), [
    (["spam", "ham", "news", "ham"], ["ham", "news", "spam"]),
    ([7, 3, 10, 3], [3, 7, 10]),  # sorted as numbers, not as text
    ([True, False], [False, True]),
])
def test_text_labels_map_to_sorted_class_ids(tmp_path, labels, classes):
    rows = text_rows(n=48, labels=labels)
    ds = _open_text(write_table(tmp_path / "mail.jsonl", rows))
    assert ds.describe()["classes"] == classes and ds.num_classes == len(classes)
    for split in SPLITS:
        for sample_id, label in zip(ds.splits[split].sample_ids, ds.splits[split].labels):
            assert classes[label] == rows[sample_id]["label"]
    # a CSV's integer and bool labels are read as such (not as text: "10" < "3")
    assert _open_text(write_table(tmp_path / "mail.csv", rows)).describe()["classes"] == classes


def test_text_split_column_is_honoured(tmp_path):
    rows = text_rows(n=100, split=True)
    rows[3]["split"] = " Test "  # case and spaces do not matter
    ds = _open_text(write_table(tmp_path / "mail.csv", rows))
    marked = lambda name: sorted(i for i, r in enumerate(rows) if r["split"].strip().lower() == name)
    for split in SPLITS:
        assert ds.splits[split].sample_ids.tolist() == marked(split)
    # without val rows, val is carved from the train rows only
    for r in rows:
        r["split"] = r["split"].replace("val", "train")
    ds = _open_text(write_table(tmp_path / "noval.csv", rows))
    assert ds.splits["test"].sample_ids.tolist() == marked("test")
    assert sorted(ds.splits["train"].sample_ids.tolist() + ds.splits["val"].sample_ids.tolist()) == marked("train")
    assert len(ds.splits["val"]) > 0


def test_text_carved_splits_are_stratified_and_seeded(tmp_path):
    path = write_table(tmp_path / "mail.parquet", text_rows(n=120))
    a, b, c = _open_text(path, seed=0), _open_text(path, seed=0), _open_text(path, seed=5)
    ids = lambda ds, split: ds.splits[split].sample_ids.tolist()
    for split in SPLITS:
        assert ids(a, split) == ids(b, split)
        assert set(a.splits[split].labels.tolist()) == {0, 1, 2}  # stratified: every class
    assert ids(a, "test") != ids(c, "test") and ids(a, "val") != ids(c, "val")
    assert len(a.splits["test"]) == 24  # test_fraction 0.2 of 120
    assert sorted(sum((ids(c, s) for s in SPLITS), [])) == list(range(120))
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert len(_open_text(path, test_fraction=0.5).splits["test"]) == 60


def test_text_sample_ids_stable_across_reopenings(tmp_path):
    path = write_table(tmp_path / "mail.csv", text_rows())
    first, again = _open_text(path), _open_text(path)
    assert _documents(first) == _documents(again)
    assert sorted(_documents(first)) == list(range(60))


def test_textdir_ids_survive_an_added_file(tmp_path):
    root = write_textdir(tmp_path / "docs", per_class=(10, 3))
    before = open_dataset(DataConfig(dataset=f"textdir:{root}"))
    (root / "train" / "ham" / "new.txt").write_text("a new document", encoding="utf-8")
    (root / "test" / "spam" / "new.txt").write_text("another new one", encoding="utf-8")
    after = open_dataset(DataConfig(dataset=f"textdir:{root}"))
    old, new = _documents(before), _documents(after)
    assert set(new) > set(old) and len(new) == len(old) + 2
    assert all(new[i] == text for i, text in old.items())  # each id names the same file
    assert after.fingerprint != before.fingerprint
    assert before.describe()["classes"] == ["ham", "spam"]


def test_textdir_reads_files_as_stored(tmp_path):
    root = write_textdir(tmp_path / "docs", per_class=(5, 2))
    doc = root / "train" / "ham" / "doc0.txt"
    doc.write_bytes("\ufeffcaf\u00e9\r\nna\u00efve\n".encode("utf-8"))  # an editor's BOM, CRLF
    ds = open_dataset(DataConfig(dataset=f"textdir:{root}"))
    assert "caf\u00e9\r\nna\u00efve\n" in _documents(ds).values()  # BOM dropped, CRLF kept


def test_text_fingerprint_sees_one_character_and_the_column(tmp_path):
    rows = text_rows()
    for r in rows:
        r["body"] = r["text"]  # the same documents under another column name
    path = write_table(tmp_path / "mail.csv", rows)
    before = _open_text(path).fingerprint
    rows[17]["text"] = rows[17]["text"][:-1] + "X"
    write_table(path, rows)
    after = _open_text(path).fingerprint
    assert after != before
    body = _open_text(path, text_column="body")
    assert body.fingerprint != after
    rows[17]["text"] = rows[17]["body"]
    write_table(path, rows)
    assert _open_text(path).fingerprint == before
    assert body.describe()["text_column"] == "body"


@pytest.mark.parametrize("kind", ["text", "textdir"])
def test_text_fingerprint_follows_the_documented_recipe(tmp_path, kind):
    """docs/CACHE_FORMAT.md gives the text fingerprint as code: it must be the code."""
    import hashlib

    if kind == "text":
        ds = _open_text(write_table(tmp_path / "mail.csv", text_rows(split=True)))
        columns = ["text", "label"]
    else:
        ds = open_dataset(DataConfig(dataset=f"textdir:{write_textdir(tmp_path / 'docs')}"))
        columns = [None, None]
    h = hashlib.sha256(repr((ds.spec, (), ds.num_classes)).encode())
    h.update(repr(sorted({"text": "utf-8, as stored", "normalise": "none"}.items())).encode())
    for split in SPLITS:
        h.update(split.encode())
        h.update(ds.splits[split].sample_ids.astype("<i8").tobytes())
        h.update(ds.splits[split].labels.astype("<i8").tobytes())
        for doc in ds.texts(split):
            b = doc.encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    expected = hashlib.sha256(h.hexdigest().encode() + json.dumps(
        {"classes": ds.classes, "columns": columns}, sort_keys=True).encode()).hexdigest()
    assert ds.fingerprint == expected


def test_text_csv_with_bom_crlf_and_multiline_fields(tmp_path):
    path = tmp_path / "excel.csv"
    lines = ["text,label"] + [f'"doc {i}, ""quoted""\r\nsecond line",{"ab"[i % 2]}' for i in range(20)]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8") + b"\r\n")
    docs = _documents(_open_text(path))
    assert docs[3] == 'doc 3, "quoted"\r\nsecond line'  # a quoted field keeps its line end
    tsv = tmp_path / "mail.tsv"
    tsv.write_text("text\tlabel\n" + "".join(f'a "b" {i}, c\t{"xy"[i % 2]}\n' for i in range(20)),
                   encoding="utf-8")
    assert _documents(_open_text(tsv))[4] == 'a "b" 4, c'  # a quote inside a field is text
    # a column of numbers or dates is still text when it is the text column
    numbers = write_table(tmp_path / "numbers.csv", [{"text": str(i), "label": i % 2} for i in range(20)])
    assert _documents(_open_text(numbers))[7] == "7"


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1 << 20])
def test_text_utf8_check_names_line_and_byte_across_chunks(tmp_path, chunk):
    from pipeline.data.text import _check_utf8

    path = tmp_path / "mail.csv"
    data = "text,label\nna\u00efve \u20ac,a\n".encode("utf-8")
    path.write_bytes(data + b"caf\xe9,b\n")  # Latin-1 é on line 3
    with pytest.raises(KdError, match=rf"line 3, byte {len(data) + 3}\)"):
        _check_utf8(path, chunk=chunk)
    path.write_bytes(data * 3)  # multi-byte characters cut by every chunk size: valid
    _check_utf8(path, chunk=chunk)


DOCUMENT = st.text(st.one_of(st.characters(exclude_categories=("Cs",)),
                             st.sampled_from(list('\n\r,"\t\' \\'))), min_size=1, max_size=30)


@given(docs=st.lists(DOCUMENT.filter(str.strip), min_size=1, max_size=12))
@hypothesis.example(docs=['a,"b"\r\nc', "\ufeffbom", "nul\x00", " lead", "trail\n", "\u2028\U0001f600", "NA", "42"])
def test_text_round_trip_is_byte_identical(tmp_path_factory, docs):
    tmp = tmp_path_factory.mktemp("round")
    rows = [{"text": d, "label": "ab"[i % 2], "split": "train"} for i, d in enumerate(docs)]
    rows += [{"text": f"pad {i}", "label": "ab"[i % 2], "split": ["train", "test"][i // 6]}
             for i in range(8)]  # enough rows of both classes for every split
    for suffix in ("csv", "jsonl"):
        got = _documents(_open_text(write_table(tmp / f"docs.{suffix}", rows)))
        assert [got[i].encode("utf-8") for i in range(len(docs))] == [d.encode("utf-8") for d in docs]


# --------------------------------------------------------------------------- bad npz files

def _bad_npz(tmp: Path, case: str) -> Path:
    path = tmp / "bad.npz"
    x = lambda *shape: np.zeros(shape, np.float32)
    if case == "missing file":
        return tmp / "missing.npz"
    if case == "not a zip":
        path.write_bytes(b"this is not a zip archive")
        return path
    if case == "missing key":
        return write_npz(path, y_test=None)
    if case == "x_val without y_val":
        return write_npz(path, x_val=x(4, 6))
    if case == "x with NaN":
        bad = np.ones((60, 6), np.float32)
        bad[7, 1] = np.nan
        return write_npz(path, x_train=bad)
    if case == "x with inf":
        bad = np.ones((20, 6), np.float64)
        bad[2, 0] = -np.inf
        return write_npz(path, x_test=bad)
    if case == "y float":
        return write_npz(path, y_train=(np.arange(60) % 3).astype(np.float32))
    if case == "y negative":
        return write_npz(path, y_test=np.arange(20) % 3 - 1)
    if case == "label missing from y_train":
        return write_npz(path, y_test=np.full(20, 7))
    if case == "y 2-d":
        return write_npz(path, y_train=np.zeros((60, 3), np.int64))
    if case == "y length":
        return write_npz(path, y_train=np.arange(59) % 3)
    if case == "shape mismatch":
        return write_npz(path, x_test=x(20, 7))
    if case == "x bool":
        return write_npz(path, x_train=np.ones((60, 6), bool))
    if case == "x complex":
        return write_npz(path, x_train=np.ones((60, 6), np.complex64))
    if case == "x 5-d":
        return write_npz(path, x_train=x(60, 1, 2, 2, 2))
    if case == "single class":
        return write_npz(path, y_train=np.zeros(60, np.int64), y_test=np.zeros(20, np.int64))
    if case == "empty test":
        return write_npz(path, x_test=x(0, 6), y_test=np.zeros(0, np.int64))
    raise AssertionError(case)


BAD_NPZ = {
    "missing file": "does not exist",
    "not a zip": "not a readable .npz archive",
    "missing key": "has no array 'y_test'",
    "x_val without y_val": "has no array 'y_val'",
    "x with NaN": "x_train has 1 rows with NaN or inf",
    "x with inf": "x_test has 1 rows with NaN or inf",
    "y float": "y_train has dtype float32; labels must be integers",
    "y negative": "y_test has negative labels",
    "label missing from y_train": r"labels must be 0..7 .* missing from y_train: \[3, 4, 5, 6, 7\]",
    "y 2-d": r"y_train has shape \(60, 3\)",
    "y length": r"y_train has shape \(59,\); expected \(60,\)",
    "shape mismatch": r"x_test rows have shape \(7,\) but x_train rows have \(6,\)",
    "x bool": "x_train has dtype bool; it must be a real numeric array",
    "x complex": "x_train has dtype complex64; it must be a real numeric array",
    "x 5-d": "x_train has shape",
    "single class": "single class",
    "empty test": "x_test is empty",
}


@pytest.mark.parametrize("case", sorted(BAD_NPZ))
def test_bad_npz_is_refused(tmp_path, case):
    path = _bad_npz(tmp_path, case)
    with pytest.raises(KdError, match=BAD_NPZ[case]) as info:
        open_dataset(DataConfig(dataset=f"npz:{path}"))
    assert "\n" not in str(info.value)


def test_digits3_numbers_are_built_from_disjoint_source_images():
    """No source digit appears in two splits; every number 000-999 equally often in each
    split; an image is its three digits side by side, hundreds first."""
    from sklearn.datasets import load_digits

    from pipeline.data.digits3 import PER_CLASS, compose, source_pools

    pools = source_pools()
    assert sum(len(p) for p in pools.values()) == 1797
    target, images = load_digits().target, load_digits().images.astype(np.float32)
    used = {}
    for split, pool in pools.items():
        labels, sources = compose(split, pool, target)
        used[split] = set(sources.ravel().tolist())
        assert used[split] <= set(pool.tolist())
        assert np.bincount(labels, minlength=1000).tolist() == [PER_CLASS[split]] * 1000
        assert (target[sources] == np.stack([labels // 100, labels // 10 % 10, labels % 10], 1)).all()
    assert not (used["train"] & used["val"]) and not (used["train"] & used["test"]) and not (used["val"] & used["test"])
    dataset = open_dataset(DataConfig(dataset="digits3"))
    row = dataset.splits["test"].sample_ids.tolist().index(28000 + 386)  # the number 386
    labels, sources = compose("test", pools["test"], target)
    raw = dataset.pools["test"].read(np.array([row]))[0, 0]
    np.testing.assert_array_equal(raw, np.concatenate([images[s] for s in sources[386]], axis=1))
    assert dataset.splits["test"].labels[row] == 386
