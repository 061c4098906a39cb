"""Shared helpers of the benchmark suite: timing, machine description, peak RSS of a child
process, cache preparation and the result records every benchmark returns.

Timing discipline (the machine is shared and noisy): every floor is a *ratio of two things
measured in the same process*, each the median of several repeats, with the arms alternated
inside every repeat (and their order rotated from one repeat to the next) so that a burst of
load from another process hits both arms alike. Absolute times are reported for context only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

# libgomp's default (active) spin-wait makes a 2-thread OpenMP team in the *main* thread 3-6x
# slower whenever another process competes for a core, while the teams of other threads (e.g.
# the dask worker that runs stage one's teacher) are throttled: without this setting a shared
# machine would make main-thread arms (bare forward, synchronous builds, training loops) look
# slow next to worker-thread arms, measuring the neighbour rather than kdcache. It must be set
# before torch is first imported (so: here, at import time); every child process inherits it.
# Its price: waking sleeping OpenMP threads costs ~50-90 us per parallel region, so absolute
# times are slower than with the default on an idle machine (most for tiny ops); ratios move
# far less. An explicit OMP_WAIT_POLICY in the environment wins (OMP_WAIT_POLICY=active).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORKDIR = REPO / "data" / "bench" / "work"
KDCACHE = Path(sys.executable).parent / "kdcache"  # the CLI of the venv running the bench


# =========================================================================== output

def log(msg: str) -> None:
    """Progress line with a wall-clock stamp (stdout, flushed so `make` shows it live)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def figure(name: str, value: float, unit: str = "", *, floor: float | None = None,
           op: str = ">=", **context: Any) -> dict:
    """One measured figure. With a ``floor`` it passes when ``value op floor`` holds;
    ``context`` carries the raw numbers it was computed from (reported, never judged)."""
    passed = None
    if floor is not None:
        passed = bool(value >= floor) if op == ">=" else bool(value <= floor)
    return {"name": name, "value": value, "unit": unit, "floor": floor,
            "op": op if floor is not None else None, "passed": passed, **context}


def table(title: str, columns: list[str], rows: list[list[Any]], note: str = "") -> dict:
    return {"title": title, "columns": columns, "rows": rows, "note": note}


def result(name: str, what: str, figures: list[dict], tables: list[dict], notes: list[str],
           params: dict, seconds: float) -> dict:
    """What every benchmark's ``run()`` returns (and benchmarks.json stores)."""
    return {"name": name, "what": what, "figures": figures, "tables": tables, "notes": notes,
            "params": params, "seconds": round(seconds, 1)}


# =========================================================================== timing

def median(values: list[float]) -> float:
    return float(statistics.median(values))


def spread(values: list[float]) -> dict:
    """Median, min, max and every repeat, for the JSON."""
    return {"median": median(values), "min": min(values), "max": max(values),
            "repeats": [round(v, 6) for v in values]}


def alternate(arms: dict[str, Callable[[], float]], repeats: int, label: str = "",
              warmup: bool = True) -> dict[str, list[float]]:
    """Run every arm once per repeat, rotating the order each repeat (A B C, B C A, ...).

    With ``warmup``, every arm first runs once untimed, so that one-off costs of the process
    (imports, allocator growth, kernel/primitive creation for new shapes) land on no arm.

    Each arm returns the seconds it measured itself, so that untimed set-up (e.g. deleting the
    previous cache directory) stays out of the figure. Returns ``{arm: [seconds per repeat]}``.
    """
    names = list(arms)
    if warmup:
        for name in names:
            arms[name]()
        log(f"{label} warm-up done")
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            out[name].append(arms[name]())
        log(f"{label} repeat {r + 1}/{repeats}: " +
            ", ".join(f"{n} {out[n][-1]:.2f}s" for n in names) + f" (load {os.getloadavg()[0]:.1f})")
    return out


class EpochClock:
    """Wraps a ``batches(epoch)`` callable and stamps the start of every epoch."""

    def __init__(self, batches):
        self.batches, self.starts = batches, []

    def __call__(self, epoch: int):
        self.starts.append(time.perf_counter())
        return self.batches(epoch)

    def epochs(self, end: float) -> list[float]:
        """Seconds of each epoch, the last one ending at ``end``."""
        marks = self.starts + [end]
        return [b - a for a, b in zip(marks, marks[1:])]


def clocked(student, per_epoch: dict[str, list[float]], key: str):
    """``student`` with its training loop's epochs timed: each epoch's seconds are appended
    to ``per_epoch[key]`` (torch students: they train through ``_fit_batches``)."""
    inner = student._fit_batches

    def fit_batches(batches, *a, **kw):
        clock = EpochClock(batches)
        out = inner(clock, *a, **kw)
        per_epoch.setdefault(key, []).extend(clock.epochs(time.perf_counter()))
        return out
    student._fit_batches = fit_batches
    return student


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# =========================================================================== child processes

# A small wrapper process runs the command and reports RUSAGE_CHILDREN's ru_maxrss. Reading the
# child's rusage directly from this (large) process would be wrong on Linux: a child spawned by
# (v)fork starts with its parent's memory counted, and exec keeps that high-water mark, so every
# child would report at least the benchmark process's own RSS. The wrapper is small after its
# exec, so the peak it reports is the command's own.
_RSS_WRAPPER = """
import resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(rc)
"""


def run_child(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> dict:
    """Run ``cmd`` to completion; return its peak RSS, wall time, exit code and output.

    The peak RSS is the kernel's ``ru_maxrss`` of the command (Linux: KiB), reported by a small
    wrapper process from ``getrusage(RUSAGE_CHILDREN)``: the high-water mark of the whole run,
    not a sample of it (see ``_RSS_WRAPPER``).
    """
    import tempfile

    with tempfile.NamedTemporaryFile("r", suffix=".maxrss") as rss:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, rss.name, *[str(c) for c in cmd]],
                              cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True)
        seconds = time.perf_counter() - t0
        maxrss_kb = int(rss.read() or 0)
    out, err = proc.stdout, proc.stderr
    res = {"cmd": " ".join(str(c) for c in cmd), "returncode": proc.returncode,
           "peak_rss_mb": maxrss_kb / 1024, "seconds": seconds,
           "stdout": out.decode(errors="replace"), "stderr": err.decode(errors="replace")}
    if proc.returncode != 0:
        raise RuntimeError(f"{res['cmd']} exited {proc.returncode}:\n{res['stderr'][-2000:]}")
    return res


def kdcache_json(verb: str, args: dict, cwd: Path) -> dict:
    """Run ``kdcache VERB k=v ... --json`` in a child; return run_child's record + ``summary``."""
    res = run_child([KDCACHE, verb, *[f"{k}={v}" for k, v in args.items()], "--json"], cwd=cwd)
    res["summary"] = json.loads(res["stdout"].strip().splitlines()[-1])
    return res


# =========================================================================== caches

def prepare_build(args: dict):
    """Everything ``stages.cache.main`` does before it calls ``build_cache`` (for random or
    existing teacher weights: this never trains a teacher).

    Returns ``(root, cfg, dataset, spec, manifest)`` so that a benchmark can time
    ``build_cache(root, cfg, dataset, spec, manifest)`` alone.
    """
    from pipeline.cache.plan import prepare
    from pipeline.config import CacheConfig
    from pipeline.settings import resolve
    from pipeline.data import open_dataset
    from pipeline.teacher_training import teacher_arch

    cfg = resolve(CacheConfig, {k: v for k, v in args.items()}, verb="cache")
    assert cfg.teacher_ckpt, "prepare_build needs teacher_ckpt=random or a checkpoint path"
    dataset = open_dataset(cfg)
    cfg, spec, manifest = prepare(cfg, dataset, teacher_arch(cfg, dataset), cfg.teacher_ckpt)
    dataset.fingerprint  # computed now, outside any timed region (plan already needs it)
    return Path(cfg.cache), cfg, dataset, spec, manifest


_BUILT: set[Path] = set()  # caches built from scratch by this process


def ensure_cache(args: dict, quiet: bool = True) -> Path:
    """Build a cache that benchmarks *read*, with the real stage (``stages.cache.main``).

    Each cache is deleted and built from scratch once per process, then reused by the later
    benchmarks of the same run. A cache left in the work dir by an earlier run is never read:
    the cache key covers inputs and settings, not the writer's code, so a layout change (e.g.
    which chunks are stored) would otherwise go unnoticed. Its results table goes with it.
    Returns the cache path.
    """
    root = Path(args["cache"])
    if root in _BUILT:
        return root
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(root.parent / f"{root.name}.results", ignore_errors=True)
    from stages import cache as cache_stage

    log(f"building cache {root.name} ({args.get('dataset')}, teacher {args.get('teacher', 'auto')})")
    t0 = time.perf_counter()
    argv = [f"{k}={','.join(v) if isinstance(v, (list, tuple)) else v}" for k, v in args.items()]
    if quiet:
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            cache_stage.main(argv)
    else:
        cache_stage.main(argv)
    log(f"built {root.name} in {time.perf_counter() - t0:.1f}s")
    _BUILT.add(root)
    return root


def base_dirs(workdir: Path, teacher_ckpt: str = "") -> dict:
    """teacher_dir inside the bench work dir, never the repo's data/, for a build that trains
    (or finds) its teacher there. Every bench cache names its own cache= path, and kdcache
    refuses a key that does not apply: no cache_root, and no teacher_dir beside teacher_ckpt."""
    return {} if teacher_ckpt else {"teacher_dir": workdir / "teachers"}


def digits_cache(workdir: Path, dtype: str = "float16", compression: str = "none") -> Path:
    """The digits cache of the *trained* default teacher (cnn_small), as `make teacher-cache`
    builds it, inside the work dir (the teacher is trained there once, ~10 s)."""
    name = ("digits-cnn_small" + ("" if dtype == "float16" else f"-{dtype}")
            + ("" if compression == "none" else f"-{compression}"))
    return ensure_cache({"dataset": "digits", "cache": workdir / "caches" / name, "dtype": dtype,
                         "compression": compression, **base_dirs(workdir)})


def synthetic_npz(workdir: Path, spec: str) -> Path:
    """The rows of a ``synthetic:N:SHAPE:K`` dataset (seed 0) written once to an ``.npz`` with
    the same train/val/test splits, so that inputs are an in-memory gather, as with real npz /
    torchvision / digits data (``synthetic:`` regenerates each row's noise on every read: a cost
    of the generator, not of kdcache). Returns the path (``dataset=npz:PATH``)."""
    import numpy as np

    from pipeline.config import DataConfig
    from pipeline.data import open_dataset

    path = workdir / "datasets" / (spec.replace(":", "-") + ".npz")
    if path.is_file():
        return path
    ds = open_dataset(DataConfig(dataset=spec))
    arrays = {}
    for s in ("train", "val", "test"):
        arrays[f"x_{s}"] = ds.raw(s, 0, len(ds.splits[s]))
        arrays[f"y_{s}"] = ds.splits[s].labels
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.rename(path)
    return path


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# =========================================================================== the machine

def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine() -> dict:
    """CPU, cores, RAM, torch threads, library versions, git commit: what the figures depend on."""
    import dask
    import numpy
    import pyarrow
    import sklearn
    import torch
    import torchvision
    import zarr

    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    mem_kb = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines()
                   if line.startswith("MemTotal")), 0)

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    dirty = git("status", "--porcelain", "--", "pipeline", "stages")
    import hashlib

    diff = git("diff", "HEAD", "--", "pipeline", "stages")
    return {
        "cpu": cpu, "cores_online": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
        "ram_gb": round(mem_kb / 1024 ** 2, 1), "gpu": torch.cuda.is_available(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                     "numpy": numpy.__version__, "zarr": zarr.__version__,
                     "pyarrow": pyarrow.__version__, "dask": dask.__version__,
                     "scikit-learn": sklearn.__version__},
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty_library": bool(dirty),  # uncommitted changes under pipeline/ or stages/
        "git_dirty_files": [line[3:] for line in dirty.splitlines()],
        "git_diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16] if dirty else "",
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def set_threads() -> int:
    """Use the torch thread count kdcache's cache builder uses by default (cores / workers=1),
    so bare and cached arms run on the same number of threads."""
    from pipeline import runtime

    runtime.set_threads(runtime.cores())
    import torch

    return torch.get_num_threads()


# =========================================================================== running one alone

def main_for(run: Callable[[bool, Path], dict]) -> None:
    """``python -m bench.NAME [--quick] [--workdir DIR]``: run one benchmark, print its figures
    and write its JSON record to the work dir (docs/ are only written by bench.run)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    a = parser.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    set_threads()
    res = run(a.quick, a.workdir)
    for f in res["figures"]:
        verdict = "" if f["passed"] is None else (" PASS" if f["passed"] else " FAIL")
        floor = "" if f["floor"] is None else f" (floor {f['op']} {f['floor']})"
        print(f"{f['name']}: {fmt_num(f['value'])} {f['unit']}{floor}{verdict}")
    out = a.workdir / f"{res['name']}.json"
    out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(f"wrote {out}")


def fmt_num(v: Any) -> str:
    if isinstance(v, float):
        if v == 0 or abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def peak_rss_self_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
