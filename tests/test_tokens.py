"""Token datasets (``tokens:PATH``, pipeline/data/tokens.py) and the language-model teacher that
`kdcache teacher` trains without a download (pipeline/lm_teacher.py)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipeline.config import DataConfig
from pipeline.data import open_dataset
from pipeline.data.tokens import TokenDataset, split_documents, tokenize
from pipeline.errors import KdError


@pytest.fixture(scope="session")
def tokenizer(tiny_llama):
    from pipeline.hf import load_tokenizer

    return load_tokenizer(tiny_llama)


def dataset(tok, directory, train: list[str], seq_len: int, pack: bool = True,
            val: list[str] = ("a val document.",), test: list[str] = ("a test document.",)) -> TokenDataset:
    """A TokenDataset of these documents (no file: the windows' logic alone)."""
    cfg = DataConfig(dataset="tokens:x.txt", tokenizer=str(directory), seq_len=seq_len, pack=pack)
    return TokenDataset("tokens:x.txt", {"train": list(train), "val": list(val), "test": list(test)},
                        tok, directory, cfg)


def check_window_fields(w: dict[str, np.ndarray], eos: int) -> None:
    """The invariants of windows(): mask = next position real; segments count documents from
    0, -1 on padding; positions count within a document (0 on padding), restarting after an
    EOS."""
    ids, mask, seg, pos = w["ids"], w["mask"], w["segments"], w["positions"]
    real = seg >= 0
    T = ids.shape[1]
    assert ids.dtype == np.int64 and mask.dtype == bool and seg.dtype == np.int32 and pos.dtype == np.int32
    assert not mask[:, -1].any()  # the last position's target is in no window
    assert (mask[:, :-1] == real[:, 1:]).all()  # position j has a target iff token j+1 is real
    assert (pos[~real] == 0).all()
    for b in range(len(ids)):
        n = int(real[b].sum())
        assert real[b, :n].all() and not real[b, n:].any()  # padding only at the right
        assert seg[b, 0] == 0 or n == 0
        for j in range(1, n):
            if ids[b, j - 1] == eos:  # a document ended: the next one starts
                assert seg[b, j] == seg[b, j - 1] + 1 and pos[b, j] == 0
            else:
                assert seg[b, j] == seg[b, j - 1] and pos[b, j] == pos[b, j - 1] + 1
    assert T == ids.shape[1]


# Documents that stress a byte-level tokenizer: any unicode, spaces, newlines inside.
DOCS = st.lists(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)
                .filter(lambda s: s.strip()), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=DOCS, seq_len=st.integers(2, 24))
def test_packed_windows_are_the_token_stream(tokenizer, tiny_llama, docs, seq_len):
    """Concatenating the packed windows' real tokens gives tokenize(doc) + EOS of each
    document in order, and nothing else; the fields agree with the stream at every boundary."""
    expected = tokenize(tokenizer, docs)
    stream = [t for row in expected for t in row]
    assume(len(stream) >= seq_len)
    data = dataset(tokenizer, tiny_llama, docs, seq_len)
    n = len(data.splits["train"])
    assert n == -(-len(stream) // seq_len)
    w = data.windows("train", 0, n)
    got = w["ids"][w["segments"] >= 0]
    assert got.tolist() == stream
    assert (w["ids"][w["segments"] < 0] == data.pad_id).all()
    check_window_fields(w, data.eos_id)
    # positions and segments name each token's document and offset exactly
    starts = np.cumsum([0] + [len(r) for r in expected])
    offsets = np.arange(len(stream))
    doc_of = np.searchsorted(starts, offsets, side="right") - 1
    assert w["positions"][w["segments"] >= 0].tolist() == (offsets - starts[doc_of]).tolist()
    first_doc = doc_of[np.arange(n) * seq_len]
    segs = doc_of - np.repeat(first_doc, seq_len)[:len(stream)]
    assert w["segments"][w["segments"] >= 0].tolist() == segs.tolist()
    # the byte-level tokenizer loses nothing: each document decodes back to itself
    assert [tokenizer.decode(r[:-1]) for r in expected] == docs
    # any rows, in any order, read the same
    rows = np.random.default_rng(0).permutation(n)
    again = data.windows_at("train", rows)
    for k in w:
        assert (again[k] == w[k][rows]).all()
    assert (data.inputs("train", 0, n) == w["ids"]).all()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=DOCS, seq_len=st.integers(2, 24))
def test_unpacked_windows_truncate_each_document(tokenizer, tiny_llama, docs, seq_len):
    expected = tokenize(tokenizer, docs)
    data = dataset(tokenizer, tiny_llama, docs, seq_len, pack=False)
    w = data.windows("train", 0, len(docs))
    assert len(data.splits["train"]) == len(docs)
    for b, row in enumerate(expected):
        keep = row[:seq_len]
        real = w["segments"][b] >= 0
        assert w["ids"][b][real].tolist() == keep
        assert (w["segments"][b][real] == 0).all()
        assert w["positions"][b][real].tolist() == list(range(len(keep)))
        assert w["mask"][b].sum() == len(keep) - 1
    check_window_fields(w, data.eos_id)


def test_boundaries_by_hand(tokenizer, tiny_llama):
    """Two documents of known lengths, packed in windows of 4: a window that starts inside a
    document continues its positions; the EOS's next token starts segment 1; the tail is padded."""
    a, b = "the cat sees the dog by the river.", "a ship!"
    ra, rb = tokenize(tokenizer, [a, b])
    data = dataset(tokenizer, tiny_llama, [a, b], 4)
    w = data.windows("train", 0, len(data.splits["train"]))
    stream = ra + rb
    k = len(ra) // 4  # the window where document a ends (its EOS at offset len(ra) - 1)
    j = (len(ra) - 1) % 4
    assert w["ids"][k, j] == data.eos_id and w["positions"][k, j] == len(ra) - 1
    if j + 1 < 4:
        assert w["segments"][k, j + 1] == 1 and w["positions"][k, j + 1] == 0 and w["mask"][k, j]
    assert w["positions"][1, 0] == 4 and w["segments"][1, 0] == 0  # a continues into window 1
    last = len(stream) % 4
    if last:
        assert (w["segments"][-1, last:] == -1).all() and (w["ids"][-1, last:] == data.pad_id).all()
        assert not w["mask"][-1, last - 1:].any() and w["mask"][-1, :last - 1].all()


def test_corpus_file_splits_documents_and_ids_are_stable(token_corpus, tiny_llama):
    cfg = DataConfig(dataset=f"tokens:{token_corpus}", tokenizer=str(tiny_llama), seq_len=32)
    data, again = open_dataset(cfg), open_dataset(cfg)
    docs = split_documents(token_corpus.read_text())
    assert sorted(sum((data.texts(s) for s in ("train", "val", "test")), [])) == sorted(docs)
    assert len(docs) == 200 and sum(data.describe()["documents"].values()) == 200
    for s in ("train", "val", "test"):
        split = data.splits[s]
        assert (split.labels == 0).all() and (split.sample_ids == again.splits[s].sample_ids).all()
        assert data.inputs(s, 0, 2).shape == (2, 32)
    ids = np.concatenate([data.splits[s].sample_ids for s in ("train", "val", "test")])
    assert len(np.unique(ids)) == len(ids) and (ids >= 0).all()
    assert data.modality == "tokens" and data.input_shape == (32,)
    assert data.num_classes == len(data.tokenizer) == data.describe()["tokenizer"]["vocab_size"]
    assert data.fingerprint == again.fingerprint
    # a window rebuilt from its documents' text alone is the stored one
    rows = np.array([0, 3, len(data.splits["val"]) - 1])
    fresh, stored = data.retokenized("val", rows), data.windows_at("val", rows)
    for k in stored:
        assert (fresh[k] == stored[k]).all(), k
    unpacked = open_dataset(DataConfig(dataset=f"tokens:{token_corpus}", tokenizer=str(tiny_llama),
                                       seq_len=16, pack=False))
    fresh = unpacked.retokenized("test", np.array([1, 2]))
    assert all((fresh[k] == unpacked.windows_at("test", np.array([1, 2]))[k]).all() for k in fresh)


def test_fingerprint_covers_seq_len_pack_tokenizer_and_text(token_corpus, tiny_llama, tmp_path):
    from tests.lm_models import corpus_documents, train_tokenizer

    def fp(path=token_corpus, tok=tiny_llama, **kw):
        return open_dataset(DataConfig(dataset=f"tokens:{path}", tokenizer=str(tok), **kw)).fingerprint

    other_tok = tmp_path / "tok"
    train_tokenizer(corpus_documents(token_corpus), vocab_size=280).save_pretrained(other_tok)
    edited = tmp_path / "stories.txt"
    edited.write_text(token_corpus.read_text().replace("cat", "cot", 1))
    base = fp()
    others = [fp(seq_len=64), fp(pack=False), fp(tok=other_tok), fp(path=edited)]
    assert base == fp() and len({base, *others}) == 5


def test_tables_and_folders(tmp_path, tiny_llama):
    from tests.lm_models import documents

    docs = documents(60, seed=3)
    path = tmp_path / "docs.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["body", "split"])
        for i, d in enumerate(docs):
            writer.writerow([d, "test" if i % 5 == 0 else "train"])
    data = open_dataset(DataConfig(dataset=f"tokens:{path}", tokenizer=str(tiny_llama), seq_len=16,
                                   text_column="body"))
    assert data.texts("test") == docs[::5]  # the split column decides; val is carved from train
    assert sorted(data.texts("train") + data.texts("val")) == sorted(d for i, d in enumerate(docs) if i % 5)
    folder = tmp_path / "folder"
    (folder / "b").mkdir(parents=True)
    (folder / "a.txt").write_text("\n\n".join(docs[:30]))
    (folder / "b" / "c.txt").write_text("\n\n".join(docs[30:]) + "\n\n\n")
    data = open_dataset(DataConfig(dataset=f"tokens:{folder}", tokenizer=str(tiny_llama), seq_len=16))
    assert sorted(sum((data.texts(s) for s in ("train", "val", "test")), [])) == sorted(docs)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda p, c: {"dataset": f"tokens:{p / 'nothing.txt'}"}, r"tokens path .*nothing.txt does not exist"),
    (lambda p, c: {"tokenizer": ""}, r"needs a tokenizer: pass tokenizer=DIR"),
    (lambda p, c: {"tokenizer": str(p)}, r"is not a Hugging Face tokenizer folder"),
    (lambda p, c: {"seq_len": 50000}, r"the train split holds \d+ tokens, fewer than one window of seq_len=50000"),
])
def test_refused(tmp_path, token_corpus, tiny_llama, edit, message):
    args = {"dataset": f"tokens:{token_corpus}", "tokenizer": str(tiny_llama), "seq_len": 16}
    args.update(edit(tmp_path, token_corpus))
    with pytest.raises(KdError, match=message):
        open_dataset(DataConfig(**args))


def test_the_teacher_trained_without_a_download(tmp_path, token_corpus, capsys):
    """`kdcache teacher dataset=tokens:PATH` trains a BPE and a small Llama; its held-out
    perplexity falls below uniform; the folder is a HF model directory (teacher=hf: loads it,
    tokenizer= opens the data with it); the same command finds it instead of training again."""
    from stages.cli import main
    from transformers import AutoModelForCausalLM, AutoTokenizer

    argv = ["teacher", f"dataset=tokens:{token_corpus}", f"teacher_dir={tmp_path}", "epochs=2",
            "batch_size=8", "seq_len=64", "vocab_size=300", "lr=0.003"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert err.count("teacher lm: epoch") == 2 and "val ppl" in err
    folder = Path(out.strip().splitlines()[-1].split()[1])
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["test_perplexity"] < 0.2 * metrics["uniform_perplexity"] == 60
    assert metrics["val_perplexity"] < 60 and 0 < metrics["params"] < 2_000_000
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == len(tok) == 300
    data = open_dataset(DataConfig(dataset=f"tokens:{token_corpus}", tokenizer=str(folder), seq_len=64))
    assert data.tokenizer_record["fingerprint"] == metrics["tokenizer"]
    assert main(argv) == 0  # found, not trained again
    assert "epoch" not in capsys.readouterr().err
