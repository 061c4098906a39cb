"""Text teachers (``teacher=hf:DIR``) and text caches, on the tiny random BERT and the 3-class
corpus of tests/text_models.py (session fixtures, nothing downloaded): cache builds (dense and
topk), length bucketing against a reference forward of each row alone, token-id hashes in the
manifest, verify, head training and its checkpoint, and the one-line refusals."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import tokens
from pipeline.cache import open_cache
from pipeline.config import CacheConfig
from pipeline.errors import KdError
from pipeline.settings import resolve
from pipeline.teachers import TeacherSpec, build_teacher
from stages.cli import main


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def cache_cmd(corpus: Path, model: Path, root: Path, *extra: str) -> list[str]:
    return ["cache", f"dataset=text:{corpus}", f"teacher=hf:{model}", "teacher_ckpt=random",
            f"cache={root}", "shard_size=96", "infer_batch_size=16", *extra]


@pytest.fixture(scope="session")
def head_teacher(tmp_path_factory, text_corpus, tiny_bert) -> Path:
    """``kdcache teacher`` on the corpus: a trained head (finetune=head), its folder."""
    teachers = tmp_path_factory.mktemp("teachers")
    code, out, err = run("teacher", f"dataset=text:{text_corpus}", f"teacher=hf:{tiny_bert}",
                         f"teacher_dir={teachers}", "epochs=60", "lr=0.05")
    assert code == 0, err
    (folder,) = (teachers / "text-mail").iterdir()
    return folder


def reference_logits(model, texts) -> np.ndarray:
    """Each document through the model alone: tokenized by itself, padded nowhere."""
    out = []
    with torch.inference_mode():
        for text in texts:
            ids, _ = model.tokenize([text])
            x = torch.tensor(ids)
            out.append(model(x, torch.ones_like(x))[0][0].numpy())
    return np.stack(out)


def test_text_cache_rows_join_the_documents(text_cache, text_corpus):
    cache = open_cache(text_cache)
    m = cache.manifest
    dataset = cache.open_dataset()
    assert m["dataset"]["modality"] == "text" and m["teacher"]["max_length"] == 128
    assert set(m["tokenizer"]) >= {"fingerprint", "vocab_size", "max_length", "truncation", "padding_side"}
    for split in ("train", "val", "test"):
        index = cache.index(split).to_pydict()
        assert index["sample_id"] == dataset.splits[split].sample_ids.tolist()
        assert index["label"] == dataset.splits[split].labels.tolist()
        # tokens: each row's own count, as the tokenizer gives it; none of these is truncated
        counts = [len(ids) for ids in build_teacher(TeacherSpec.of_record(m["teacher"])).tokenize(
            dataset.texts(split))[0]]
        assert index["tokens"] == counts and not any(index["truncated"])
        assert m["tokens"][split]["tokens"] == sum(counts)
        assert cache.raw_logits(split, 0).shape == (len(counts), 3)
    assert m["layers"] == {"mean.-1": [32]}


def test_bucketed_batches_give_each_rows_own_logits(text_cache):
    """Batches of rows sorted by length, padded to their longest, scattered back: each row's
    cached logits and features are those of the row run alone, padded nowhere."""
    cache = open_cache(text_cache)
    model = build_teacher(TeacherSpec.of_record(cache.manifest["teacher"]))
    dataset = cache.open_dataset()
    for split in ("train", "test"):
        texts = dataset.texts(split)
        np.testing.assert_allclose(cache.raw_logits(split, 0), reference_logits(model, texts),
                                   rtol=1e-4, atol=1e-5)
    # and the shards really were bucketed: rows of one batch differ in length by less than
    # their shard's spread (the corpus's lengths vary from ~6 to ~40 tokens)
    lengths = np.array([len(r) for r in model.tokenize(dataset.texts("train")[:96])[0]])
    batches = tokens.buckets(lengths, 16)
    assert all(np.ptp(lengths[b]) < np.ptp(lengths) / 2 for b in batches)


def test_tokens_helpers():
    h1, h2 = __import__("hashlib").sha256(), __import__("hashlib").sha256()
    tokens.update_hash(h1, [[1, 2], [3]])
    tokens.update_hash(h2, [[1], [2, 3]])  # the same ids cut otherwise: another hash
    assert h1.hexdigest() != h2.hexdigest()
    ids, mask = tokens.pad([[5, 6, 7], [8]], 0, "left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert [b.tolist() for b in tokens.buckets(np.array([3, 1, 2, 1]), 2)] == [[1, 3], [2, 0]]


def test_topk_cache_and_inputs_hash_independent_of_batching(tmp_path, text_corpus, tiny_bert, text_cache):
    code, out, err = run(*cache_cmd(text_corpus, tiny_bert, tmp_path / "topk", "logits=topk:2",
                                    "infer_batch_size=7"))
    assert code == 0, err
    topk, dense = open_cache(tmp_path / "topk"), open_cache(text_cache)
    assert topk.sparse_logits("train", 0).classes.shape == (dense.num_rows("train"), 2)
    # token ids hashed in row order: the same whatever the batches
    assert [r["inputs_sha256"] for r in topk.manifest["shards"]["train"]] == \
        [r["inputs_sha256"] for r in dense.manifest["shards"]["train"]]
    assert topk.manifest["tokens"] == dense.manifest["tokens"]
    np.testing.assert_array_equal(topk.sparse_logits("val", 0).classes[:, 0],
                                  dense.raw_logits("val", 0).argmax(1))


def test_max_length_changes_the_token_ids_and_the_key(tmp_path, text_corpus, tiny_bert, text_cache):
    code, out, err = run(*cache_cmd(text_corpus, tiny_bert, tmp_path / "short", "dtype=float32",
                                    "max_length=12"))
    assert code == 0, err
    short, full = open_cache(tmp_path / "short").manifest, open_cache(text_cache).manifest
    assert short["tokenizer"]["max_length"] == 12
    assert short["tokens"]["train"]["sha256"] != full["tokens"]["train"]["sha256"]
    assert short["key"] != full["key"] and short["teacher"]["fingerprint"] != full["teacher"]["fingerprint"]
    index = open_cache(tmp_path / "short").index("train").to_pydict()
    assert max(index["tokens"]) == 12 and any(index["truncated"])
    assert short["tokens"]["train"]["truncated"] == sum(index["truncated"])
    # the same cache= with another max_length: refused, naming the difference
    code, out, err = run(*cache_cmd(text_corpus, tiny_bert, text_cache, "dtype=float32", "max_length=12"))
    assert code == 2 and "another tokenization (max_length 128 vs 12)" in err, err


def test_verify_passes_and_names_a_changed_tokenizer(tmp_path, text_corpus, tiny_bert):
    from tests.text_models import train_tokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_bert, model)
    root = tmp_path / "cache"
    assert run(*cache_cmd(text_corpus, model, root))[0] == 0
    code, out, err = run("verify", f"cache={root}", "rows=40")
    assert code == 0, out + err
    assert "token ids                ok (240 rows re-tokenized" in out
    # the model directory's tokenizer replaced by another vocabulary
    train_tokenizer(["alpha beta gamma delta"] * 20, vocab_size=60).save_pretrained(model)
    code, out, err = run("verify", f"cache={root}", "rows=40")
    assert code == 1
    assert "teacher fingerprint      FAILED: teacher hf:" in out and "now tokenizes differently" in out
    assert "(vocabulary 196 vs" in out, out


def test_head_training_beats_chance_and_loads_only_on_its_model(head_teacher, tmp_path, text_corpus, tiny_bert):
    metrics = json.loads((head_teacher / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.6 and metrics["val_accuracy"] > 0.6  # 3 classes: chance 1/3
    from safetensors import safe_open

    with safe_open(str(head_teacher / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["head.bias", "head.weight"]  # the encoder stays the directory's
    ckpt = head_teacher / "model.safetensors"
    spec = TeacherSpec(f"hf:{tiny_bert}", (), 3, str(ckpt), max_length=128)
    teacher = build_teacher(spec)
    assert torch.equal(teacher.head.weight, build_teacher(spec).head.weight)
    # another model directory (same tokenizer, other encoder weights) refuses that head
    from tests.text_models import corpus_texts, write_tiny_bert

    other = write_tiny_bert(tmp_path / "other", corpus_texts(text_corpus), seed=1)
    with pytest.raises(KdError, match=r"was trained on another model .*; pass the teacher=hf: it was "
                                      r"trained on, or train a head for this one with kdcache teacher$"):
        build_teacher(TeacherSpec(f"hf:{other}", (), 3, str(ckpt), max_length=128))
    # and kdcache cache finds the trained head by itself (the same key)
    code, out, err = run("cache", f"dataset=text:{text_corpus}", f"teacher=hf:{tiny_bert}",
                         f"teacher_dir={head_teacher.parent.parent}", "epochs=60", "lr=0.05",
                         f"cache={tmp_path / 'trained'}")
    assert code == 0 and "training one first" not in out, err
    assert f"test {metrics['test_accuracy']:.4f}" in out


def test_full_finetune_trains_every_weight(tmp_path, text_corpus, tiny_bert):
    code, out, err = run("teacher", f"dataset=text:{text_corpus}", f"teacher=hf:{tiny_bert}",
                         f"teacher_dir={tmp_path}", "finetune=full", "epochs=2", "lr=1e-3", "batch_size=32")
    assert code == 0, err
    (folder,) = (tmp_path / "text-mail").iterdir()
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert len(list(f.keys())) > 2 and f.metadata()["kdcache.hf.finetune"] == "full"
    teacher = build_teacher(TeacherSpec(f"hf:{tiny_bert}", (), 3, str(folder / "model.safetensors")))
    pretrained = build_teacher(TeacherSpec(f"hf:{tiny_bert}", (), 3, "random"))
    name = "encoder.embeddings.word_embeddings.weight"
    assert not torch.equal(teacher.state_dict()[name], pretrained.state_dict()[name])


def test_teacher_side_of_costs_takes_text(text_cache, monkeypatch):
    from pipeline import costs, latency

    # one timed call per batch size: a BERT over 256 documents against len() needs no median
    # of many calls to be the slower, and the default protocol spends seconds on it
    monkeypatch.setattr(latency, "MIN_CALLS", 1)
    monkeypatch.setattr(latency, "MIN_SECONDS", 0.0)
    cache = open_cache(text_cache)
    timed = costs.compare(cache, {"len": lambda texts: [len(t) for t in texts]})
    assert timed["len"]["teacher_b256_ms"] > timed["len"]["student_b256_ms"] > 0


@pytest.mark.parametrize("teacher, message", [
    ("auto", r"teacher=auto picks array teachers, but text:.*mail.csv holds text; pass teacher=hf:DIR"),
    ("cnn_small", r"teacher cnn_small reads arrays, but text:.*mail.csv holds text; pass teacher=hf:DIR"),
    ("hf:no-such-org/no-such-model", r"model 'no-such-org/no-such-model' is neither a local directory "
     r"nor in the local Hugging Face cache, and kdcache never downloads; fetch it once with internet: "
     r"python -c \"from huggingface_hub import snapshot_download; "
     r"snapshot_download\('no-such-org/no-such-model'\)\""),
])
def test_refused_teachers(text_corpus, tmp_path, teacher, message):
    code, out, err = run("cache", f"dataset=text:{text_corpus}", f"teacher={teacher}",
                         "teacher_ckpt=random", f"cache={tmp_path / 'c'}")
    assert code == 2 and err.count("\n") == 1 and __import__("re").search(message, err), err
    assert not (tmp_path / "c").exists()


def test_hf_on_arrays_refused(tiny_bert, tmp_path):
    code, out, err = run("cache", "dataset=digits", f"teacher=hf:{tiny_bert}", "teacher_ckpt=random",
                         f"cache={tmp_path / 'c'}")
    assert code == 2 and f"teacher hf:{tiny_bert} reads text, but digits holds arrays shaped (1, 8, 8)" in err


def test_text_keys_are_moot_for_other_teachers():
    with pytest.raises(KdError, match=r"max_length= applies to text teachers \(teacher=hf:DIR\), not "
                                      r"teacher=cnn_small; drop max_length="):
        resolve(CacheConfig, ["teacher=cnn_small", "max_length=64"])
    assert resolve(CacheConfig, ["teacher=hf:some/model", "max_length=64"]).max_length == 64
