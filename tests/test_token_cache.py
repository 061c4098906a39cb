"""Token caches: a causal-LM teacher (``teacher=hf:DIR``, pipeline.hf_lm) over windows of token
ids, cached per position (pipeline.cache, format 4).

Every expectation is checked against an independent reference: the teacher's own
``model(input_ids).logits`` and ``model(input_ids, labels=ids).loss`` from transformers, on a
tiny random Llama and a byte-level BPE trained here (offline, about a second).

The token dataset (``dataset=tokens:PATH``) is being written beside this work; until it lands,
:class:`StandInTokens` here is a minimal one with the same interface (``windows``,
``modality = "tokens"``, ``input_shape == (seq_len,)``), registered as ``lmstandin:PATH``.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache.build import build_cache
from pipeline.cache.plan import prepare
from pipeline.cache.reader import open_cache
from pipeline.cache.verify import verify
from pipeline.config import CacheConfig
from pipeline.data import DATASETS, Dataset
from pipeline.errors import KdError
from pipeline.settings import resolve

pytest.importorskip("transformers")

WORDS = ("the cat sat on a mat while dogs ran in the park and birds sang over green hills "
         "under a bright sun people walked slowly home after work").split()


def documents(n: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 40))) for _ in range(n)]


def write_tokenizer(folder: Path, texts: list[str]) -> Path:
    """A byte-level BPE (GPT-2 style) with an end-of-text and a padding token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(folder)
    return folder


def write_llama(folder: Path, tokenizer_dir: Path, extra_outputs: int = 0, seed: int = 0) -> Path:
    """A tiny random LlamaForCausalLM with the tokenizer's files; ``extra_outputs`` pads its
    output layer beyond len(tokenizer), as Qwen's are."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok) + extra_outputs, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=64, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # logits of some spread, so top-k and sampling see real distributions
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- stand-in dataset

class _Windows:
    """A pool of windows (ids [n, T] and their segments), read by position."""

    def __init__(self, ids, segments, sample_ids):
        self.x, self.segments, self.ids = ids, segments, sample_ids
        self.labels = np.zeros(len(ids), np.int64)

    def read(self, positions):
        return self.x[positions]


class StandInTokens(Dataset):
    """Windows of ``seq_len`` tokens from documents (train / val / test by document, 8:1:1),
    packed (each document followed by EOS, cut every seq_len, the tail padded) or not (one
    document per window, truncated, right-padded)."""

    modality = "tokens"

    def __init__(self, spec, docs, tokenizer_dir, seq_len, pack, cfg):
        from transformers import AutoTokenizer

        from pipeline.hf_lm import tokenizer_record

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.tokenizer_dir, self.pack, self.seq_len = str(tokenizer_dir), pack, seq_len
        self.pad_id, self.eos = tok.pad_token_id, tok.eos_token_id
        self.tokenizer_record = tokenizer_record(tok, Path(tokenizer_dir))
        pools = {}
        for s, name in enumerate(("train", "val", "test")):
            mine = [d for i, d in enumerate(docs) if (i % 10 < 8, i % 10 == 8, i % 10 == 9)[s]]
            rows = [tok(d)["input_ids"] for d in mine]
            ids, segs = self._windows(rows)
            pools[name] = _Windows(ids, segs, s * 100_000 + np.arange(len(ids), dtype=np.int64))
        h = hashlib.sha256("\0".join(docs).encode())
        h.update(repr((self.tokenizer_record["fingerprint"], seq_len, pack)).encode())
        super().__init__(spec, pools, (seq_len,), len(tok), cfg, normalise=False, fixed_fingerprint=h.hexdigest())

    def _windows(self, rows):
        T = self.seq_len
        if self.pack:
            stream = [(t, d) for d, r in enumerate(rows) for t in r + [self.eos]]
            out = [stream[a:a + T] for a in range(0, len(stream), T)]
        else:
            out = [[(t, d) for t in r[:T]] for d, r in enumerate(rows)]
        ids = np.full((len(out), T), self.pad_id, np.int64)
        segs = np.full((len(out), T), -1, np.int32)
        for i, w in enumerate(out):
            ids[i, :len(w)] = [t for t, _ in w]
            docs = [d for _, d in w]
            segs[i, :len(w)] = np.unique(docs, return_inverse=True)[1]
        return ids, segs

    @property
    def preprocessing(self):
        return {"tokens": "ids", "seq_len": self.seq_len, "pack": self.pack}

    def inputs(self, split, start, stop):
        return self.raw(split, start, stop)

    def inputs_at(self, split, rows):
        s = self.splits[split]
        return self.pools[s.pool].read(s.positions[np.asarray(rows, np.int64)])

    def windows(self, split, a, b):
        s = self.splits[split]
        pool = self.pools[s.pool]
        at = s.positions[a:b]
        ids, segs = pool.x[at], pool.segments[at]
        real = segs >= 0
        mask = np.zeros_like(real)
        mask[:, :-1] = real[:, 1:]
        positions = np.zeros(segs.shape, np.int32)
        for r in range(len(segs)):
            for j in range(1, segs.shape[1]):
                positions[r, j] = positions[r, j - 1] + 1 if segs[r, j] == segs[r, j - 1] else 0
        return {"ids": ids, "mask": mask, "segments": segs, "positions": positions}


@DATASETS.register("lmstandin", path=True)
def _lmstandin(arg: str, cfg) -> StandInTokens:
    spec = json.loads(Path(arg).read_text())
    return StandInTokens(f"lmstandin:{arg}", spec["docs"], spec["tokenizer"], spec["seq_len"], spec["pack"], cfg)


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    docs = documents()
    tok = write_tokenizer(root / "tok", docs)
    return {"docs": docs, "tok": tok, "llama": write_llama(root / "llama", tok),
            "padded": write_llama(root / "padded", tok, extra_outputs=13, seed=1), "root": root}


def data_spec(lm_dirs, tmp_path, seq_len=24, pack=True, tokenizer=None, name="data.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps({"docs": lm_dirs["docs"], "tokenizer": str(tokenizer or lm_dirs["tok"]),
                                "seq_len": seq_len, "pack": pack}))
    return f"lmstandin:{path}"


def build(tmp_path, spec, teacher, *extra, name="cache"):
    from pipeline.data import open_dataset

    cfg = resolve(CacheConfig, [f"dataset={spec}", f"teacher=hf:{teacher}", f"cache={tmp_path / name}",
                                "dtype=float32", "device=cpu", *extra])
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

def test_topk_per_position_is_the_teachers_own_logits_at_that_position(lm_dirs, tmp_path):
    spec = data_spec(lm_dirs, tmp_path)
    cache, dataset = build(tmp_path, spec, lm_dirs["llama"], "logits=topk:8", "shard_size=4", "chunk_size=2")
    assert cache.manifest["format_version"] == 4
    lm = cache.lm
    assert lm["seq_len"] == 24 and lm["pack"] is True and lm["vocab_size"] == lm["outputs"] == dataset.num_classes
    batch = next(cache.token_batches("train", 10_000, shuffle=False))  # the whole split
    assert len(batch) == cache.num_rows("train")
    w = dataset.windows("train", 0, len(batch))
    assert np.array_equal(batch.ids, w["ids"]) and np.array_equal(batch.mask, w["mask"])
    assert np.array_equal(batch.segments, w["segments"])
    ref = reference(lm_dirs["llama"], w["ids"])  # independent: transformers' own forward
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


def test_teacher_nll_from_the_cache_is_the_models_own_shifted_loss(lm_dirs, tmp_path):
    """The index's mean NLL equals transformers' ``model(ids, labels=ids).loss`` per window
    (its labels shifted inside the model), and at T = 1 the top-K plus tail give the exact
    log-probability of the true next token wherever it is among the K."""
    from transformers import AutoModelForCausalLM

    spec = data_spec(lm_dirs, tmp_path, pack=False)
    cache, dataset = build(tmp_path, spec, lm_dirs["llama"], "logits=topk:32")
    model = AutoModelForCausalLM.from_pretrained(lm_dirs["llama"]).eval()
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
    ref = reference(lm_dirs["llama"], batch.ids)[batch.mask]
    logp = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    rows, cols = np.nonzero(hit)
    assert len(rows) >= 5
    np.testing.assert_allclose(np.log(targets["t_w"][rows, cols]), logp[rows, nxt[rows]], atol=1e-4)
    assert cache.manifest["splits"]["val"]["tokens"] == sum(index["tokens"])


def test_padded_vocabulary_is_sliced_to_the_tokenizer(lm_dirs, tmp_path):
    spec = data_spec(lm_dirs, tmp_path)
    cache, dataset = build(tmp_path, spec, lm_dirs["padded"], "logits=sample:6")
    lm = cache.lm
    assert lm["outputs"] == lm["vocab_size"] + 13 and cache.num_classes == lm["vocab_size"]
    batch = next(cache.token_batches("train", 8, shuffle=False))
    assert batch.classes.max() < lm["vocab_size"]
    # the draws come from the sliced distribution: every drawn id has real probability there
    ref = reference(lm_dirs["padded"], batch.ids)[..., :lm["vocab_size"]]
    real = batch.segments >= 0
    p = np.exp(ref - ref.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    assert (np.take_along_axis(p, batch.classes, -1)[real] > 1e-9).all()
    assert verify(cache, rows=4, seed=0)["teacher fidelity"].startswith("ok")


def test_dense_is_refused_above_the_limit_and_kept_below(lm_dirs, tmp_path, monkeypatch):
    from pipeline.cache import plan

    spec = data_spec(lm_dirs, tmp_path)
    cache, dataset = build(tmp_path, spec, lm_dirs["llama"], "logits=dense")
    batch = next(cache.token_batches("test", 4, shuffle=False))
    ref = reference(lm_dirs["llama"], batch.ids)
    real = batch.segments >= 0
    np.testing.assert_allclose(batch.logits[real], ref[real], rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(plan, "MAX_DENSE_OUTPUTS", 50)
    with pytest.raises(KdError, match=r"logits=dense would store all .* bytes per token.*topk:K"):
        build(tmp_path, spec, lm_dirs["llama"], "logits=dense", name="refused")


def test_a_killed_shard_resumes_to_the_same_bytes(lm_dirs, tmp_path, monkeypatch):
    from pipeline.cache import shard
    from pipeline.cache.execute import run_jobs as real_run_jobs
    from pipeline.data import open_dataset

    spec = data_spec(lm_dirs, tmp_path)
    whole, _ = build(tmp_path, spec, lm_dirs["llama"], "logits=topk:4", "shard_size=4", "chunk_size=2", name="whole")
    calls = {"n": 0}
    original = shard.write_shard

    def dying(computed):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed mid-build, after two shards were written
        return original(computed)

    monkeypatch.setattr(shard, "write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, spec, lm_dirs["llama"], "logits=topk:4", "shard_size=4", "chunk_size=2", name="resumed")
    monkeypatch.setattr(shard, "write_shard", original)
    resumed, _ = build(tmp_path, spec, lm_dirs["llama"], "logits=topk:4", "shard_size=4", "chunk_size=2",
                       name="resumed")
    assert resumed.manifest["last_run"]["computed_rows"] < sum(s["rows"] for s in resumed.manifest["splits"].values())
    def sums(cache):  # every shard's arrays' and index part's sha256 (not its timing)
        return {s: [(r["sha256"], r["index_sha256"], r["inputs_sha256"]) for r in records]
                for s, records in cache.manifest["shards"].items()}

    assert sums(resumed) == sums(whole)
    assert resumed.manifest["key"] == whole.manifest["key"]


def test_verify_passes_and_names_a_changed_tokenizer(lm_dirs, tmp_path):
    spec = data_spec(lm_dirs, tmp_path)
    cache, _ = build(tmp_path, spec, lm_dirs["llama"], "logits=topk:8")
    checks = verify(cache, rows=6, seed=0)
    assert all(v.startswith("ok") for v in checks.values()), checks
    assert "windows re-tokenized" in checks["token windows"]
    # the teacher's directory now holds another tokenizer (same size, other merges)
    other = write_tokenizer(tmp_path / "other-tok", [d[::-1] for d in documents(seed=5)])
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(other).save_pretrained(lm_dirs["llama"])
    try:
        checks = verify(cache, rows=2, seed=0)
        assert checks["teacher fingerprint"].startswith("FAILED") and "tokenizes differently" in checks["teacher fingerprint"]
    finally:
        AutoTokenizer.from_pretrained(lm_dirs["tok"]).save_pretrained(lm_dirs["llama"])


def test_a_teacher_with_another_tokenizer_is_refused(lm_dirs, tmp_path):
    other = write_tokenizer(tmp_path / "other-tok", [d[::-1] for d in documents(seed=7)])
    spec = data_spec(lm_dirs, tmp_path, tokenizer=other)
    with pytest.raises(KdError, match="is not the one .* was tokenized with"):
        build(tmp_path, spec, lm_dirs["llama"], "logits=topk:8")
