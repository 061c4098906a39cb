"""Decoding: images/s of an imagefolder dataset's reads (JPEG decode + resize) with 1 vs 2
decoders.

Inputs: generated photo-like JPEGs of 500×375 (a smooth random colour field, a sinusoidal
texture and Gaussian noise, quality 90: ~80 KB a file; ImageNet's photos, mostly about this
size, average ~110 KB), read through the real `imagefolder:PATH:224` dataset, so every read
decodes, converts to RGB and resizes to 224² (bilinear), then converts to float32 CHW. Each
timed repeat reads the whole train split in reads of 256 rows (the cache build's default
batch), through `Dataset.raw` → `ImageFiles.read`.

    1 decoder     decoders=1: one file after another on the reading thread (the path before
                  decoders existed)
    2 decoders    decoders=2: the process pool of pipeline/decoding.py, warm (started when the
                  dataset was opened, untimed)
    2 threads     decoders=2 inside a daemonic process (a dask worker's), where the pool is one
                  of threads; measured against its own 1-decoder arm in that process

Floor: 2 decoders / 1 decoder ≥ 1.7 on 2 cores (the ideal is 2; the pool's task hand-off and
the reading thread's float conversion cost the rest). On a shared machine other jobs take
cores from the 2-decoder arm that the 1-decoder arm does not need, so both arms' CPU time
per image is reported too (this process's threads and the workers', from /proc):
2 x CPU(1 decoder) / CPU(2 decoders) is the ratio with both cores free. Context, no floor:
the 1-decoder rate, the images/s one core decodes (what sizes `decoders` for a GPU teacher);
the reading thread's own work per image besides decoding (float conversion, normalisation
and the sha256 a cache build takes of its inputs: one build's ceiling whatever the
decoders); and the start-up of a new pool of 2.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import resource
import time
from pathlib import Path

import numpy as np

from bench.common import alternate, figure, log, main_for, median, result, spread, table, timed

NAME = "decoding"
FLOOR = 1.7
WIDTH, HEIGHT, SIZE = 500, 375, 224
QUALITY = 90
BATCH = 256  # rows per read: CacheConfig.infer_batch_size's default
HELD_OUT_PER_CLASS = 2  # val and test are never read here; with a val folder, train is whole


def photo(rng: np.random.Generator) -> np.ndarray:
    """A photo-like uint8 image (HEIGHT, WIDTH, 3): smooth colour regions, texture and noise,
    so the JPEG holds about what a photo's does (flat colour would decode far faster)."""
    from PIL import Image

    coarse = rng.integers(0, 256, (HEIGHT // 25 + 1, WIDTH // 25 + 1, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.BICUBIC), np.float32)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    texture = 40 * np.sin(xx / rng.uniform(3, 12) + yy / rng.uniform(5, 20))[..., None]
    noise = rng.normal(0, 12, (HEIGHT, WIDTH, 3))
    return np.clip(base + texture + noise, 0, 255).astype(np.uint8)


def photos(workdir: Path, n: int) -> Path:
    """``n`` train JPEGs in two classes (and token val and test splits), written once per size."""
    from PIL import Image

    root = workdir / "datasets" / f"decoding-photos-{n}"
    if (root / "complete").is_file():
        return root
    rng = np.random.default_rng(0)
    for split, count in (("train", n // 2), ("val", HELD_OUT_PER_CLASS), ("test", HELD_OUT_PER_CLASS)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(photo(rng)).save(root / split / cls / f"{i:05d}.jpg", quality=QUALITY)
    (root / "complete").write_text("")
    return root


def reader(spec: str, decoders: int, cpu: list[float] | None = None):
    """(arm, dataset): the arm reads the whole train split in BATCH-row reads and returns the
    seconds; with ``cpu``, it also appends the CPU seconds it took (this process and the
    decoding workers)."""
    from pipeline.config import DataConfig
    from pipeline.data import open_dataset

    dataset = open_dataset(DataConfig(dataset=spec, decoders=decoders))  # reads train once (stats)
    n = len(dataset.splits["train"])
    workers = worker_pids(decoders) if cpu is not None and decoders > 1 else []

    def arm() -> float:
        before = cpu_seconds(workers)
        seconds = timed(lambda: [dataset.raw("train", a, min(n, a + BATCH)) for a in range(0, n, BATCH)])
        if cpu is not None:
            cpu.append(cpu_seconds(workers) - before)
        return seconds
    return arm, dataset


def _pid_after(seconds: float) -> int:
    time.sleep(seconds)  # holds its worker, so that the next call lands on another
    return os.getpid()


def worker_pids(decoders: int) -> list[int]:
    """The process ids of this process's pool of ``decoders`` workers (one call held on each)."""
    from pipeline import decoding

    calls = [decoding.pool(decoders).executor.submit(_pid_after, 0.5) for _ in range(decoders)]
    pids = sorted({call.result() for call in calls})
    assert len(pids) == decoders, pids
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of this process (all its threads) and of ``pids``."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    tick = os.sysconf("SC_CLK_TCK")
    fields = [Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split() for pid in pids]
    return usage.ru_utime + usage.ru_stime + sum(int(f[11]) + int(f[12]) for f in fields) / tick


def _threads_in_a_daemon(spec: str, repeats: int, results) -> None:
    """The 1-decoder and 2-decoder arms inside a daemonic process, where the pool is threads."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline import decoding

    arms = {"1 decoder": reader(spec, 1)[0], "2 threads": reader(spec, 2)[0]}
    assert isinstance(decoding.pool(2).executor, ThreadPoolExecutor)
    results.put(alternate(arms, repeats, f"{NAME} (daemonic process)"))


def threads_arm(spec: str, repeats: int) -> dict[str, list[float]]:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=_threads_in_a_daemon, args=(spec, repeats, results), daemon=True)
    child.start()
    out = results.get()
    child.join()
    return out


def reading_thread_ms(dataset, paths: list[Path]) -> list[float]:
    """ms per image of what the reading thread does besides decoding, on decoded pixels: the
    float conversion of ``decoding.decode``, ``Dataset.normalise`` (in ``Dataset.inputs``) and
    the sha256 a cache build's ShardInputs takes of the inputs."""
    from pipeline import decoding

    pixels = decoding.decode_files(paths[:BATCH], SIZE)
    out = []
    for _ in range(5):
        t0 = time.perf_counter()
        x = np.empty(pixels.shape, np.float32)
        decoding.to_unit_float(pixels, x)
        hashlib.sha256(np.ascontiguousarray(dataset.normalise(x))).digest()
        out.append((time.perf_counter() - t0) * 1e3 / len(pixels))
    return out


def run(quick: bool, workdir: Path) -> dict:
    from pipeline import decoding

    t_start = time.perf_counter()
    n, repeats = (192, 5) if quick else (768, 7)
    root = photos(workdir, n)
    spec = f"imagefolder:{root}:{SIZE}"
    files = sorted((root / "train").rglob("*.jpg"))
    kb = sum(p.stat().st_size for p in files) / len(files) / 1024

    decoding.shutdown()  # so that the first read below starts a pool, as a build's first read does
    startup = timed(lambda: decoding.decode(files[:4], SIZE, 2))
    cpu = {"1 decoder": [], "2 decoders": []}
    one, dataset = reader(spec, 1, cpu["1 decoder"])
    two, _ = reader(spec, 2, cpu["2 decoders"])
    seconds = alternate({"1 decoder": one, "2 decoders": two}, repeats, NAME)
    cpu = {arm: values[-repeats:] for arm, values in cpu.items()}  # not the warm-up's
    cpu_ms = {arm: [v * 1e3 / n for v in values] for arm, values in cpu.items()}
    cpu_bound = 2 * median(cpu_ms["1 decoder"]) / median(cpu_ms["2 decoders"])
    daemon = threads_arm(spec, repeats)
    loading = reading_thread_ms(dataset, files)

    rate = {arm: [n / s for s in values] for arm, values in seconds.items()}
    rate_daemon = {arm: [n / s for s in values] for arm, values in daemon.items()}
    per_core = median(rate["1 decoder"])
    ratio = median([a / b for a, b in zip(seconds["1 decoder"], seconds["2 decoders"])])
    ratio_threads = median([a / b for a, b in zip(daemon["1 decoder"], daemon["2 threads"])])
    ceiling = 1e3 / median(loading)
    log(f"{NAME}: 1 decoder {per_core:.0f} images/s, 2 decoders {ratio:.2f}x (with both cores "
        f"free: {cpu_bound:.2f}x), 2 threads (daemonic) {ratio_threads:.2f}x; reading thread "
        f"{median(loading):.3f} ms/image besides decoding")

    figures = [
        figure("2 decoders / 1 decoder, images/s (process pool, warm)", round(ratio, 3), "x",
               floor=FLOOR, images_per_s=rate, seconds=seconds),
        figure("2 x CPU per image, 1 decoder / 2 decoders (the ratio with both cores free)",
               round(cpu_bound, 3), "x", cpu_ms_per_image=cpu_ms),
        figure("2 threads / 1 decoder, images/s (daemonic process: thread pool)",
               round(ratio_threads, 3), "x", images_per_s=rate_daemon, seconds=daemon),
        figure("1 decoder: images/s one core decodes and resizes", round(per_core, 1), "images/s"),
        figure("reading thread besides decoding (float conversion, normalisation, sha256)",
               round(median(loading), 4), "ms/image", repeats=spread(loading)),
        figure("start-up of a new pool of 2 (first read of 4 images)", round(startup, 3), "s"),
    ]

    def row(arm: str, rates: list[float], base: list[float], cpu: list[float] | None = None) -> list:
        ratios = [a / b for a, b in zip(rates, base)]
        return [arm, f"{median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f})",
                f"{1e3 / median(rates):.2f}", f"{median(cpu):.2f}" if cpu else "—",
                f"{median(ratios):.2f}"]

    tables = [table(f"Reads of {n:,} JPEGs ({WIDTH}×{HEIGHT}, {kb:.0f} KB mean) resized to "
                    f"{SIZE}², {BATCH} rows per read",
                    ["arm", "images/s, median (min-max)", "ms per image", "CPU ms per image",
                     "vs its 1 decoder"],
                    [row("1 decoder", rate["1 decoder"], rate["1 decoder"], cpu_ms["1 decoder"]),
                     row("2 decoders (processes)", rate["2 decoders"], rate["1 decoder"],
                         cpu_ms["2 decoders"]),
                     row("1 decoder, daemonic process", rate_daemon["1 decoder"], rate_daemon["1 decoder"]),
                     row("2 threads, daemonic process", rate_daemon["2 threads"], rate_daemon["1 decoder"])],
                    note="each ratio is per repeat, against the 1-decoder arm of the same "
                         "process; CPU: this process's threads and the decoding workers")]
    notes = [
        f"2 decoders / 1 decoder: {ratio:.2f}x in wall time (floor {FLOOR}), {cpu_bound:.2f}x from "
        f"CPU time, i.e. with both cores free; 2 threads in a daemonic process: {ratio_threads:.2f}x.",
        f"Sizing `decoders` for a GPU teacher: one decoder (one core) decodes and resizes "
        f"{per_core:,.0f} of these photos per second, so a teacher that runs R images/s needs about "
        f"R / {per_core:,.0f} decoders (a resnet50 on an H200 runs thousands): 1,000 images/s needs "
        f"{math.ceil(1000 / per_core)}, 5,000 needs {math.ceil(5000 / per_core)}, plus about a core "
        "for the teacher's own thread. Auto (decoders=0) gives cores - 1 on a GPU.",
        f"Whatever the decoders, one build's reading thread converts, normalises and hashes each "
        f"image itself: {median(loading):.3f} ms per 224² image here, a ceiling of about "
        f"{ceiling:,.0f} images/s per build.",
        f"A new pool of 2 takes {startup:.2f} s to start (once per process).",
    ]
    params = {"quick": quick, "images": n, "width": WIDTH, "height": HEIGHT, "size": SIZE,
              "jpeg_quality": QUALITY, "mean_file_kb": round(kb, 1), "batch": BATCH,
              "repeats": repeats}
    return result(NAME, "JPEG decode + resize throughput of imagefolder reads, 1 vs 2 decoders",
                  figures, tables, notes, params, time.perf_counter() - t_start)


if __name__ == "__main__":
    main_for(run)
