"""Cache overhead: how close stage one comes to the teacher's bare forward throughput.

Measured (floor: cached / bare >= 0.90)
    cached throughput = rows / wall time of ``pipeline.cache.build.build_cache(...)`` on a fresh
        cache directory, with the default scheduler (``local``) and everything it does: the
        lock, array creation, the scheduler (a dask local cluster, or in-process when it has
        one worker), reading (here: generating) the inputs, the teacher forward through the
        feature taps, the float16 cast, the NaN check, chunk encoding (codecs and CRC), the
        shard writes and fsyncs, the per-shard sha256, the index parts, the final index and the
        manifest. The teacher is loaded inside the timed region too (the worker state
        ``shard._STATE`` is cleared before every build, as in a fresh ``kdcache cache``). Not
        timed: the one-off CPU timing of the teacher a new cache records for the report
        (``plan.teacher_cost``, which ``kdcache cache`` passes to ``build_cache``): a fixed cost
        of one warm-up and a few calls at batch 1 and 256, whatever the rows.
    shard-phase throughput (context) = rows / the seconds ``build_cache`` reports for its shard
        work alone (teacher load, inputs, forward, encoding, writes), i.e. without the one-off
        lock, array creation, final index and manifest: the steady state of a large cache.
    bare throughput = rows / time of plain ``model(x)`` (the untapped teacher) under
        ``torch.inference_mode`` over the same rows, already materialised in memory as one
        float32 array, in batches of the same ``infer_batch_size``, one batch after another
        on all the machine's cores (torch threads = cores): what ``model(x)`` in a loop gets.

Why fair: same rows, same batch size, same cores, same process, arms alternated in every
repeat; the bare arm has no pipeline at all (inputs precomputed, no taps, no copies out).
Two more arms, for context, run on the same in-memory inputs: the FX-tapped teacher the
builder uses (``Tapped``), which separates the cost of the taps from the cost of the pipeline,
and the plain teacher in the builder's own layout (``streams`` batches at once, each on
cores / streams threads, see ``execute.forward_streams``), which separates what running
forwards side by side gains from what the pipeline costs.

Cases: a compute-heavy teacher (resnet18 on 3x32x32), where the forward should dominate, and a
light teacher (cnn_small on 1x8x8, digits-shaped) with many rows so that fixed costs are
amortised; each with the default tap (1 layer) and 3 taps. For context (no floor): the same
synthetic rows written to an ``.npz`` (inputs become an in-memory gather instead of
regenerated noise, which isolates the cost of the ``synthetic:`` generator), and the real
``digits`` dataset (1,797 rows: its build is all fixed cost). With one worker (the default)
``local`` and ``synchronous`` run the same in-process pipeline, so only ``local`` is timed.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.common import (alternate, figure, log, main_for, median, prepare_build, result,
                          spread, synthetic_npz, table)

NAME = "cache_overhead"
FLOOR = 0.90


def cases(quick: bool) -> list[dict]:
    n_heavy = 2_000 if quick else 12_000
    n_light = 10_000 if quick else 50_000
    heavy3 = ("layer2.1.relu_1", "layer3.1.relu_1", "flatten")
    light3 = ("block1.2", "block2.2", "embed")
    return [
        dict(case="resnet18 1 tap", dataset=f"synthetic:{n_heavy}:3x32x32:10", teacher="resnet18", layers=()),
        dict(case="resnet18 3 taps", dataset=f"synthetic:{n_heavy}:3x32x32:10", teacher="resnet18", layers=heavy3),
        dict(case="cnn_small 1 tap", dataset=f"synthetic:{n_light}:1x8x8:10", teacher="cnn_small", layers=()),
        dict(case="cnn_small 3 taps", dataset=f"synthetic:{n_light}:1x8x8:10", teacher="cnn_small", layers=light3),
        dict(case="resnet18 1 tap, npz", dataset=f"npz-of:synthetic:{n_heavy}:3x32x32:10", teacher="resnet18",
             layers=(), context=True),
        dict(case="cnn_small 1 tap, npz", dataset=f"npz-of:synthetic:{n_light}:1x8x8:10", teacher="cnn_small",
             layers=(), context=True),
        dict(case="cnn_small 1 tap, digits", dataset="digits", teacher="cnn_small", layers=(), context=True),
        dict(case="cnn_small 3 taps, digits", dataset="digits", teacher="cnn_small", layers=light3, context=True),
    ]


def measure(case: dict, workdir: Path, repeats: int) -> dict:
    import torch

    from pipeline import runtime
    from pipeline.cache import build, execute, shard
    from pipeline.teachers import Tapped, build_teacher

    where = workdir / NAME / case["case"].replace(" ", "_").replace(",", "")
    shutil.rmtree(where, ignore_errors=True)
    dataset_spec = case["dataset"]
    if dataset_spec.startswith("npz-of:"):  # the same synthetic rows, held in memory
        dataset_spec = f"npz:{synthetic_npz(workdir, dataset_spec[len('npz-of:'):])}"
    args = dict(dataset=dataset_spec, teacher=case["teacher"], teacher_ckpt="random",
                layers=case["layers"], scheduler="local", cache=where / "local")
    root, cfg, dataset, spec, manifest = prepare_build(args)
    rows = sum(len(s) for s in dataset.splits.values())

    # The bare arm: the plain teacher, the same rows as one in-memory float32 array.
    model = build_teacher(spec)
    tapped = Tapped(build_teacher(spec), spec.layers, spec.pool, spec.arch).eval()
    x = torch.from_numpy(np.concatenate([dataset.inputs(s, 0, len(dataset.splits[s]))
                                         for s in dataset.splits]))
    bs = cfg.infer_batch_size

    cores = runtime.cores()
    streams = execute.forward_streams(cfg, spec)

    def forward(net) -> float:
        runtime.set_threads(cores)  # the build leaves torch at cores / streams threads
        with torch.inference_mode():
            t0 = time.perf_counter()
            for a in range(0, rows, bs):
                net(x[a:a + bs])
            return time.perf_counter() - t0

    def forward_side_by_side(net) -> float:
        """The plain teacher as the builder runs it: ``streams`` batches at once on threads."""
        runtime.set_threads(max(1, cores // streams))

        def run(a: int) -> None:
            with torch.inference_mode():
                net(x[a:a + bs])
        with ThreadPoolExecutor(streams) as pool:
            t0 = time.perf_counter()
            list(pool.map(run, range(0, rows, bs)))
            return time.perf_counter() - t0

    shard_phase: list[float] = []

    def cached() -> float:
        shutil.rmtree(root, ignore_errors=True)
        shard._STATE.clear()  # a fresh process: the worker loads its teacher again
        t0 = time.perf_counter()
        _, stats = build.build_cache(root, cfg, dataset, spec, manifest, progress=False)
        seconds = time.perf_counter() - t0
        shard_phase.append(stats["seconds"])
        return seconds

    with torch.inference_mode():
        model(x[:bs])  # warm-up (allocator, kernels) outside the timed loop
    times = alternate({"bare": lambda: forward(model), "local": cached,
                       "tapped": lambda: forward(tapped),
                       "bare_streams": lambda: forward_side_by_side(model)}, repeats, label=case["case"])
    shutil.rmtree(where, ignore_errors=True)
    bare_s, local_s, tapped_s, streams_s = (median(times[k]) for k in ("bare", "local", "tapped", "bare_streams"))
    shard_s = median(shard_phase[-repeats:])  # the timed repeats, not the warm-up
    return {**case, "layers": list(spec.layers), "rows": rows, "batch_size": bs,
            "shard_size": cfg.shard_size, "chunk_size": cfg.chunk_size,
            "threads": cores, "streams": streams,
            "bare_samples_s": rows / bare_s, "local_samples_s": rows / local_s,
            "shard_phase_samples_s": rows / shard_s, "tapped_samples_s": rows / tapped_s,
            # ratio of medians of seconds = ratio of median throughputs
            "ratio_local": bare_s / local_s, "ratio_shard_phase": bare_s / shard_s,
            "ratio_tapped": bare_s / tapped_s,
            "bare_streams_samples_s": rows / streams_s, "ratio_to_bare_streams": streams_s / local_s,
            # robustness check: the same ratio from the fastest repeat of each arm
            "ratio_local_min": min(times["bare"]) / min(times["local"]),
            "seconds": {k: spread(v) for k, v in times.items()}}


def run(quick: bool, workdir: Path) -> dict:
    t0 = time.perf_counter()
    repeats = 3 if quick else 7
    measured = []
    for case in cases(quick):
        log(f"{NAME}: {case['case']} on {case['dataset']}")
        measured.append(measure(case, workdir, repeats + (4 if case["dataset"] == "digits" else 0)))
    figures = [figure(f"cache/bare throughput, {m['case']}", round(m["ratio_local"], 3), "x",
                      floor=None if m.get("context") else FLOOR, op=">=",
                      rows=m["rows"], bare_samples_s=round(m["bare_samples_s"], 1),
                      cached_samples_s=round(m["local_samples_s"], 1),
                      shard_phase_ratio=round(m["ratio_shard_phase"], 3),
                      ratio_from_fastest_repeats=round(m["ratio_local_min"], 3),
                      tapped_forward_ratio=round(m["ratio_tapped"], 3),
                      streams=m["streams"],
                      bare_streams_samples_s=round(m["bare_streams_samples_s"], 1),
                      ratio_to_bare_streams=round(m["ratio_to_bare_streams"], 3))
               for m in measured]
    rows = [[m["case"], m["dataset"], f"{m['rows']:,}", ", ".join(m["layers"]),
             f"{m['bare_samples_s']:,.0f}", f"{m['local_samples_s']:,.0f}", f"{m['ratio_local']:.3f}",
             f"{m['shard_phase_samples_s']:,.0f}", f"{m['ratio_shard_phase']:.3f}",
             f"{m['ratio_local_min']:.3f}", f"{m['tapped_samples_s']:,.0f}",
             f"{m['bare_streams_samples_s']:,.0f}", f"{m['ratio_to_bare_streams']:.3f}",
             "context" if m.get("context") else ("PASS" if m["ratio_local"] >= FLOOR else "FAIL")]
            for m in measured]
    tables = [table("Stage one vs the bare teacher forward",
                    ["case", "dataset", "rows", "tapped layers", "bare samples/s",
                     "cached samples/s (local)", "ratio (floor ≥ 0.90)",
                     "shard-phase samples/s", "ratio, shard phase", "ratio, fastest repeats",
                     "tapped forward samples/s", "bare, builder's streams, samples/s",
                     "ratio to that", "verdict"], rows,
                    note=f"median of {repeats} alternated repeats (digits: {repeats + 4}) after one warm-up; "
                         f"batch {measured[0]['batch_size']}, {measured[0]['threads']} cores; the builder runs "
                         f"{measured[0]['streams']} forwards at once (streams=0, auto), each on "
                         f"{max(1, measured[0]['threads'] // measured[0]['streams'])} torch thread(s); "
                         "random teacher weights, float16 cache, default shard "
                         f"{measured[0]['shard_size']} / chunk {measured[0]['chunk_size']} rows.")]
    notes = ["The bare arm runs the plain teacher (no feature taps) on precomputed inputs, one "
             "batch after another on all cores: what a `model(x)` loop gets. The cached arm pays "
             "for taps, input generation, encoding and I/O.",
             "'tapped forward' (context) runs the FX-tapped teacher the builder uses on the same "
             "in-memory inputs: the cost of the taps alone. 'ratio, fastest repeats' is the same "
             "ratio from the fastest repeat of each arm (a check against load bursts).",
             "The builder runs `streams` batches through the teacher at once, each forward on "
             "cores / streams torch threads: on small inputs an OpenMP team spends much of each "
             "layer waiting at barriers, so two one-thread forwards outrun one two-thread "
             "forward. 'bare, builder's streams' (context) runs the plain teacher in that same "
             "layout on the in-memory inputs, and 'ratio to that' compares stage one with it: "
             "what the pipeline itself (taps, inputs, encoding, writes) costs."]
    return result(NAME, "stage-one throughput vs bare teacher forward", figures, tables, notes,
                  {"quick": quick, "repeats": repeats, "cases": [c["case"] + ": " + c["dataset"] for c in cases(quick)]},
                  time.perf_counter() - t0) | {"measured": measured}


if __name__ == "__main__":
    main_for(run)
