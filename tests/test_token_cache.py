"""Token caches: a causal-LM teacher (``teacher=hf:DIR``, pipeline.hf_lm) over a token dataset's
windows (``dataset=tokens:PATH``), cached per position (pipeline.cache, format 4).

Every expectation is checked against an independent reference: the teacher's own
``model(input_ids).logits`` and ``model(input_ids, labels=ids).loss`` from transformers, on the
tiny random Llama and GPT-2 (padded outputs) of tests/lm_models.py (offline, seconds).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from pipeline.cache.build import build_cache
from pipeline.cache.plan import prepare
from pipeline.cache.reader import open_cache
from pipeline.cache.verify import verify
from pipeline.config import CacheConfig
from pipeline.data import open_dataset
from pipeline.errors import KdError
from pipeline.settings import resolve

pytest.importorskip("transformers")


def build(tmp_path, corpus, teacher, *extra, name="cache", tokenizer=None):
    """A token cache of ``corpus`` by ``teacher`` (seq_len 24, float32, on the CPU)."""
    cfg = resolve(CacheConfig, [f"dataset=tokens:{corpus}", f"teacher=hf:{teacher}", f"tokenizer={tokenizer or teacher}",
                                "seq_len=24", f"cache={tmp_path / name}", "dtype=float32", "device=cpu", *extra])
    dataset = open_dataset(cfg)
    cfg, tspec, manifest = prepare(cfg, dataset, cfg.teacher, "pretrained")
    build_cache(tmp_path / name, cfg, dataset, tspec, manifest, progress=False)
    return open_cache(tmp_path / name), dataset


def reference(folder, ids: np.ndarray) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.float().numpy()


# --------------------------------------------------------------------------- tests

def test_topk_per_position_is_the_teachers_own_logits_at_that_position(token_corpus, tiny_llama, tmp_path):
    cache, dataset = build(tmp_path, token_corpus, tiny_llama, "logits=topk:8", "shard_size=32", "chunk_size=8")
    assert cache.manifest["format_version"] == 4
    lm = cache.lm
    assert lm["seq_len"] == 24 and lm["pack"] is True and lm["vocab_size"] == lm["outputs"] == dataset.num_classes
    batch = next(cache.token_batches("train", 10_000, shuffle=False))  # the whole split
    assert len(batch) == cache.num_rows("train")
    w = dataset.windows("train", 0, len(batch))
    assert np.array_equal(batch.ids, w["ids"]) and np.array_equal(batch.mask, w["mask"])
    assert np.array_equal(batch.segments, w["segments"])
    ref = reference(tiny_llama, w["ids"])  # independent: transformers' own forward
    real = w["segments"] >= 0
    order = np.argsort(-ref, axis=-1, kind="stable")[..., :8]
    assert np.array_equal(batch.classes[real], order[real])
    np.testing.assert_allclose(batch.values[real], np.take_along_axis(ref, order, -1)[real], rtol=1e-4, atol=1e-4)
    rest = np.log(np.exp(ref).sum(-1) - np.exp(np.take_along_axis(ref, order, -1)).sum(-1))
    np.testing.assert_allclose(batch.tail[real][:, 0], rest[real], rtol=1e-3, atol=1e-3)
    assert (batch.classes[~real] == 0).all() and (batch.values[~real] == 0).all()  # padding: zeros
    # the stored next token at j is ids[j + 1]; masked positions are exactly the last and padding
    nxt = batch.next_tokens()
    assert np.array_equal(nxt[:, :-1][batch.mask[:, :-1]], batch.ids[:, 1:][batch.mask[:, :-1]])
    assert not batch.mask[:, -1].any()
    expected = np.zeros_like(real)
    expected[:, :-1] = real[:, 1:]
    assert np.array_equal(batch.mask, expected) and (~real).any()  # the last window is padded


def test_teacher_nll_from_the_cache_is_the_models_own_shifted_loss(token_corpus, tiny_llama, tmp_path):
    """The index's mean NLL equals transformers' ``model(ids, labels=ids).loss`` per window
    (its labels shifted inside the model), and at T = 1 the top-K plus tail give the exact
    log-probability of the true next token wherever it is among the K."""
    from transformers import AutoModelForCausalLM

    cache, dataset = build(tmp_path, token_corpus, tiny_llama, "logits=topk:32", "pack=false")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    index = cache.index("val").to_pydict()
    batch = next(cache.token_batches("val", 64, shuffle=False))
    for r in range(len(batch)):
        n = int((batch.segments[r] >= 0).sum())
        ids = torch.from_numpy(batch.ids[r:r + 1, :n])
        with torch.no_grad():
            loss = model(ids, labels=ids).loss.item()
        assert index["tokens"][r] == n - 1
        assert abs(index["nll"][r] - loss) < 1e-4
    batch = next(cache.token_batches("train", 10_000, shuffle=False))
    targets = batch.sparse().targets(1.0)
    nxt = batch.next_tokens()[batch.mask]
    hit = targets["t_ids"] == nxt[:, None]
    ref = reference(tiny_llama, batch.ids)[batch.mask]
    logp = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    rows, cols = np.nonzero(hit)
    assert len(rows) >= 5
    np.testing.assert_allclose(np.log(targets["t_w"][rows, cols]), logp[rows, nxt[rows]], atol=1e-4)
    assert cache.manifest["splits"]["val"]["tokens"] == sum(index["tokens"])


def test_padded_vocabulary_is_sliced_to_the_tokenizer(token_corpus, tiny_gpt2, tmp_path):
    cache, dataset = build(tmp_path, token_corpus, tiny_gpt2, "logits=sample:6")
    lm = cache.lm
    assert lm["outputs"] == lm["vocab_size"] + 20 and cache.num_classes == lm["vocab_size"]
    batch = next(cache.token_batches("train", 8, shuffle=False))
    assert batch.classes.max() < lm["vocab_size"]
    # the draws come from the sliced distribution: every drawn id has real probability there
    ref = reference(tiny_gpt2, batch.ids)[..., :lm["vocab_size"]]
    real = batch.segments >= 0
    p = np.exp(ref - ref.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    assert (np.take_along_axis(p, batch.classes, -1)[real] > 1e-9).all()
    assert verify(cache, rows=4, seed=0)["teacher fidelity"].startswith("ok")


def test_dense_is_refused_above_the_limit_and_kept_below(token_corpus, tiny_llama, tmp_path, monkeypatch):
    from pipeline.cache import plan

    cache, dataset = build(tmp_path, token_corpus, tiny_llama, "logits=dense")
    batch = next(cache.token_batches("test", 4, shuffle=False))
    ref = reference(tiny_llama, batch.ids)
    real = batch.segments >= 0
    np.testing.assert_allclose(batch.logits[real], ref[real], rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(plan, "MAX_DENSE_OUTPUTS", 50)
    with pytest.raises(KdError, match=r"logits=dense would store all .* bytes per token.*topk:K"):
        build(tmp_path, token_corpus, tiny_llama, "logits=dense", name="refused")


def test_a_killed_shard_resumes_to_the_same_bytes(token_corpus, tiny_llama, tmp_path, monkeypatch):
    from pipeline.cache import shard
    from pipeline.cache.execute import run_jobs as real_run_jobs
    from pipeline.data import open_dataset

    whole, _ = build(tmp_path, token_corpus, tiny_llama, "logits=topk:4", "shard_size=32", "chunk_size=8", name="whole")
    calls = {"n": 0}
    original = shard.write_shard

    def dying(computed):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed mid-build, after two shards were written
        return original(computed)

    monkeypatch.setattr(shard, "write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, token_corpus, tiny_llama, "logits=topk:4", "shard_size=32", "chunk_size=8", name="resumed")
    monkeypatch.setattr(shard, "write_shard", original)
    resumed, _ = build(tmp_path, token_corpus, tiny_llama, "logits=topk:4", "shard_size=32", "chunk_size=8",
                       name="resumed")
    assert resumed.manifest["last_run"]["computed_rows"] < sum(s["rows"] for s in resumed.manifest["splits"].values())
    def sums(cache):  # every shard's arrays' and index part's sha256 (not its timing)
        return {s: [(r["sha256"], r["index_sha256"], r["inputs_sha256"]) for r in records]
                for s, records in cache.manifest["shards"].items()}

    assert sums(resumed) == sums(whole)
    assert resumed.manifest["key"] == whole.manifest["key"]


def test_verify_passes_and_names_a_changed_tokenizer(token_corpus, tiny_llama, tmp_path):
    from tests.lm_models import corpus_documents, train_tokenizer

    teacher = shutil.copytree(tiny_llama, tmp_path / "teacher")  # the session's fixture stays as it is
    cache, _ = build(tmp_path, token_corpus, teacher, "logits=topk:8")
    checks = verify(cache, rows=6, seed=0)
    assert all(v.startswith("ok") for v in checks.values()), checks
    assert "windows re-tokenized" in checks["token windows"]
    # the teacher's directory now holds another tokenizer (other merges)
    train_tokenizer([d[::-1] for d in corpus_documents(token_corpus)]).save_pretrained(teacher)
    checks = verify(cache, rows=2, seed=0)
    assert checks["teacher fingerprint"].startswith("FAILED") and "tokenizes differently" in checks["teacher fingerprint"]
    assert checks["dataset fingerprint"].startswith("FAILED")  # the data's tokenizer= is that folder too


def test_a_teacher_with_another_tokenizer_is_refused(token_corpus, tiny_llama, tmp_path):
    from tests.lm_models import corpus_documents, train_tokenizer

    other = tmp_path / "other-tok"
    train_tokenizer([d[::-1] for d in corpus_documents(token_corpus)]).save_pretrained(other)
    with pytest.raises(KdError, match="is not the one .* was tokenized with"):
        build(tmp_path, token_corpus, tiny_llama, "logits=topk:8", tokenizer=other)


def test_topk_sample_keeps_the_head_exactly_and_draws_from_the_tail(token_corpus, tiny_llama, tmp_path):
    """logits=topk:K+sample:M on a token cache: per position, the top-K arrays exactly as topk:K
    stores them and M draws of tokens outside that top K; verify re-draws them."""
    cache, dataset = build(tmp_path, token_corpus, tiny_llama, "logits=topk:4+sample:6")
    assert cache.manifest["logits"]["mode"] == "topk+sample"
    batch = next(cache.token_batches("train", 10_000, shuffle=False))
    real = batch.segments >= 0
    assert batch.classes.shape[-1] == 4 and batch.draws.shape == batch.ids.shape + (6,)
    ref = reference(tiny_llama, batch.ids)
    order = np.argsort(-ref, axis=-1, kind="stable")[..., :4]
    assert np.array_equal(batch.classes[real], order[real])
    # no draw is a head token, and every draw has real probability under the teacher
    assert not (batch.draws[..., :, None] == batch.classes[..., None, :]).any(-1)[real].any()
    z = ref / batch.temperature  # drawn at the cache's temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    assert (np.take_along_axis(p / p.sum(-1, keepdims=True), batch.draws, -1)[real] > 1e-9).all()
    t = batch.sparse().targets(batch.temperature)  # K exact probabilities, then the tail's mass over the draws
    assert t["t_ids"].shape[1] == 10 and np.allclose(t["t_w"].sum(1), 1.0, atol=1e-5)
    checks = verify(cache, rows=3, seed=0)
    assert checks["teacher fidelity"].startswith("ok") and "draws re-drawn" in checks["teacher fidelity"], checks


def test_a_damaged_shard_is_found_by_verify_and_repair_recomputes_only_it(token_corpus, tiny_llama, tmp_path, capsys):
    """A flipped byte in one shard of a token cache's top-K logits: verify names that shard,
    `kdcache cache cache=PATH repair=true` recomputes its rows alone, and every array file is
    byte for byte the undamaged build's again."""
    from conftest import run_cli
    from test_faults import array_files, shard_file

    from pipeline.cache import format as fmt
    from pipeline.sparse import TOPK

    root = tmp_path / "cache"
    run_cli(capsys, "cache", f"dataset=tokens:{token_corpus}", f"teacher=hf:{tiny_llama}", "seq_len=128",
            "logits=topk:4", "shard_size=32", "device=cpu", f"cache={root}")
    before, manifest = array_files(root), fmt.read_manifest(root)
    path = shard_file(root, fmt.sparse_key("train", TOPK, "logits"), 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    checks = verify(open_cache(root), rows=2, seed=0)
    assert checks["shard checksums"] == f"FAILED: {fmt.sparse_key('train', TOPK, 'logits')} shard 1"
    assert checks["token windows"].startswith("ok")  # the ids are intact: only the logits differ
    # reading the damaged windows (a student, verify's fidelity check): one line naming the repair
    damaged = manifest["shards"]["train"][1]
    with pytest.raises(KdError, match="repair=true"):
        for _ in open_cache(root).token_batches("train", 4, shuffle=False,
                                                rows=slice(damaged["start"], damaged["stop"])):
            pass
    summary = run_cli(capsys, "cache", f"cache={root}", "repair=true")
    assert summary["repaired"] == ["train shard 1"]
    assert summary["computed_rows"] == manifest["shards"]["train"][1]["stop"] - manifest["shards"]["train"][1]["start"]
    assert array_files(root) == before
    assert fmt.read_manifest(root)["shards"] == manifest["shards"]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_llama):
    """The tiny Llama as one GGUF file (tests/lm_models.py write_tiny_gguf): ``DIR/tiny.gguf``."""
    pytest.importorskip("gguf")
    from tests.lm_models import write_tiny_gguf

    return write_tiny_gguf(tiny_llama, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_a_gguf_teacher_caches_with_the_tokenizer_inside_its_file(token_corpus, tiny_gguf, tmp_path, capfd,
                                                                   monkeypatch):
    """`kdcache cache dataset=tokens:X teacher=hf:DIR gguf_file=F` needs no tokenizer=: the data is
    tokenized with the tokenizer inside F (tokenizer=DIR/F in the cache's config), whose fingerprint
    is that of the same tokenizer saved as a folder; the cached top-K are transformers' own GGUF
    model's; the file is dequantised once in the process, with no progress bar; the summary counts
    tokens/s; verify re-tokenizes and re-runs it."""
    import json

    import transformers

    from pipeline.config import DataConfig
    from pipeline.data.tokens import tokenizer_record
    from pipeline.hf import load_tokenizer
    from stages.cli import main

    real, loads = transformers.AutoModelForCausalLM.from_pretrained, []

    def counted(*args, **kwargs):  # transformers' own loader, counted
        loads.append(kwargs.get("gguf_file"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", counted)
    root, folder = tmp_path / "cache", tiny_gguf.parent
    capfd.readouterr()
    assert main(["cache", f"dataset=tokens:{token_corpus}", f"teacher=hf:{folder}", f"gguf_file={tiny_gguf.name}",
                 "seq_len=128", "logits=topk:4", "shard_size=32", "device=cpu", "dtype=float32", f"cache={root}"]) == 0
    out, err = capfd.readouterr()
    assert loads == [tiny_gguf.name], loads  # checks, plan, cost and shards share one load
    assert "GGUF tensors" not in out + err
    cache = open_cache(root)
    windows = sum(cache.num_rows(s) for s in cache.splits)
    assert f"computed {windows:,} windows ({windows * 128:,} positions) in " in out and " tokens/s)" in out
    assert json.loads((root / "config.json").read_text())["config"]["tokenizer"] == str(tiny_gguf)
    # the same tokenizer saved as a folder: the same record, the same dataset fingerprint
    saved = tmp_path / "tok"
    transformers.AutoTokenizer.from_pretrained(folder, gguf_file=tiny_gguf.name).save_pretrained(saved)
    assert tokenizer_record(load_tokenizer(saved), saved) == cache.lm["tokenizer"]
    again = open_dataset(DataConfig(dataset=f"tokens:{token_corpus}", tokenizer=str(saved), seq_len=128))
    assert again.fingerprint == cache.manifest["dataset"]["fingerprint"]
    # independent reference: transformers' own forward of the GGUF model
    batch = next(cache.token_batches("val", 64, shuffle=False))
    model = real(folder, gguf_file=tiny_gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(batch.ids)).logits.numpy()
    real_positions = batch.segments >= 0
    order = np.argsort(-ref, axis=-1, kind="stable")[..., :4]
    assert np.array_equal(batch.classes[real_positions], order[real_positions])
    np.testing.assert_allclose(batch.values[real_positions], np.take_along_axis(ref, order, -1)[real_positions],
                               rtol=1e-4, atol=1e-4)
    checks = verify(cache, rows=2, seed=0)
    assert all(v.startswith("ok") for v in checks.values()), checks
    assert loads == [tiny_gguf.name]  # verify too reused the process's load
