"""Bad input: every kind kdcache can meet, in one table, with one test per row.

The guarantee (README, stages/cli.py): bad input exits with code 2 and prints exactly one line on
stderr, ``kdcache VERB: error: <what is wrong and how to fix it>``, with no traceback, and leaves
nothing half-written: the working directory holds the same files before and after, and a cache
that existed before is byte-identical.

Each row of ``CASES`` is a :class:`Case`: a category, a kind (what is wrong), a ``setup(tmp)``
that writes the bad input into a tmp directory and returns the ``kdcache`` argv, and the regex
the one stderr line must match. ``test_bad_input`` runs every row in-process through
``stages.cli.main``; ``test_bad_input_in_a_real_process`` runs a few through the installed
``kdcache`` script; two hypothesis tests feed random ``key=value`` overrides and malformed npz
files. A row with ``bug=...`` documents a known bug in code this table does not own: it is a
strict xfail, so fixing the bug makes it fail until the ``bug`` note is removed.

docs/BAD_INPUT.md is generated from this table, with the exact message of each row:

    .venv/bin/python tests/test_bad_input.py --write-doc [CASE_ID ...]   # all rows, or those

and ``test_bad_input`` fails when a row's message differs from the doc.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SMALL_CLASSES, SMALL_SHAPE, FailOnCall, cache_args
from pipeline.students import student_params
from stages.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "BAD_INPUT.md"
KDCACHE = Path(sys.executable).parent / "kdcache"

CLI = "CLI arguments"
CONFIG = "config keys and values"
DATASET = "dataset files"
CKPT = "checkpoints"
CACHE = "cache directories"
STAGE2 = "student / stage two"
EXPORT = "export"
PLUGINS = "plugins and model files"
OBJECT = "object storage"
CATEGORIES = (CLI, CONFIG, DATASET, CKPT, CACHE, STAGE2, EXPORT, PLUGINS, OBJECT)


@dataclass(frozen=True)
class Case:
    id: str  # unique, stable: the test id and the doc's row key
    category: str  # one of CATEGORIES
    kind: str  # what is wrong, in a few words
    setup: Callable[[Path], list[str]]  # writes the bad input under tmp, returns the argv
    message: str  # regex the one stderr line must match (searched, after the prefix)
    bug: str = ""  # a known bug elsewhere: the row is a strict xfail until it is fixed
    env: Callable[[], dict[str, str | None]] | None = None  # environment of the run (None: unset)


# =========================================================================== object storage

BUCKET = "kdcache-bad-input"  # the one bucket of the S3 server these rows run against
_S3: list = []


def s3_server():
    """moto's S3 server on the loopback, started on first use and stopped at exit."""
    if not _S3:
        from servers import S3Server

        server = S3Server().start()
        atexit.register(server.stop)
        with mock.patch.dict(os.environ, server.env()):
            server.create_bucket(BUCKET)
        _S3.append(server)
    return _S3[0]


def _closed_port() -> int:
    from servers import free_port

    return free_port()  # free a moment ago: nothing listens there


def s3_env(**changes: str | None) -> Callable[[], dict[str, str | None]]:
    return lambda: {**s3_server().env(), **changes}


def no_credentials() -> dict[str, str | None]:
    from servers import without_aws_credentials

    return {**s3_server().env(), **without_aws_credentials()}


def unreachable() -> dict[str, str | None]:
    from servers import free_port

    return {**s3_server().env(), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_MAX_ATTEMPTS": "1"}


@contextlib.contextmanager
def case_env(case: "Case"):
    """The case's environment inside the block (unset where it says None), restored after."""
    if case.env is None:
        yield
        return
    from s3fs import S3FileSystem

    env = case.env()
    # fsspec reuses a filesystem made under another environment (other credentials/endpoint)
    S3FileSystem.clear_instance_cache()
    with mock.patch.dict(os.environ, {k: v for k, v in env.items() if v is not None}):
        for key in [k for k, v in env.items() if v is None]:
            os.environ.pop(key, None)
        yield
    S3FileSystem.clear_instance_cache()


def bucket_objects() -> list[str]:
    """Every object in the bad-input bucket (it must stay empty)."""
    from pipeline import storage

    with mock.patch.dict(os.environ, s3_server().env()):
        return sorted(storage.files(storage.location(f"s3://{BUCKET}/x").parent))


# =========================================================================== inputs

def cache_cmd(tmp: Path, **overrides) -> list[str]:
    """`kdcache cache` of a tiny synthetic dataset into tmp/cache (see conftest.cache_args)."""
    return ["cache", *cache_args(tmp / "cache", tmp, **overrides)]


def arrays(n_train: int = 40, n_test: int = 12, width: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x_train": rng.standard_normal((n_train, width)).astype(np.float32),
            "y_train": np.arange(n_train) % 3,
            "x_test": rng.standard_normal((n_test, width)).astype(np.float32),
            "y_test": np.arange(n_test) % 3}


def write_npz(path: Path, **replace) -> Path:
    """A valid 3-class npz, with arrays replaced (None drops one)."""
    values = {**arrays(), **replace}
    np.savez(path, **{k: v for k, v in values.items() if v is not None})
    return path


def npz_cmd(tmp: Path, path: Path) -> list[str]:
    return cache_cmd(tmp, dataset=f"npz:{path}", teacher="mlp")


def npz_case(**replace) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        return npz_cmd(tmp, write_npz(tmp / "data.npz", **replace))
    return setup


def write_images(root: Path, classes=("cat", "dog"), splits=("train", "test"), n: int = 3) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    return root


def images_case(edit: Callable[[Path], None] = lambda root: None, size: str = "",
                **kwargs) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        root = write_images(tmp / "images", **kwargs)
        edit(root)
        return cache_cmd(tmp, dataset=f"imagefolder:{root}{size}", teacher="mlp")
    return setup


def text_table(rows: int = 30, **columns: Callable[[int], object]) -> list[dict]:
    """``rows`` rows of a valid 3-class text table (columns text, label), with columns replaced
    or added by ``name=lambda i: value`` (a value of None drops the column from that row)."""
    base = {"text": lambda i: f"document number {i}, about {('ham', 'news', 'spam')[i % 3]}",
            "label": lambda i: ("ham", "news", "spam")[i % 3]}
    base.update(columns)
    return [{k: f(i) for k, f in base.items() if f(i) is not None} for i in range(rows)]


def write_text_csv(path: Path, rows: list[dict]) -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def text_cmd(tmp: Path, path: Path, *args: str) -> list[str]:
    # mlp: the dataset is refused before any teacher is looked at
    return [*cache_cmd(tmp, dataset=f"text:{path}", teacher="mlp"), *args]


def text_case(rows: int = 30, args: tuple[str, ...] = (), name: str = "mail.csv",
              **columns: Callable[[int], object]) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        return text_cmd(tmp, write_text_csv(tmp / name, text_table(rows, **columns)), *args)
    return setup


def text_bytes(data: bytes, name: str = "mail.csv") -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        (tmp / name).write_bytes(data)
        return text_cmd(tmp, tmp / name)
    return setup


def write_textdir(root: Path, classes=("ham", "spam"), n: int = 4) -> Path:
    for split in ("train", "test"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (root / split / cls / f"{i}.txt").write_text(f"{cls} document {i}", encoding="utf-8")
    return root


def textdir_case(edit: Callable[[Path], None] = lambda root: None,
                 **kwargs) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        root = write_textdir(tmp / "docs", **kwargs)
        edit(root)
        return cache_cmd(tmp, dataset=f"textdir:{root}", teacher="mlp")
    return setup


def teacher_state(arch: str = "cnn_small", shape=SMALL_SHAPE, classes: int = SMALL_CLASSES) -> dict:
    from pipeline.teachers import create_teacher

    torch.manual_seed(0)
    return create_teacher(arch, shape, classes).state_dict()


def ckpt_case(make: Callable[[Path], Path], **overrides) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        return cache_cmd(tmp, teacher_ckpt=make(tmp), **overrides)
    return setup


def saved(name: str, payload) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        torch.save(payload() if callable(payload) else payload, tmp / name)
        return tmp / name
    return make


def written(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        (tmp / name).write_bytes(data)
        return tmp / name
    return make


def _truncated_safetensors(tmp: Path) -> Path:
    from safetensors.torch import save_file

    path = tmp / "teacher.safetensors"
    save_file(teacher_state(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _edited_state(edit: Callable[[dict], None], name: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        state = teacher_state()
        edit(state)
        torch.save(state, tmp / name)
        return tmp / name
    return make


class Payload:
    """Unpickling this creates a directory: proof that a pickle was executed."""

    def __init__(self, sentinel: Path):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (os.mkdir, (self.sentinel,))


SENTINEL = "UNPICKLED"


def _pickle_dump(path: Path, obj) -> Path:
    import pickle

    path.write_bytes(pickle.dumps(obj, protocol=4))
    return path


# --------------------------------------------------------------------------- caches

_TEMPLATE_DIRS: list[Path] = []
atexit.register(lambda: [shutil.rmtree(d, ignore_errors=True) for d in _TEMPLATE_DIRS])


def build(root: Path, work: Path, **overrides) -> dict:
    from stages import cache as cache_stage

    return cache_stage.main(cache_args(root, work, **overrides))


def _interrupted_build(root: Path) -> None:
    """A real interrupted build: Ctrl-C while the third shard is being computed."""
    from pipeline.cache import shard

    interrupted = FailOnCall(shard.compute_shard, fail_on=3, error=KeyboardInterrupt)
    with mock.patch.object(shard, "compute_shard", interrupted), pytest.raises(KeyboardInterrupt):
        build(root, root.parent)


def _one_class_teacher(root: Path) -> None:
    """A cache whose teacher predicts class 0 for every row (a huge bias on its head)."""
    state = teacher_state("mlp")
    state["head.bias"] = torch.tensor([50.0, 0.0, 0.0])
    ckpt = root.parent / "one_class.pt"
    torch.save(state, ckpt)
    build(root, root.parent, teacher="mlp", teacher_ckpt=ckpt)


TEMPLATES: dict[str, Callable[[Path], None]] = {
    "synthetic": lambda root: build(root, root.parent),  # cnn_small, random weights, 300 rows
    "incomplete": _interrupted_build,
    "one-class": _one_class_teacher,
    "sample": lambda root: build(root, root.parent, logits="sample:4"),  # drawn at T=4
    "topk": lambda root: build(root, root.parent, logits="topk:2"),
    "topk+sample": lambda root: build(root, root.parent, logits="topk:1+sample:4"),  # drawn at T=4
}


@functools.cache
def template(name: str) -> Path:
    """A cache built once per process (outside every test's tmp dir); rows copy it."""
    work = Path(tempfile.mkdtemp(prefix=f"kdcache-template-{name}-"))
    _TEMPLATE_DIRS.append(work)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        TEMPLATES[name](work / "cache")
    return work / "cache"


def copy_cache(tmp: Path, name: str = "synthetic") -> Path:
    return Path(shutil.copytree(template(name), tmp / "cache"))


def student_cmd(*args: str, verb: str = "student", cache: str = "synthetic") -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        root = copy_cache(tmp, cache)
        return [verb, f"cache={root}", f"runs_dir={tmp / 'runs'}", *args]
    return setup


def damaged(verb: str, edit: Callable[[Path], None], cache: str = "synthetic",
            *args: str) -> Callable[[Path], list[str]]:
    """A copy of a template cache, edited, then opened by ``verb``."""
    def setup(tmp: Path) -> list[str]:
        root = copy_cache(tmp, cache)
        edit(root)
        extra = [f"runs_dir={tmp / 'runs'}"] if verb in ("student", "sweep") else []
        return [verb, f"cache={root}", *extra, *args]
    return setup


def _rewrite_manifest(**changes) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        from pipeline.cache import format as fmt

        manifest = json.loads((root / fmt.MANIFEST).read_text())
        fmt.write_manifest(root, {**manifest, **changes})  # with a valid checksum, if it has one
    return edit


def _hand_edit_manifest(root: Path) -> None:
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["temperature"] = 2.0
    path.write_text(json.dumps(manifest, indent=2))


def _flip_a_chunk_byte(root: Path) -> None:
    chunk = next(p for p in sorted((root / "arrays.zarr" / "train" / "features").rglob("*"))
                 if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))


def _another_teacher(tmp: Path) -> list[str]:
    copy_cache(tmp)  # the seed-0 random teacher
    return cache_cmd(tmp, seed=1)


def _stored_teacher_of_other_data(tmp: Path) -> list[str]:
    """The default teacher's folder holds weights whose metrics.json records another dataset's
    fingerprint (a folder copied by hand): using it would silently score other data."""
    from safetensors.torch import save_file

    from pipeline.config import CacheConfig
    from pipeline.settings import resolve
    from pipeline.data import open_dataset
    from pipeline.teacher_training import teacher_dir

    argv = [a for a in cache_cmd(tmp) if not a.startswith("teacher_ckpt=")]  # the default teacher
    cfg = resolve(CacheConfig, argv[1:], verb="cache")
    folder = teacher_dir(cfg, open_dataset(cfg))
    folder.mkdir(parents=True)
    save_file(teacher_state(), str(folder / "model.safetensors"))
    (folder / "metrics.json").write_text(json.dumps({"dataset_fingerprint": "0123456789ab" * 5 + "cdef"}))
    return argv


def _locked(tmp: Path) -> list[str]:
    """Another build holds the cache's lock (flock conflicts between open files, even in one
    process); the fd stays open for the life of the test process."""
    copy_cache(tmp)
    fd = os.open(tmp / ".cache.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _HELD_LOCKS.append(fd)
    return cache_cmd(tmp)


_HELD_LOCKS: list[int] = []
atexit.register(lambda: [os.close(fd) for fd in _HELD_LOCKS])


def _changed_dataset(tmp: Path) -> list[str]:
    """A cache built from an npz file that is then rewritten with one value changed."""
    path = write_npz(tmp / "data.npz")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        build(tmp / "cache", tmp, dataset=f"npz:{path}", teacher="mlp")
    changed = arrays()
    changed["x_test"][0, 0] += 1.0
    write_npz(path, **changed)
    return ["student", f"cache={tmp / 'cache'}", f"runs_dir={tmp / 'runs'}", "model=mlp", "epochs=1"]


def _yaml(text: str | bytes) -> Callable[[Path], list[str]]:
    """`kdcache cache ... config=run.yaml` with this YAML file."""
    def setup(tmp: Path) -> list[str]:
        path = tmp / "run.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return [*cache_cmd(tmp), f"config={path}"]
    return setup


def _blocked_runs_dir(tmp: Path) -> list[str]:
    (tmp / "afile").write_text("a file where runs_dir needs a directory")
    root = copy_cache(tmp)
    return ["student", f"cache={root}", f"runs_dir={tmp / 'afile' / 'runs'}", "model=logreg"]


def _npz_bytes(data: bytes) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        (tmp / "data.npz").write_bytes(data)
        return npz_cmd(tmp, tmp / "data.npz")
    return setup


def _npz_truncated(tmp: Path) -> list[str]:
    path = write_npz(tmp / "data.npz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return npz_cmd(tmp, path)


def _npy_not_npz(tmp: Path) -> list[str]:
    with open(tmp / "data.npz", "wb") as f:
        np.save(f, arrays()["x_train"])
    return npz_cmd(tmp, tmp / "data.npz")


def _npz_objects(tmp: Path) -> list[str]:
    objects = np.array([Payload(tmp / SENTINEL)] * 40, dtype=object)
    return npz_cmd(tmp, write_npz(tmp / "data.npz", x_train=objects))


def _not_an_image(root: Path) -> None:
    (root / "train" / "cat" / "notes.png").write_text("not a picture")


def _foreign_class(root: Path) -> None:
    write_images(root, classes=("cow",), splits=("test",), n=1)


def _empty_class(root: Path) -> None:
    (root / "train" / "bird").mkdir()


def _no_test_images(root: Path) -> None:
    for p in (root / "test").rglob("*.png"):
        p.unlink()


def _mkdir(name: str, content: str | None = None) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        (tmp / name).mkdir()
        if content is not None:
            (tmp / name / "thesis.tex").write_text(content)
        return tmp / name
    return make


def _mkfile(name: str, content: str = "precious") -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        (tmp / name).write_text(content)
        return tmp / name
    return make


def with_path(make: Callable[[Path], Path], argv: Callable[[Path, Path], list[str]]) -> Callable[[Path], list[str]]:
    return lambda tmp: argv(tmp, make(tmp))


def trained_run(tmp: Path, model: str) -> Path:
    """A finished run of ``model`` (one epoch) on a copy of the synthetic template cache."""
    root = copy_cache(tmp)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        quick = ["epochs=1"] if "epochs" in student_params(model) else []
        assert main(["student", f"cache={root}", f"runs_dir={tmp / 'runs'}", f"model={model}",
                     *quick]) == 0
    return next((tmp / "runs" / "cache").iterdir())


def export_cmd(model: str, *args: str, edit: Callable[[Path], None] = lambda run: None) -> Callable[[Path], list[str]]:
    """`kdcache export` of a finished ``model`` run, its directory edited first."""
    def setup(tmp: Path) -> list[str]:
        run = trained_run(tmp, model)
        edit(run)
        return ["export", f"run={run}", *args]
    return setup


def _remove_cache(run: Path) -> None:
    shutil.rmtree(run.parents[2] / "cache")


def _tear_weights(run: Path) -> None:
    path = run / "student.safetensors"
    path.write_bytes(path.read_bytes()[:100])


def _other_model(run: Path) -> None:
    path = run / "config.json"
    record = json.loads(path.read_text())
    record["config"]["params"]["width"] = 7
    path.write_text(json.dumps(record))


# --------------------------------------------------------------------------- plugins

# Plugin modules live outside every test's tmp directory (importing one writes __pycache__),
# on sys.path for the life of the test process.
_PLUGIN_DIR = Path(tempfile.mkdtemp(prefix="kdcache-plugins-"))
_TEMPLATE_DIRS.append(_PLUGIN_DIR)
sys.path.insert(0, str(_PLUGIN_DIR))
(_PLUGIN_DIR / "kdbad_ok.py").write_text('''
"""A plugin module with wrong objects in it."""


def not_a_module(input_shape, num_classes):
    return {"weights": [1, 2, 3]}


def not_a_dataset(arg, cfg):
    return [1, 2, 3]


class Undeclared:
    """A student that declares no kind."""
''')
(_PLUGIN_DIR / "kdbad_raises.py").write_text('raise RuntimeError("broken on purpose")\n')


def plugin_cmd(*args: str) -> Callable[[Path], list[str]]:
    return lambda tmp: cache_cmd(tmp, **dict(a.split("=", 1) for a in args))


def tiny_onnx(path: Path, input_shape=(1, 8, 8), classes: int = 3) -> Path:
    """A real ONNX classifier (Flatten -> Gemm), written with onnx's helpers."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    d = int(np.prod(input_shape))
    w = numpy_helper.from_array(np.zeros((d, classes), np.float32), "w")
    b = numpy_helper.from_array(np.zeros(classes, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["flat"]), helper.make_node("Gemm", ["flat", "w", "b"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *input_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])], [w, b])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def onnx_case(make: Callable[[Path], Path], **overrides) -> Callable[[Path], list[str]]:
    return lambda tmp: cache_cmd(tmp, teacher="onnx", teacher_ckpt=make(tmp), **overrides)


# =========================================================================== the table

S = "synthetic:300:1x8x8:3"  # the tiny dataset of every cache_cmd

CASES: list[Case] = [
    # ------------------------------------------------------------------ CLI arguments
    Case("unknown-verb", CLI, "a verb kdcache does not have",
         lambda tmp: ["frobnicate", "dataset=digits"],
         r"unknown verb 'frobnicate'; verbs: teacher, cache, info, student, sweep, report, verify"),
    Case("unknown-option", CLI, "a --flag (kdcache takes key=value and --json only)",
         lambda tmp: [*cache_cmd(tmp), "--force"], r"unknown option '--force'"),
    Case("not-key-value", CLI, "a bare word instead of key=value",
         lambda tmp: [*cache_cmd(tmp), "digits"], r"argument 'digits' is not key=value"),
    Case("empty-key", CLI, "=value with no key",
         lambda tmp: [*cache_cmd(tmp), "=digits"], r"argument '=digits' is not key=value"),
    Case("unknown-key", CLI, "a key no config has (a typo)",
         lambda tmp: cache_cmd(tmp, colour="red"),
         r"unknown key 'colour' for `kdcache cache`; known keys: .*shard_size"),
    Case("key-of-another-verb", CLI, "a stage-one key given to stage two",
         lambda tmp: ["student", "dtype=float32"], r"unknown key 'dtype' for `kdcache student`"),

    # ------------------------------------------------------------------ config keys and values
    Case("int-not-a-number", CONFIG, "a word for an integer key",
         lambda tmp: cache_cmd(tmp, shard_size="big"), r"shard_size='big' is not valid: shard_size expects an integer"),
    Case("value-with-second-equals", CONFIG, "key=value=value",
         lambda tmp: cache_cmd(tmp, shard_size="64=3"), r"shard_size='64=3' is not valid"),
    Case("float-not-finite", CONFIG, "nan for a number",
         lambda tmp: cache_cmd(tmp, temperature="nan"),
         r"temperature='nan' is not valid: temperature expects a finite number"),
    Case("float-beyond-float32", CONFIG, "a number beyond float32",
         lambda tmp: cache_cmd(tmp, lr="1e39"), r"lr='1e39' is beyond the float32 range"),
    Case("bool-not-a-bool", CONFIG, "a bool key given maybe",
         lambda tmp: cache_cmd(tmp, pool="maybe"), r"pool='maybe' is not valid: pool expects true or false"),
    Case("temperature-zero", CONFIG, "temperature=0 for the cache",
         lambda tmp: cache_cmd(tmp, temperature="0"), r"temperature=0.0 must be > 0"),
    Case("val-fraction-out-of-range", CONFIG, "val_fraction outside (0, 0.9)",
         lambda tmp: cache_cmd(tmp, val_fraction="0.95"), r"val_fraction=0.95 must be in \(0, 0.9\)"),
    Case("shard-not-multiple-of-chunk", CONFIG, "shard_size not a multiple of chunk_size",
         lambda tmp: cache_cmd(tmp, chunk_size=48), r"shard_size=64 must be a multiple of chunk_size=48"),
    Case("chunk-too-large", CONFIG, "a chunk of a million rows",
         lambda tmp: cache_cmd(tmp, chunk_size=10**6, shard_size=10**6), r"chunk_size=1000000 must be at most 65536"),
    Case("shard-too-many-chunks", CONFIG, "a shard of 65,536 chunks",
         lambda tmp: cache_cmd(tmp, shard_size=2**20), r"shard_size=1048576 must be at most 4096 chunks"),
    Case("unknown-dtype", CONFIG, "dtype=float64",
         lambda tmp: cache_cmd(tmp, dtype="float64"), r"dtype='float64' is not supported; use float16 or float32"),
    Case("unknown-compression", CONFIG, "compression=lz4",
         lambda tmp: cache_cmd(tmp, compression="lz4"), r"compression='lz4' is not supported; use none or zstd"),
    Case("negative-threads", CONFIG, "threads=-1",
         lambda tmp: cache_cmd(tmp, threads=-1), r"threads=-1 must be >= 0"),
    Case("negative-streams", CONFIG, "streams=-1",
         lambda tmp: cache_cmd(tmp, streams=-1), r"streams=-1 must be >= 0 \(0 = auto\)"),
    Case("negative-decoders", CONFIG, "decoders=-1",
         lambda tmp: cache_cmd(tmp, decoders=-1), r"decoders=-1 must be in 0..256 \(0 = auto: one "
         r"process per core the teacher leaves free\)"),
    Case("logits-topk-zero", CONFIG, "logits=topk:0",
         lambda tmp: cache_cmd(tmp, logits="topk:0"),
         r"logits='topk:0' is not a logits mode; use dense, topk:K, sample:K or topk:K\+sample:M with "
         r"K, M >= 1"),
    Case("logits-topk-sample-zero", CONFIG, "logits=topk:K+sample:0",
         lambda tmp: cache_cmd(tmp, logits="topk:2+sample:0"), r"logits='topk:2\+sample:0' is not a logits mode"),
    Case("logits-topk-sample-all-classes", CONFIG, "logits=topk:K+sample:M with K >= the classes",
         lambda tmp: cache_cmd(tmp, logits="topk:3+sample:8"),
         r"logits=topk:3\+sample:8 keeps every one of the 3 classes; use logits=dense, or topk:K with K < 3"),
    Case("logits-sample-not-a-number", CONFIG, "logits=sample:x",
         lambda tmp: cache_cmd(tmp, logits="sample:x"), r"logits='sample:x' is not a logits mode"),
    Case("logits-unknown-mode", CONFIG, "logits=fp8",
         lambda tmp: cache_cmd(tmp, logits="fp8"), r"logits='fp8' is not a logits mode"),
    Case("logits-topk-no-k", CONFIG, "logits=topk (no K)",
         lambda tmp: cache_cmd(tmp, logits="topk"), r"logits='topk' is not a logits mode"),
    Case("logits-topk-all-classes", CONFIG, "logits=topk:K with K >= the classes",
         lambda tmp: cache_cmd(tmp, logits="topk:3"),
         r"logits=topk:3 keeps every one of the 3 classes; use logits=dense, or topk:K with K < 3"),
    Case("logits-topk-before-training", CONFIG, "topk:K >= C, with no teacher trained yet",
         lambda tmp: cache_cmd(tmp, logits="topk:5", teacher_ckpt=""),
         r"logits=topk:5 keeps every one of the 3 classes"),  # refused before a teacher is trained
    Case("sample-other-temperature", STAGE2, "another temperature than a sample cache's draws",
         student_cmd("model=mlp", "loss=kd", "temperature=2", cache="sample"),
         r"a sample cache holds classes drawn at its temperature 4, so it serves only that one; "
         r"train with temperature=4 \(not 2\), or build a topk or dense cache"),
    Case("topk-sample-other-temperature", STAGE2, "another temperature than a topk+sample cache's draws",
         student_cmd("model=mlp", "loss=kd", "temperature=2", cache="topk+sample"),
         r"a topk\+sample cache holds classes drawn at its temperature 4, so it serves only that one; "
         r"train with temperature=4 \(not 2\)"),
    Case("token-loss-on-classes", STAGE2, "a language-model loss for a classification student",
         student_cmd("model=mlp", "loss=jsd"),
         r"loss=jsd trains a language model from a token cache; model mlp is not one: use model=lm"),
    Case("lm-loss-without-token-form", STAGE2, "model=lm with a loss that has no per-position form",
         student_cmd("model=lm", "loss=dkd"),
         r"loss=dkd has no form on a token cache .*; use one of ce, jsd, kd, kd_renorm, kd_tail or reverse_kl"),
    Case("lm-on-an-array-cache", STAGE2, "model=lm on a cache of arrays",
         student_cmd("model=lm"), r"model lm reads tokens inputs, and cache .* holds array"),
    Case("sparse-standardize", STAGE2, "standardize_logits=true on a sparse cache",
         student_cmd("model=mlp", "standardize_logits=true", cache="topk"),
         r"standardize_logits=true needs every logit, and cache .* keeps logits=topk:2; use a dense cache"),
    Case("views-zero", CONFIG, "views=0",
         lambda tmp: cache_cmd(tmp, views=0), r"views=0 must be in 1..256 \(view 0 is the input itself\)"),
    Case("views-too-many", CONFIG, "more views than the cap",
         lambda tmp: cache_cmd(tmp, views=1000, augment="shift:1"), r"views=1000 must be in 1..256"),
    Case("views-without-augment", CONFIG, "views=4 with augment=none",
         lambda tmp: cache_cmd(tmp, views=4), r"views=4 with augment=none would cache 4 identical views"),
    Case("augment-without-views", CONFIG, "augment= with views=1",
         lambda tmp: cache_cmd(tmp, augment="shift:2"),
         r"augment=shift:2 with views=1 caches no augmented view .*pass views=K with K > 1"),
    Case("augment-unknown", CONFIG, "an augmentation policy kdcache does not know",
         lambda tmp: cache_cmd(tmp, views=2, augment="blur"),
         r"augment=blur: unknown augmentation policy 'blur'; known: crop, flip, rrc, shift"),
    Case("augment-negative-shift", CONFIG, "shift:-1",
         lambda tmp: cache_cmd(tmp, views=2, augment="shift:-1"),
         r"augment=shift:-1: shift:-1 is malformed; shift takes a maximal shift S in 0..64"),
    Case("augment-crop-not-a-number", CONFIG, "crop:x",
         lambda tmp: cache_cmd(tmp, views=2, augment="crop:x"),
         r"augment=crop:x: crop:x is malformed; crop takes a padding P in 0..64"),
    Case("augment-dangling-plus", CONFIG, "crop:4+ (nothing after +)",
         lambda tmp: cache_cmd(tmp, views=2, augment="crop:4+"),
         r"augment=crop:4\+: 'crop:4\+' is malformed; write NAME\[:ARG\] joined by \+"),
    Case("augment-flip-on-signals", CONFIG, "flip on 1-D signals",
         lambda tmp: cache_cmd(tmp, dataset="synthetic:300:16:3", teacher="mlp", views=2, augment="flip"),
         r"augment=flip: flip applies only to images \(C, H, W\), not to inputs shaped \(16,\)"),
    Case("augment-misfit-before-training", CONFIG, "a policy that does not fit, with no teacher trained yet",
         lambda tmp: cache_cmd(tmp, dataset="synthetic:300:16:3", teacher="mlp", teacher_ckpt="",
                               views=2, augment="flip"),
         r"augment=flip: flip applies only to images"),  # refused before a teacher is trained
    Case("augment-rrc-on-signals", CONFIG, "rrc on 1-D signals",
         lambda tmp: cache_cmd(tmp, dataset="synthetic:300:16:3", teacher="mlp", views=2, augment="rrc:0.3"),
         r"augment=rrc:0.3: rrc applies only to images"),
    Case("teacher-augment-unknown", CONFIG, "teacher_augment= a policy kdcache does not know",
         lambda tmp: cache_cmd(tmp, teacher_ckpt="", teacher_augment="jitter"),
         r"teacher_augment=jitter: unknown augmentation policy 'jitter'"),
    Case("negative-seed", CONFIG, "seed=-1",
         lambda tmp: cache_cmd(tmp, seed=-1), r"seed=-1 must be in 0..4294967295"),
    Case("unknown-device", CONFIG, "device=banana",
         lambda tmp: cache_cmd(tmp, device="banana"), r"device='banana' is not a device; use auto, cpu, cuda"),
    Case("unsupported-device", CONFIG, "a torch device kdcache does not run on",
         lambda tmp: cache_cmd(tmp, device="meta"), r"device='meta' is not a device"),
    Case("malformed-scheduler", CONFIG, "scheduler that is no address",
         lambda tmp: cache_cmd(tmp, scheduler="foo"), r"scheduler='foo' is not a scheduler; use local, synchronous"),
    Case("nul-in-path", CONFIG, "a NUL character in a path",
         lambda tmp: cache_cmd(tmp, cache=f"{tmp}/ca\x00che"), r"cache='.*ca\\x00che' contains a NUL character"),
    Case("unknown-teacher", CONFIG, "teacher=vgg99",
         lambda tmp: cache_cmd(tmp, teacher="vgg99"), r"unknown teacher 'vgg99'; known: .*cnn_small"),
    Case("teacher-does-not-fit-inputs", CONFIG, "a 3-channel teacher for 1-channel images",
         lambda tmp: cache_cmd(tmp, teacher="resnet18"), r"teacher resnet18 needs 3-channel images"),
    Case("unknown-layer", CONFIG, "a feature tap the teacher does not have",
         lambda tmp: cache_cmd(tmp, layers="fc9"), r"teacher cnn_small has no layer 'fc9'"),
    Case("yaml-missing", CONFIG, "config= a file that does not exist",
         lambda tmp: [*cache_cmd(tmp), f"config={tmp / 'nope.yaml'}"], r"config file .*nope.yaml does not exist"),
    Case("yaml-not-a-mapping", CONFIG, "config= a YAML list",
         _yaml("- dataset\n- digits\n"), r"config file .*run.yaml must hold a mapping of key: value"),
    Case("yaml-invalid", CONFIG, "config= broken YAML",
         _yaml("layers: [embed\n"), r"config file .*run.yaml is not valid YAML"),
    Case("yaml-not-utf8", CONFIG, "config= a binary file",
         _yaml(b"t: \xff\xfe\n"), r"config file .*run.yaml is not UTF-8 text"),
    Case("yaml-python-tag", CONFIG, "config= YAML that would build Python objects",
         _yaml("t: !!python/object/apply:os.system [echo hi]\n"), r"is not valid YAML \(could not determine a constructor"),
    Case("yaml-unknown-key", CONFIG, "config= a file with a typo key",
         _yaml("shard_sise: 64\n"), r"unknown key 'shard_sise' for `kdcache cache`"),
    Case("yaml-null-value", CONFIG, "config= a key with no value",
         _yaml("teacher:\n"), r"teacher has no value \(null\) in the config file"),
    Case("yaml-wrong-type", CONFIG, "config= a list for an integer",
         _yaml("epochs: [1, 2]\n"), r"epochs=\[1, 2\] is not valid: epochs expects an integer"),
    Case("yaml-mapping-for-list", CONFIG, "config= a mapping for a list key",
         _yaml("layers: {embed: 1}\n"), r"layers=\{'embed': 1\} is not valid: layers expects a comma-separated list"),
    Case("list-item-malformed", CONFIG, "a list with a non-integer item",
         lambda tmp: ["sweep", "grid.seed=0,one"], r"seed='one' is not valid: seed expects an integer"),
    Case("sweep-empty-list", CONFIG, "an empty grid axis",
         lambda tmp: ["sweep", "grid.model="], r"grid.model is empty; give it values"),

    # ------------------------------------------------------------------ dataset files
    Case("unknown-dataset", DATASET, "a dataset kind kdcache does not know",
         lambda tmp: cache_cmd(tmp, dataset="mnist"),
         r"unknown dataset 'mnist'; known: digits, digits3, imagefolder, npz, synthetic, text, textdir, tokens, torchvision"),
    Case("digits-with-argument", DATASET, "digits:ARG",
         lambda tmp: cache_cmd(tmp, dataset="digits:5"), r"dataset digits takes no argument"),
    Case("npz-no-path", DATASET, "npz: without a path",
         lambda tmp: cache_cmd(tmp, dataset="npz:"), r"dataset npz needs a path"),
    Case("npz-missing", DATASET, "an npz file that does not exist",
         lambda tmp: npz_cmd(tmp, tmp / "missing.npz"), r"npz file .*missing.npz does not exist"),
    Case("npz-is-a-directory", DATASET, "an npz path that is a directory",
         with_path(_mkdir("data.npz"), npz_cmd), r"npz file .*data.npz is not a file"),
    Case("npz-not-a-zip", DATASET, "a text file named .npz",
         _npz_bytes(b"definitely not a zip file"), r"data.npz is not a readable .npz archive"),
    Case("npz-truncated", DATASET, "an npz cut in half",
         _npz_truncated, r"data.npz is not a readable .npz archive \(BadZipFile\)"),
    Case("npz-single-array", DATASET, "a .npy array saved under an .npz name",
         _npy_not_npz, r"data.npz holds a single .npy array, not an .npz archive"),
    Case("npz-missing-key", DATASET, "no y_test",
         npz_case(y_test=None), r"has no array 'y_test'; it needs x_train, y_train, x_test, y_test"),
    Case("npz-val-half", DATASET, "x_val without y_val",
         npz_case(x_val=np.zeros((5, 6), np.float32)), r"has no array 'y_val'"),
    Case("npz-object-arrays", DATASET, "pickled Python objects (never unpickled)",
         _npz_objects, r"array 'x_train' holds Python objects, which kdcache never unpickles"),
    Case("npz-string-inputs", DATASET, "x of strings",
         npz_case(x_train=np.array([["a"] * 6] * 40)), r"x_train has dtype <U1; it must be a real numeric array"),
    Case("npz-complex-inputs", DATASET, "x of complex numbers",
         npz_case(x_train=np.ones((40, 6), np.complex64)), r"x_train has dtype complex64"),
    Case("npz-float-labels", DATASET, "y of floats",
         npz_case(y_train=(np.arange(40) % 3).astype(np.float32)),
         r"y_train has dtype float32; labels must be integers 0..K-1"),
    Case("npz-negative-labels", DATASET, "a label below 0",
         npz_case(y_test=np.arange(12) % 3 - 1), r"y_test has negative labels"),
    Case("npz-length-mismatch", DATASET, "x and y of different lengths",
         npz_case(y_train=np.arange(39) % 3), r"y_train has shape \(39,\); expected \(40,\) to match x_train"),
    Case("npz-empty-split", DATASET, "a split with 0 rows",
         npz_case(x_test=np.zeros((0, 6), np.float32), y_test=np.zeros(0, np.int64)), r"x_test is empty"),
    Case("npz-inputs-1d", DATASET, "x with one dimension",
         npz_case(x_train=np.zeros(40, np.float32)), r"x_train has shape \(40,\); expected \(N, D\)"),
    Case("npz-labels-2d", DATASET, "y with two dimensions",
         npz_case(y_train=np.zeros((40, 3), np.int64)), r"y_train has shape \(40, 3\)"),
    Case("npz-zero-width", DATASET, "x rows of 0 values",
         npz_case(x_train=np.zeros((40, 0), np.float32), x_test=np.zeros((12, 0), np.float32)),
         r"x_train has shape \(40, 0\); a sample needs at least one value"),
    Case("npz-shape-mismatch", DATASET, "x_test rows shaped unlike x_train rows",
         npz_case(x_test=np.zeros((12, 7), np.float32)), r"x_test rows have shape \(7,\) but x_train rows have \(6,\)"),
    Case("npz-single-class", DATASET, "one label for every row",
         npz_case(y_train=np.zeros(40, np.int64), y_test=np.zeros(12, np.int64)),
         r"labels hold a single class; a classifier needs at least 2"),
    Case("npz-label-missing-from-train", DATASET, "test labels train never has",
         npz_case(y_test=np.arange(12) % 5),
         r"labels must be 0..4 and each must occur in y_train; missing from y_train: \[3, 4\]"),
    Case("npz-huge-label", DATASET, "a label of 10**12",
         npz_case(y_test=np.full(12, 10**12)),
         r"labels must be 0..1000000000000 and each must occur in y_train; missing from y_train: \[3, 4, 5, 6, 7\]"),
    Case("npz-non-finite", DATASET, "inf in x",
         npz_case(x_test=np.full((12, 6), np.inf, np.float32)), r"x_test has 12 rows with NaN or inf"),
    Case("npz-beyond-float32", DATASET, "float64 values float32 cannot hold",
         npz_case(x_train=np.full((40, 6), 1e300)), r"x_train holds values up to 1e\+300, beyond float32"),
    Case("imagefolder-no-path", DATASET, "imagefolder: without a path",
         lambda tmp: cache_cmd(tmp, dataset="imagefolder:"), r"dataset imagefolder needs a path"),
    Case("imagefolder-no-splits", DATASET, "a folder without train/ and test/",
         lambda tmp: cache_cmd(tmp, dataset=f"imagefolder:{tmp}"), r"must hold train/ and test/ folders"),
    Case("imagefolder-one-class", DATASET, "a single class folder",
         images_case(classes=("cat",)), r"images/train must hold at least two class folders"),
    Case("imagefolder-no-images", DATASET, "test/ with no image files",
         images_case(_no_test_images), r"images/test holds no images \(\*.bmp"),
    Case("imagefolder-empty-class", DATASET, "a train class folder with no images",
         images_case(_empty_class), r"images/train/bird holds no images; every class needs training images"),
    Case("imagefolder-not-an-image", DATASET, "a .png that is not an image",
         images_case(_not_an_image), r"images/train/cat/notes.png is not a readable image \(UnidentifiedImageError\)"),
    Case("imagefolder-foreign-class", DATASET, "a test class that train lacks",
         images_case(_foreign_class), r"images/test has class folders that .*images/train lacks: cow"),
    Case("imagefolder-size-not-int", DATASET, "a size that is no integer",
         images_case(size=":big"), r"imagefolder size 'big' is not an integer"),
    Case("imagefolder-size-zero", DATASET, "a size of 0 pixels",
         images_case(size=":0"), r"imagefolder size 0 must be in 1..1024 pixels"),
    Case("synthetic-malformed", DATASET, "a synthetic spec that does not parse",
         lambda tmp: cache_cmd(tmp, dataset="synthetic:abc"), r"dataset synthetic:abc is malformed"),
    Case("synthetic-too-few-rows", DATASET, "synthetic with N < 30",
         lambda tmp: cache_cmd(tmp, dataset="synthetic:10:8"), r"dataset synthetic:10:8 is malformed; .*N >= 30"),
    Case("synthetic-one-class", DATASET, "synthetic with 1 class",
         lambda tmp: cache_cmd(tmp, dataset="synthetic:100:8:1"), r"dataset synthetic:100:8:1 is malformed"),
    Case("torchvision-unknown", DATASET, "a torchvision name kdcache does not support",
         lambda tmp: cache_cmd(tmp, dataset="torchvision:ImageNet"), r"unknown torchvision dataset 'ImageNet'; known: CIFAR10"),
    Case("torchvision-not-downloaded", DATASET, "a torchvision dataset not on disk",
         lambda tmp: cache_cmd(tmp, dataset="torchvision:MNIST", data_root=tmp / "datasets"),
         r"torchvision dataset MNIST not found under .*datasets .*pass download=true"),
    Case("text-no-path", DATASET, "text: without a path",
         lambda tmp: cache_cmd(tmp, dataset="text:"), r"dataset text needs a path: dataset=text:PATH.csv"),
    Case("text-missing", DATASET, "a text file that does not exist",
         lambda tmp: text_cmd(tmp, tmp / "mail.csv"), r"text file .*mail.csv does not exist"),
    Case("text-is-a-folder", DATASET, "text: given a folder of class folders",
         with_path(lambda tmp: write_textdir(tmp / "docs"), text_cmd),
         r"text file .*docs is a folder; .* or dataset=textdir:PATH for a folder of class folders"),
    Case("text-unsupported-suffix", DATASET, "a spreadsheet, not CSV/JSONL/Parquet",
         text_bytes(b"PK\x03\x04 spreadsheet", name="mail.xlsx"),
         r"mail.xlsx is not a .csv, .tsv, .jsonl or .parquet file"),
    Case("text-json-array", DATASET, "a .json holding one JSON array, not JSON Lines",
         text_bytes(json.dumps(text_table()).encode(), name="mail.json"),
         r"mail.json cannot be read as JSON Lines \(one object per line\)"),
    Case("text-no-text-column", DATASET, "no column named text",
         text_case(text=lambda i: None, body=lambda i: f"document {i}"),
         r"mail.csv has no text column 'text' \(its columns: label, body\); pass text_column=NAME"),
    Case("text-no-label-column", DATASET, "label_column= a column the file lacks",
         text_case(args=("label_column=topic",)),
         r"mail.csv has no label column 'topic' \(its columns: text, label\); pass label_column=NAME"),
    Case("text-empty-text", DATASET, "a row with no text",
         text_case(text=lambda i: "  " if i == 4 else f"document {i}"),
         r"mail.csv: row 5 below the header has an empty 'text'; remove the row or give it text"),
    Case("text-float-labels", DATASET, "labels that are decimal numbers",
         text_case(label=lambda i: i % 3 + 0.5),
         r"label column 'label' holds double numbers; labels must be integers or strings"),
    Case("text-missing-label", DATASET, "a row with no label",
         text_case(label=lambda i: "" if i == 7 else "ab"[i % 2]),
         r"mail.csv: row 8 below the header has no label in 'label'"),
    Case("text-not-utf8", DATASET, "a CSV saved as Latin-1",
         text_bytes("text,label\nhello,a\nbye,b\ncaf\u00e9,a\n".encode("latin-1")),
         r"mail.csv is not valid UTF-8 \(line 4, byte 28\); re-save it as UTF-8"),
    Case("text-one-class", DATASET, "every row has the same label",
         text_case(label=lambda i: "spam"), r"every row has the label 'spam' in 'label'; a classifier needs at least 2"),
    Case("text-unknown-split", DATASET, "a split column with a value other than train/val/test",
         text_case(split=lambda i: ("train", "dev", "test")[i % 3]),
         r"column 'split' holds 'dev' \(row 2 below the header\); its values must be train, val or test"),
    Case("text-split-without-test", DATASET, "a split column with no test rows",
         text_case(split=lambda i: ("train", "val")[i % 2]),
         r"column 'split' has no test rows; mark some rows test, or drop the column"),
    Case("text-class-only-in-test", DATASET, "a class with no training rows",
         text_case(split=lambda i: "test" if i % 3 == 2 or i == 0 else "train"),
         r"mail.csv: class 'spam' has no training rows; give it training rows or remove it"),
    Case("text-class-carved-away", DATASET, "a class whose only row is carved into test or val",
         text_case(rows=4), r"class 'spam' has 1 row\(s\), none left for training once test and val are carved"),
    Case("text-too-few-rows", DATASET, "too few rows to carve test and val from",
         text_case(rows=2), r"1 row\(s\) are too few to carve 0.15 of them off as a split; give the dataset more rows"),
    Case("textdir-missing", DATASET, "a text folder that does not exist",
         lambda tmp: cache_cmd(tmp, dataset=f"textdir:{tmp / 'docs'}"), r"text folder .*docs does not exist"),
    Case("textdir-one-class", DATASET, "a single class folder",
         textdir_case(classes=("ham",)), r"docs/train must hold at least two class folders"),
    Case("textdir-empty-file", DATASET, "an empty .txt",
         textdir_case(lambda root: (root / "test" / "spam" / "2.txt").write_text("\n")),
         r"docs/test/spam/2.txt is empty; remove it or give it text"),
    Case("textdir-not-utf8", DATASET, "a .txt saved as Latin-1",
         textdir_case(lambda root: (root / "train" / "ham" / "1.txt").write_bytes("na\u00efve".encode("latin-1"))),
         r"docs/train/ham/1.txt is not valid UTF-8 \(byte 2\); re-save it as UTF-8"),

    # ------------------------------------------------------------------ checkpoints
    Case("ckpt-missing", CKPT, "teacher_ckpt= a file that does not exist",
         lambda tmp: cache_cmd(tmp, teacher_ckpt=tmp / "nope.pt"), r"teacher checkpoint .*nope.pt does not exist"),
    Case("ckpt-is-a-directory", CKPT, "teacher_ckpt= a directory",
         ckpt_case(_mkdir("teacher.pt")), r"teacher checkpoint .*teacher.pt is not a file"),
    Case("ckpt-pickle-payload", CKPT, "a torch.save of Python objects (never unpickled)",
         ckpt_case(lambda tmp: saved("payload.pt", {"w": Payload(tmp / SENTINEL)})(tmp)),  # unpickling it makes a dir
         r"teacher checkpoint .*payload.pt .*(pickled|Python objects)"),
    Case("ckpt-plain-pickle", CKPT, "a pickle.dump file (torch warns before refusing it)",
         ckpt_case(lambda tmp: _pickle_dump(tmp / "plain.pt", {"w": Payload(tmp / SENTINEL)})),
         r"teacher checkpoint .*plain.pt cannot be read safely \(not a torch state dict file\)"),
    Case("ckpt-not-tensors", CKPT, "a dict of lists, not tensors",
         ckpt_case(saved("lists.pt", {"w": [1.0, 2.0]})), r"teacher checkpoint .*lists.pt does not hold a state dict of tensors"),
    Case("ckpt-bare-tensor", CKPT, "one tensor, not a state dict",
         ckpt_case(saved("tensor.pt", torch.zeros(3))), r"teacher checkpoint .*tensor.pt does not hold a state dict of tensors"),
    Case("ckpt-empty-file", CKPT, "a 0-byte .pt",
         ckpt_case(written("empty.pt", b"")), r"teacher checkpoint .*empty.pt cannot be read safely"),
    Case("safetensors-garbage", CKPT, "a .safetensors that is not one",
         ckpt_case(written("teacher.safetensors", b"garbage" * 3)),
         r"teacher checkpoint .*teacher.safetensors cannot be read safely \(SafetensorError"),
    Case("safetensors-truncated", CKPT, "a .safetensors cut in half",
         ckpt_case(_truncated_safetensors), r"teacher checkpoint .*teacher.safetensors cannot be read safely"),
    Case("ckpt-other-architecture", CKPT, "an mlp checkpoint for teacher=cnn_small",
         ckpt_case(saved("mlp.pt", lambda: teacher_state("mlp"))),
         r"checkpoint .*mlp.pt does not fit teacher cnn_small \(missing: .*; unexpected: .*\); pass the teacher="),
    Case("ckpt-other-classes", CKPT, "a checkpoint for 5 classes on 3-class data",
         ckpt_case(saved("five.pt", lambda: teacher_state(classes=5))),
         r"checkpoint .*five.pt holds a cnn_small teacher for 5 classes, but the data has 3 classes; it "
         r"was trained on other data: pass a checkpoint trained on this dataset"),
    Case("stored-teacher-other-data", CKPT, "a stored teacher folder copied from another dataset's",
         _stored_teacher_of_other_data,
         r"stored teacher .*/teachers/synthetic-300-1x8x8-3/cnn_small-[0-9a-f]{12} was trained on other "
         r"data \(dataset fingerprint [0-9a-f]{12}, this data's is [0-9a-f]{12}\); delete "),
    Case("ckpt-nan-weights", CKPT, "NaN weights",
         ckpt_case(_edited_state(lambda s: s["head.weight"].fill_(float("nan")), "nan.pt")),
         r"teacher cnn_small produced NaN/inf outputs on the first training rows; check the checkpoint"),
    Case("ckpt-nan-features", CKPT, "weights that give NaN features (negative variance)",
         ckpt_case(_edited_state(lambda s: s["block1.1.running_var"].fill_(-1.0), "neg_var.pt")),
         r"teacher cnn_small produced NaN/inf outputs"),
    Case("pretrained-unavailable", CKPT, "pretrained=true for a teacher torchvision has no weights for",
         lambda tmp: ["teacher", f"dataset={S}", "teacher=mlp", "pretrained=true",
                      f"teacher_dir={tmp / 'teachers'}"],
         r"teacher mlp has no torchvision pretrained weights; set pretrained=false"),

    # ------------------------------------------------------------------ cache directories
    Case("cache-path-is-a-directory", CACHE, "cache= a directory of other files",
         with_path(_mkdir("cache", "precious"), lambda tmp, _: cache_cmd(tmp)),
         r"cache exists and is not a kdcache cache; choose another cache=PATH"),
    Case("cache-path-is-a-file", CACHE, "cache= a file",
         with_path(_mkfile("cache"), lambda tmp, _: cache_cmd(tmp)), r"cache exists and is not a kdcache cache"),
    Case("cache-of-another-teacher", CACHE, "building into a cache of other weights",
         _another_teacher, r"cache .*cache was built from another teacher .*overwrite=true"),
    Case("cache-being-built", CACHE, "a cache another process is building",
         _locked, r"cache .*cache is being built by another process; wait for it to finish"),
    Case("info-missing", CACHE, "info on a path with no cache",
         lambda tmp: ["info", f"cache={tmp / 'cache'}"], r"no kdcache cache at .*cache \(manifest.json missing\)"),
    Case("info-default-missing", CACHE, "info with no cache= and no default cache",
         lambda tmp: ["info", f"dataset={S}", f"cache_root={tmp / 'caches'}"],
         r"no cache of dataset=synthetic:300:1x8x8:3 under .*caches; build one with `kdcache cache dataset=synthetic:300:1x8x8:3`, or pass cache=PATH"),
    Case("verify-not-a-cache", CACHE, "verify on a plain file",
         with_path(_mkfile("notes.txt"), lambda tmp, p: ["verify", f"cache={p}"]), r"no kdcache cache at .*notes.txt"),
    Case("report-not-a-cache", CACHE, "report on a directory that is no cache",
         with_path(_mkdir("photos"), lambda tmp, p: ["report", f"cache={p}"]), r"no kdcache cache at .*photos"),
    Case("manifest-not-json", CACHE, "a manifest.json that is not JSON",
         damaged("student", lambda root: (root / "manifest.json").write_text("{not json")),
         r"cache/manifest.json is not valid JSON .*rebuild it"),
    Case("manifest-not-an-object", CACHE, "a manifest.json holding a list",
         damaged("info", lambda root: (root / "manifest.json").write_text("[1, 2]")),
         r"cache/manifest.json is not a kdcache manifest"),
    Case("manifest-edited", CACHE, "a manifest.json edited by hand",
         damaged("info", _hand_edit_manifest), r"cache/manifest.json was modified after kdcache wrote it"),
    Case("format-version-newer", CACHE, "a cache from a newer kdcache",
         damaged("verify", _rewrite_manifest(format_version=5)),
         r"cache has cache format version 5; this kdcache reads versions 1, 2, 3 and 4"),
    Case("incomplete-cache-student", CACHE, "student on an interrupted build",
         damaged("student", lambda root: None, "incomplete"),
         r"cache .*cache is incomplete \(2/6 shards; its build was interrupted\); finish it"),
    Case("incomplete-cache-verify", CACHE, "verify on an interrupted build",
         damaged("verify", lambda root: None, "incomplete"), r"cache .*cache is incomplete"),
    Case("arrays-missing", CACHE, "a cache without arrays.zarr",
         damaged("student", lambda root: shutil.rmtree(root / "arrays.zarr")),
         r"arrays.zarr cannot be opened as a Zarr group .*rebuild it"),
    Case("index-damaged", CACHE, "a damaged Parquet index",
         damaged("student", lambda root: (root / "index" / "train.parquet").write_text("junk")),
         r"index .*train.parquet .*the cache is damaged: `kdcache cache cache=.* repair=true` recomputes"),
    Case("chunk-damaged", CACHE, "a flipped byte in a stored chunk",
         damaged("student", _flip_a_chunk_byte),
         r"cache array .*train/features/embed cannot be read .*`kdcache cache cache=.* repair=true` recomputes"),

    # ------------------------------------------------------------------ student / stage two
    Case("student-missing-cache", STAGE2, "cache= a path with no cache",
         lambda tmp: ["student", f"cache={tmp / 'no-such-cache'}", "model=linear_svc"], r"no kdcache cache at"),
    Case("unknown-model", STAGE2, "model=nope",
         student_cmd("model=nope"), r"unknown student 'nope'; known: cnn1d, cnn_small, fasttext, linear_svc"),
    Case("unknown-loss", STAGE2, "loss=nope for an input student",
         student_cmd("model=cnn_small", "loss=nope"), r"unknown loss 'nope'; known: at, ce, crd, dist, dkd, .*kd, .*sp"),
    Case("unknown-loss-feature-student", STAGE2, "loss=nope for a feature student",
         student_cmd("model=linear_svc", "loss=nope"), r"unknown loss 'nope'"),
    Case("layer-not-in-cache", STAGE2, "a layer the cache did not store",
         student_cmd("layer=block9"), r"cache .*cache holds no layer 'block9'; it holds embed"),
    Case("negative-temperature", STAGE2, "temperature=-1",
         student_cmd("model=mlp", "temperature=-1"),
         r"temperature=-1 must be > 0"),
    Case("loss-does-not-apply", STAGE2, "loss= for a student trained without a loss",
         student_cmd("model=linear_svc", "loss=kd"),
         r"loss=kd does not apply: model linear_svc trains without a loss; drop loss= or pick a "
         r"student that takes one \(cnn1d, cnn_small, fasttext, lm, mlp, resnet_small, textcnn\)"),
    Case("temperature-does-not-apply", STAGE2, "temperature= for a loss without one",
         student_cmd("model=mlp", "loss=ce", "temperature=2"),
         r"temperature=2 does not apply: model mlp with loss ce takes no temperature \(it does: .*loss kd.*\); drop temperature="),
    Case("target-does-not-apply", STAGE2, "target= for a student that fits no hard targets",
         student_cmd("model=mlp", "target=teacher"),
         r"target=teacher does not apply: model mlp with loss kd takes no target \(it does: model linear_svc, "
         r"model logreg, model sgd, model tfidf_logreg, model tfidf_svc\); drop target="),
    Case("layer-does-not-apply", STAGE2, "layer= for a loss that reads no feature",
         student_cmd("model=mlp", "loss=kd", "layer=embed"),
         r"layer=embed does not apply: loss kd reads no cached feature; drop layer="),
    Case("student-views-zero", STAGE2, "views=0 for a student",
         student_cmd("views=0"), r"views='0' must be all or a number of views in 1..256"),
    Case("student-views-beyond-cache", STAGE2, "views=N larger than the cache holds",
         student_cmd("model=mlp", "views=8"), r"views=8 is more than cache .*cache holds \(1\); pass views=all"),
    Case("student-augment-with-kd", STAGE2, "fresh augmentation for a loss that reads cached logits",
         student_cmd("model=mlp", "loss=kd", "augment=shift:1"),
         r"augment=shift:1 does not apply to loss kd: it reads the teacher's cached outputs"),
    Case("student-augment-with-feature-loss", STAGE2, "fresh augmentation for a loss that reads cached features",
         student_cmd("model=mlp", "loss=rkd", "augment=shift:1"),
         r"augment=shift:1 does not apply to loss rkd: it reads the teacher's cached outputs"),
    Case("loss-weight-for-kd", STAGE2, "loss_weight= for a loss weighted by alpha",
         student_cmd("model=mlp", "loss=kd", "loss_weight=2"),
         r"loss_weight=2 does not apply: model mlp with loss kd takes no loss_weight \(it does: .*loss dist.*\)"),
    Case("loss-weight-negative", STAGE2, "loss_weight=-1",
         student_cmd("model=mlp", "loss=pkt", "loss_weight=-1"), r"loss_weight=-1 must be in \[0, 1e\+06\]"),
    Case("standardize-without-temperature", STAGE2, "standardize_logits=true for a loss without a temperature",
         student_cmd("model=mlp", "loss=ce", "standardize_logits=true"),
         r"standardize_logits=true does not apply: model mlp with loss ce takes no standardize_logits"),
    Case("student-layer-for-kd", STAGE2, "student_layer= for a loss that reads no feature",
         student_cmd("model=mlp", "loss=kd", "student_layer=fc1"),
         r"student_layer=fc1 does not apply: model mlp with loss kd takes no student_layer \(it does: loss at, loss crd"),
    Case("student-layer-unknown", STAGE2, "student_layer= that the student does not have",
         student_cmd("model=mlp", "loss=rkd", "student_layer=nope", "epochs=1"),
         r"student mlp has no layer 'nope'; its layers include: .*embed"),
    Case("map-loss-on-pooled-cache", STAGE2, "loss=at on a cache of pooled features",
         student_cmd("model=mlp", "loss=at"),
         r"loss at compares spatial feature maps, but cache .* holds layer embed pooled to \(\d+,\); "
         r"build a cache of a map with kdcache cache layers=NAME pool=false"),
    Case("student-augment-feature-student", STAGE2, "augment= for a feature student",
         student_cmd("model=linear_svc", "augment=shift:1"),
         r"augment=shift:1 does not apply: model linear_svc takes no augment \(it does: model cnn1d"),
    Case("alpha-above-1", STAGE2, "alpha=1.5",
         student_cmd("model=mlp", "alpha=1.5"), r"alpha=1.5 must be in \[0, 1\]"),
    Case("alpha-below-0", STAGE2, "alpha=-0.1",
         student_cmd("model=mlp", "alpha=-0.1"), r"alpha=-0.1 must be in \[0, 1\]"),
    Case("c-not-a-number", STAGE2, "C=abc",
         student_cmd("C=abc"), r"C='abc' must be a number or auto"),
    Case("c-not-positive", STAGE2, "C=-1",
         student_cmd("C=-1"), r"C=-1 must be > 0"),
    Case("c-infinite", STAGE2, "C=inf",
         student_cmd("C=inf"), r"C='inf' must be a finite number"),
    Case("epochs-zero", STAGE2, "epochs=0",
         student_cmd("model=cnn_small", "epochs=0"), r"epochs=0 must be >= 1"),
    Case("bad-target", STAGE2, "target=oracle",
         student_cmd("target=oracle"), r"target='oracle' must be labels or teacher"),
    Case("text-student-on-arrays", STAGE2, "a student of text (tfidf_logreg) on a cache of arrays",
         student_cmd("model=tfidf_logreg"),
         r"model tfidf_logreg reads text, and cache .* holds array inputs; train it from a cache "
         r"of a text dataset"),
    Case("bad-vectorizer", STAGE2, "vectorizer=bag (not tfidf or hashing)",
         student_cmd("model=tfidf_logreg", "vectorizer=bag"),
         r"vectorizer='bag' must be tfidf or hashing"),
    Case("bad-text-target", STAGE2, "target=oracle for a student that also takes soft",
         student_cmd("model=tfidf_svc", "target=oracle"),
         r"target='oracle' must be labels, teacher or soft"),
    Case("temperature-with-hard-target", STAGE2, "temperature= with target=labels (only soft softens)",
         student_cmd("model=tfidf_logreg", "target=labels", "temperature=2"),
         r"temperature=2 does not apply with target=labels: only target=soft softens"),
    Case("ngrams-too-large", STAGE2, "ngrams=9",
         student_cmd("model=fasttext", "ngrams=9"), r"ngrams=9 must be in \[1, 5\]"),
    Case("student-negative-seed", STAGE2, "seed=-1",
         student_cmd("seed=-1"), r"seed=-1 must be in 0..4294967295"),
    Case("lr-too-large", STAGE2, "lr=3e38 (AdamW would overflow)",
         student_cmd("model=mlp", "lr=3e38"), r"lr=3e38 must be in \(0, 10\]"),
    Case("sgd-alpha-too-large", STAGE2, "sgd_alpha=3e38",
         student_cmd("model=sgd", "sgd_alpha=3e38"), r"sgd_alpha=3e38 must be in \(0, 100\]"),
    Case("training-diverges", STAGE2, "kd at temperature=1e30: T² overflows float32 and the loss is inf",
         student_cmd("model=mlp", "loss=kd", "temperature=1e30", "epochs=1"),
         r"student mlp/kd: the loss became (inf|nan) in epoch 0; training diverged"),
    Case("soft-targets-starved", STAGE2, "logreg_soft at temperature=1e-30: one-hot soft targets",
         student_cmd("model=logreg_soft", "temperature=1e-30"),
         r"at temperature 1e-30 the teacher gives class\(es\) .* almost no probability .*use a "
         r"larger temperature"),
    Case("student-too-wide", STAGE2, "width=100000000",
         student_cmd("model=mlp", "width=100000000"), r"width=100000000 must be in \[1, 4096\]"),
    Case("dataset-changed", STAGE2, "the npz rewritten after caching",
         _changed_dataset, r"dataset npz:.*data.npz on disk differs from the one cache .*cache was built from"),
    Case("teacher-one-class", STAGE2, "target=teacher with a teacher that predicts one class",
         student_cmd("model=logreg", "target=teacher", cache="one-class"),
         r"predicts a single class on every train row, so target=teacher leaves nothing to learn"),
    Case("runs-dir-not-writable", STAGE2, "runs_dir under a file",
         _blocked_runs_dir, r"runs_dir"),
    Case("sweep-unknown-model", STAGE2, "grid.model= with a typo",
         student_cmd("grid.model=linear_svc nope", verb="sweep"), r"unknown student 'nope'"),
    Case("sweep-unknown-loss", STAGE2, "grid.loss= with a typo",
         student_cmd("grid.loss=kd nope", verb="sweep"), r"unknown loss 'nope'"),
    Case("sweep-negative-temperature", STAGE2, "grid.temperature= with a value <= 0",
         student_cmd("grid.model=linear_svc logreg_soft", "grid.temperature=2 -1", verb="sweep"),
         r"temperature=-1 must be > 0"),
    Case("report-without-results", STAGE2, "report before any student ran",
         damaged("report", lambda root: None), r"no results for cache .*cache yet .*run `make student`"),
    Case("unknown-tracker", STAGE2, "tracking=wandb",
         student_cmd("tracking=wandb"), r"tracking='wandb' is not a tracker; use none or mlflow"),
    Case("plugin-module-missing", PLUGINS, "teacher=pkg:factory whose module does not exist",
         plugin_cmd("teacher=nomodule_kd:factory"),
         r"teacher nomodule_kd:factory: no module named 'nomodule_kd'; put its directory on PYTHONPATH"),
    Case("plugin-attribute-missing", PLUGINS, "teacher=pkg:missing",
         plugin_cmd("teacher=kdbad_ok:missing"), r"teacher kdbad_ok:missing: module kdbad_ok has no 'missing'"),
    Case("plugin-raises-on-import", PLUGINS, "a plugin module that raises on import",
         plugin_cmd("teacher=kdbad_raises:factory"),
         r"importing kdbad_raises raised RuntimeError: broken on purpose; fix the module"),
    Case("plugin-not-a-module", PLUGINS, "a teacher factory that returns something other than a module",
         plugin_cmd("teacher=kdbad_ok:not_a_module"),
         r"teacher kdbad_ok:not_a_module returned a dict, not a torch.nn.Module"),
    Case("plugin-not-a-dataset", PLUGINS, "a dataset source that returns something other than a Dataset",
         plugin_cmd("dataset=kdbad_ok:not_a_dataset:3"),
         r"dataset kdbad_ok:not_a_dataset returned a list, not a pipeline.data.Dataset"),
    Case("plugin-student-undeclared", PLUGINS, "a student plugin that declares no kind",
         student_cmd("model=kdbad_ok:Undeclared"),
         r"student kdbad_ok:Undeclared declares nothing, which does not fit a student .*@pipeline.plugins.declare"),
    Case("timm-unknown-model", PLUGINS, "teacher=timm:NAME with a typo",
         plugin_cmd("teacher=timm:resnt18"), r"timm has no model 'resnt18'; close: resnet18"),
    Case("timm-pretrained-offline", PLUGINS, "pretrained=true for timm weights not in the local cache",
         lambda tmp: ["teacher", "dataset=synthetic:300:3x16x16:3", "teacher=timm:resnet18",
                      "pretrained=true", "epochs=1", f"teacher_dir={tmp / 'teachers'}"],
         r"pretrained weights for timm:resnet18 are not in the local Hugging Face cache .*set pretrained=false"),
    Case("onnx-without-file", PLUGINS, "teacher=onnx without teacher_ckpt",
         lambda tmp: cache_cmd(tmp, teacher="onnx"), r"teacher=onnx runs a model file: pass teacher_ckpt=MODEL.onnx"),
    Case("onnx-not-onnx", PLUGINS, "teacher_ckpt= a file that is not ONNX",
         onnx_case(written("model.onnx", b"not a model at all")),
         r"teacher checkpoint .*model.onnx is not an ONNX model"),
    Case("onnx-input-shape", PLUGINS, "an ONNX model for another input shape",
         onnx_case(lambda tmp: tiny_onnx(tmp / "model.onnx", (3, 16, 16))),
         r"takes inputs shaped \['batch', 3, 16, 16\], but the dataset's samples are \(1, 8, 8\) or NHWC"),
    Case("onnx-unknown-output", PLUGINS, "layers= an output the ONNX graph does not have",
         onnx_case(lambda tmp: tiny_onnx(tmp / "model.onnx"), layers="embed"),
         r"ONNX teacher .*model.onnx has no output 'embed'; its outputs: logits"),
    Case("layers-none-and-more", CONFIG, "layers=none beside layer names",
         lambda tmp: cache_cmd(tmp, layers="none,embed"), r"layers=none,embed names layers beside none"),
    Case("export-without-run", EXPORT, "export with no run=",
         lambda tmp: ["export"], r"export needs run=RUN_DIR"),
    Case("export-run-missing", EXPORT, "run= a directory that does not exist",
         lambda tmp: ["export", f"run={tmp / 'nowhere'}"], r"run .*nowhere does not exist or is not a directory"),
    Case("export-not-a-run", EXPORT, "run= a directory that is no run",
         lambda tmp: ["export", f"run={tmp}"],
         r"is not a kdcache run directory \(no config.json, metrics.json, student.safetensors\)"),
    Case("export-unknown-format", EXPORT, "format=tflite",
         export_cmd("logreg", "format=tflite"), r"format='tflite' is not an export format; use auto, onnx, skops, hf"),
    Case("export-hf-for-torch", EXPORT, "format=hf (a language model's) for a torch student",
         export_cmd("mlp", "format=hf"),
         r"format=hf does not fit model mlp, a PyTorch student; export it with format=onnx"),
    Case("export-onnx-for-sklearn", EXPORT, "format=onnx for a scikit-learn student",
         export_cmd("linear_svc", "format=onnx"),
         r"format=onnx does not fit model linear_svc, a scikit-learn student; export it with format=skops"),
    Case("export-skops-for-torch", EXPORT, "format=skops for a torch student",
         export_cmd("mlp", "format=skops"),
         r"format=skops does not fit model mlp, a PyTorch student; export it with format=onnx"),
    Case("export-cache-gone", EXPORT, "the run's cache was deleted",
         export_cmd("logreg", edit=_remove_cache), r"the cache run .* was trained from, .*cache, is not there"),
    Case("export-weights-torn", EXPORT, "student.safetensors cut short",
         export_cmd("mlp", edit=_tear_weights), r"student.safetensors cannot be read .*train the student again"),
    Case("export-config-edited", EXPORT, "config.json edited to another width",
         export_cmd("mlp", edit=_other_model), r"the weights in .* do not fit model mlp as config.json describes it"),
]

CASES += [
    Case("url-malformed", OBJECT, "a URL without its //", lambda tmp: cache_cmd(tmp, cache="s3:/bucket/cache"),
         r"cache=s3:/bucket/cache is not a URL .*write cache=s3://BUCKET/KEY"),
    Case("url-unknown-protocol", OBJECT, "a protocol fsspec does not know",
         lambda tmp: cache_cmd(tmp, cache="foo://bucket/cache"), r"unknown storage protocol foo://"),
    Case("url-missing-package", OBJECT, "gs:// without gcsfs installed",
         lambda tmp: cache_cmd(tmp, cache="gs://bucket/cache"), r"needs the gs:// filesystem; install it: pip install gcsfs"),
    Case("url-no-bucket", OBJECT, "an s3:// URL naming no bucket",
         lambda tmp: cache_cmd(tmp, cache="s3:///cache"), r"names no bucket; write cache=s3://BUCKET/PATH"),
    Case("url-whole-bucket", OBJECT, "a whole bucket as the cache",
         lambda tmp: cache_cmd(tmp, cache=f"s3://{BUCKET}"), r"is a whole bucket; name a folder in it"),
    Case("url-for-a-local-key", OBJECT, "runs_dir= a URL (runs stay local)",
         student_cmd("runs_dir=s3://bucket/runs"), r"runs_dir=s3://bucket/runs is a URL, but runs_dir must be a local path"),
    Case("bucket-missing", OBJECT, "a bucket that does not exist",
         lambda tmp: cache_cmd(tmp, cache="s3://no-such-bucket/cache"),
         r"bucket no-such-bucket does not exist at http://127.0.0.1:\d+; create it first", env=s3_env()),
    Case("credentials-missing", OBJECT, "no AWS credentials anywhere",
         lambda tmp: cache_cmd(tmp, cache=f"s3://{BUCKET}/cache"),
         r"no credentials for s3://; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY", env=no_credentials),
    Case("endpoint-unreachable", OBJECT, "AWS_ENDPOINT_URL where nothing listens",
         lambda tmp: cache_cmd(tmp, cache=f"s3://{BUCKET}/cache"),
         r"cannot reach the object store at http://127.0.0.1:\d+ .*check AWS_ENDPOINT_URL", env=unreachable),
    Case("scheduler-unreachable", CONFIG, "scheduler= an address nothing listens at",
         lambda tmp: cache_cmd(tmp, scheduler=f"tcp://127.0.0.1:{_closed_port()}"),
         r"cannot reach the dask scheduler at tcp://127.0.0.1:\d+ .*start one"),
    Case("sweep-scheduler-unreachable", STAGE2, "a sweep's scheduler= where nothing listens",
         student_cmd("grid.model=logreg", f"scheduler=tcp://127.0.0.1:{_closed_port()}", verb="sweep"),
         r"cannot reach the dask scheduler at tcp://127.0.0.1:\d+ .*or use scheduler=local"),
    Case("url-no-cache", OBJECT, "a student from an S3 prefix that holds no cache",
         lambda tmp: ["student", f"cache=s3://{BUCKET}/nothing", f"runs_dir={tmp / 'runs'}"],
         r"no kdcache cache at s3://kdcache-bad-input/nothing \(manifest.json missing\)", env=s3_env()),
]


def _corpus(tmp: Path) -> Path:
    """A small labelled CSV of documents (tests/text_models.py)."""
    from text_models import write_corpus

    return write_corpus(tmp / "mail.csv", rows=60)


def _text_cmd(*args: str) -> Callable[[Path], list[str]]:
    """`kdcache cache` of a text corpus with ``args`` ({tmp} filled in)."""
    def setup(tmp: Path) -> list[str]:
        return ["cache", f"dataset=text:{_corpus(tmp)}", "teacher_ckpt=random",
                f"cache={tmp / 'cache'}", *(a.format(tmp=tmp) for a in args)]
    return setup


def _moved_dataset(tmp: Path) -> list[str]:
    """A cache built from an npz file that is then moved elsewhere."""
    path = write_npz(tmp / "data.npz")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        build(tmp / "cache", tmp, dataset=f"npz:{path}", teacher="mlp")
    path.rename(tmp / "moved.npz")
    return ["student", f"cache={tmp / 'cache'}", f"runs_dir={tmp / 'runs'}", "model=mlp", "epochs=1"]


def _yaml_for(verb_args: Callable[[Path], list[str]], text: str) -> Callable[[Path], list[str]]:
    """``verb_args`` with config=run.yaml holding ``text``."""
    def setup(tmp: Path) -> list[str]:
        argv = verb_args(tmp)
        (tmp / "run.yaml").write_text(text)
        return [*argv, f"config={tmp / 'run.yaml'}"]
    return setup


# Keys that do not apply: each one given (on the command line or in a config file) where another
# key decides instead is refused, never ignored (pipeline.config.resolve and each config's moot()).
MOOT = r" does not apply: "
CASES += [
    Case("moot-dataset-with-cache", CONFIG, "dataset= beside cache= (the cache decides the data)",
         student_cmd("dataset=digits3"),
         r"dataset=digits3" + MOOT + r"cache=.*/cache decides the data; drop dataset= \(or drop cache= "
         r"to use the default cache of dataset/teacher under cache_root\)$"),
    Case("moot-dataset-in-yaml", CONFIG, "dataset: in a config file beside cache=",
         _yaml_for(student_cmd(), "dataset: digits3\n"), r"dataset=digits3" + MOOT + "cache="),
    Case("moot-teacher-info", CONFIG, "info: teacher= beside cache=",
         lambda tmp: ["info", f"cache={copy_cache(tmp)}", "teacher=mlp"],
         r"teacher=mlp" + MOOT + r"cache=.* decides the teacher"),
    Case("moot-cache-root-verify", CONFIG, "verify: cache_root= beside cache=",
         lambda tmp: ["verify", f"cache={copy_cache(tmp)}", f"cache_root={tmp / 'elsewhere'}"],
         r"cache_root=.*/elsewhere" + MOOT + r"cache=.* decides where the cache is"),
    Case("moot-dataset-report", CONFIG, "report: dataset= beside cache=",
         lambda tmp: ["report", f"cache={copy_cache(tmp)}", "dataset=digits"], r"dataset=digits" + MOOT),
    Case("moot-rows-info", CONFIG, "info: rows= (a verify key)",
         lambda tmp: ["info", f"cache={copy_cache(tmp)}", "rows=3"], r"unknown key 'rows' for `kdcache info`"),
    Case("moot-sweep-seed", CONFIG, "sweep: seed= beside grid.seed=",
         student_cmd("seed=3", "grid.seed=0,1", verb="sweep"),
         r"seed=3" + MOOT + r"grid.seed=0,1 makes seed an axis of the sweep; drop seed= \(or add its value to grid.seed=\)$"),
    Case("moot-sweep-model", CONFIG, "sweep: model= beside grid.model=",
         student_cmd("model=mlp", "grid.model=logreg,cnn_small", verb="sweep"),
         r"model=mlp" + MOOT + r"grid.model=logreg,cnn_small makes model an axis"),
    Case("moot-sweep-temperature", CONFIG, "sweep: temperature= beside grid.temperature=",
         student_cmd("grid.model=logreg_soft", "grid.temperature=1,2", "temperature=4", verb="sweep"),
         r"temperature=4" + MOOT + r"grid.temperature=1,2 makes temperature an axis"),
    Case("moot-cache-root-with-cache", CONFIG, "cache: cache_root= beside cache=",
         lambda tmp: cache_cmd(tmp, cache_root=tmp / "elsewhere"),
         r"cache_root=.*" + MOOT + r"cache=.*/cache is where the cache goes"),
    Case("moot-epochs-with-ckpt", CONFIG, "cache: a teacher-training key beside teacher_ckpt=",
         lambda tmp: cache_cmd(tmp, epochs=3),
         r"epochs=3" + MOOT + r"teacher_ckpt=random gives the teacher's weights, so none is trained"),
    Case("moot-workers-on-scheduler", CONFIG, "cache: workers= beside a scheduler address",
         lambda tmp: cache_cmd(tmp, scheduler=f"tcp://127.0.0.1:{_closed_port()}", workers=2),
         r"workers=2" + MOOT + r"scheduler=tcp://127.0.0.1:\d+ runs each shard on one of its own workers"),
    Case("moot-pool-without-layers", CONFIG, "cache: pool= with layers=none",
         lambda tmp: cache_cmd(tmp, layers="none", pool="false"), r"pool=false" + MOOT + "layers=none"),
    Case("moot-ckpt-for-teacher", CONFIG, "teacher: teacher_ckpt= (it trains one)",
         lambda tmp: ["teacher", f"dataset={S}", f"teacher_dir={tmp / 'teachers'}", "teacher_ckpt=t.pt"],
         r"teacher_ckpt=t.pt" + MOOT + r"`kdcache teacher` trains the teacher into teacher_dir"),
    Case("moot-sweep-losses", CONFIG, "sweep: grid.loss= for students that train without a loss",
         student_cmd("grid.model=linear_svc,logreg", "grid.loss=kd", verb="sweep"),
         r"grid.loss=kd applies to no run of this sweep: no model or loss in it \(linear_svc, logreg\) takes loss"),
    Case("moot-sweep-no-run", CONFIG, "sweep: a value that no run of the grid uses",
         student_cmd("grid.model=mlp", "grid.loss=ce", "temperature=2", verb="sweep"),
         r"temperature=2 applies to no run of this sweep: no model or loss in it \(mlp\) takes temperature; drop it"),
    Case("moot-sweep-temperatures", CONFIG, "sweep: grid.temperature= where no run uses a temperature",
         student_cmd("grid.model=mlp", "grid.loss=ce", "grid.temperature=1,2", verb="sweep"),
         r"grid.temperature=1,2 applies to no run of this sweep"),
    Case("dataset-moved", DATASET, "the npz moved after caching (student)",
         _moved_dataset, r"cache .*/cache reads its inputs from npz:.*/data.npz, as recorded when it was "
         r"built, and .*/data.npz is not there any more; move the data back to .*/data.npz, or build a "
         r"new cache from where it is now \(kdcache cache dataset=npz:NEW_PATH\)$"),
    # text teachers (teacher=hf:DIR, pipeline/hf.py)
    Case("text-teacher-auto", CONFIG, "teacher=auto on a text dataset", _text_cmd("teacher=auto"),
         r"teacher=auto picks array teachers, but text:.*/mail.csv holds text; pass teacher=hf:DIR, "
         r"a Hugging Face model directory \(e.g. all-MiniLM-L6-v2's\)$"),
    Case("text-array-teacher", CONFIG, "an array teacher on a text dataset", _text_cmd("teacher=cnn_small"),
         r"teacher cnn_small reads arrays, but text:.*/mail.csv holds text; pass teacher=hf:DIR"),
    Case("hf-on-arrays", CONFIG, "a text teacher (hf:) on an array dataset",
         lambda tmp: cache_cmd(tmp, teacher=f"hf:{tmp / 'model'}"),
         r"teacher hf:.*/model reads text, but synthetic:.* holds arrays shaped \(.*\); use an array "
         r"teacher \(e.g. teacher=auto\), or a text dataset \(dataset=text:PATH\)$"),
    Case("hf-model-missing", PLUGINS, "hf:NAME neither a directory nor in the local HF cache",
         _text_cmd("teacher=hf:no-such-org/no-such-model"),
         r"model 'no-such-org/no-such-model' is neither a local directory nor in the local Hugging Face "
         r"cache, and kdcache never downloads; fetch it once with internet: python -c \"from "
         r"huggingface_hub import snapshot_download; snapshot_download\('no-such-org/no-such-model'\)\""),
    Case("hf-dir-missing", PLUGINS, "hf:DIR where nothing is", _text_cmd("teacher=hf:./models/nothing-here"),
         r"no model directory at ./models/nothing-here; pass teacher=hf:DIR to a folder written by "
         r"save_pretrained, or hf:NAME of a model in the local Hugging Face cache$"),
    Case("hf-not-a-model-dir", PLUGINS, "hf:DIR of a folder without config.json", _text_cmd("teacher=hf:{tmp}"),
         r".* is not a Hugging Face model directory \(no config.json\); pass teacher=hf:DIR to a folder "
         r"written by save_pretrained$"),
    Case("text-max-length", CONFIG, "max_length below 2", _text_cmd("teacher=hf:x", "max_length=1"),
         r"max_length=1 must be >= 2"),
    Case("text-finetune", CONFIG, "finetune= neither head nor full",
         lambda tmp: ["teacher", f"dataset=text:{_corpus(tmp)}", "teacher=hf:x", "finetune=lora"],
         r"finetune='lora' is not a way to train a text teacher; use head or full$"),
    Case("text-views", CONFIG, "views= and augment= on a text dataset",
         _text_cmd("teacher=hf:x", "views=4", "augment=shift:1"),
         r"augment=shift:1: augmentation applies to arrays \(signals, images\), and these inputs are "
         r"text; a text cache holds one view per row: drop views= and augment=$"),
    Case("moot-max-length", CONFIG, "max_length= with an array teacher",
         lambda tmp: cache_cmd(tmp, teacher="mlp", max_length=64),
         r"max_length=64" + MOOT + r"max_length= applies to text teachers \(teacher=hf:DIR\), not teacher=mlp"),
]


def _stories(tmp: Path, count: int = 40, name: str = "stories.txt") -> Path:
    """A small .txt corpus of documents separated by blank lines (tests/lm_models.py)."""
    from lm_models import write_corpus

    return write_corpus(tmp / name, count=count)


def _tokens_cmd(make: Callable[[Path], Path], *args: str, verb: str = "teacher") -> Callable[[Path], list[str]]:
    """`kdcache teacher` (teacher=auto: trains a tokenizer and an LM) on the token data ``make``
    writes, with ``args`` ({tmp} filled in)."""
    def setup(tmp: Path) -> list[str]:
        train = [f"teacher_dir={tmp / 'teachers'}", "epochs=1"] if verb == "teacher" else []
        return [verb, f"dataset=tokens:{make(tmp)}", *train, *(a.format(tmp=tmp) for a in args)]
    return setup


def _split_table(tmp: Path) -> Path:
    path = tmp / "docs.csv"
    path.write_text("text,split\nthe cat sees the dog.,train\na ship by the river.,val\n")
    return path


# token datasets (dataset=tokens:PATH, pipeline/data/tokens.py) and the LM teacher trained here
CASES += [
    Case("tokens-missing", DATASET, "tokens: a file that is not there",
         _tokens_cmd(lambda tmp: tmp / "nothing.txt"),
         r"tokens path .*/nothing.txt does not exist; pass dataset=tokens:PATH to a .txt file, a folder "
         r"of .txt files, or a .csv/.jsonl/.parquet table$"),
    Case("tokens-empty", DATASET, "tokens: a .txt of blank lines only",
         _tokens_cmd(_mkfile("blank.txt", "\n\n  \n")),
         r".*/blank.txt holds no documents; give it text \(documents separated by blank lines, or one "
         r"per row of its text column\)$"),
    Case("tokens-no-test-split", DATASET, "tokens: a split column with no test rows",
         _tokens_cmd(_split_table),
         r".*/docs.csv: column 'split' marks no test documents; mark some rows test, or drop the "
         r"column to carve the splits$"),
    Case("tokens-too-small", DATASET, "tokens: a corpus too small for one window",
         _tokens_cmd(lambda tmp: _stories(tmp, count=12), "seq_len=4096"),
         r"the train split holds \d+ tokens, fewer than one window of seq_len=4096; give it more "
         r"text or pass a smaller seq_len$"),
    Case("tokens-no-tokenizer", CONFIG, "tokens: no tokenizer= and no hf: teacher to take one from",
         _tokens_cmd(_stories, "teacher=mlp", "teacher_ckpt=random", "cache={tmp}/cache", verb="cache"),
         r"dataset=tokens: needs a tokenizer: pass tokenizer=DIR \(a Hugging Face tokenizer "
         r"folder\), or teacher=hf:DIR to `kdcache cache` \(it takes the teacher's\), or train "
         r"one: kdcache teacher dataset=tokens:PATH$"),
    Case("tokens-not-a-tokenizer", CONFIG, "tokenizer= a folder without a tokenizer",
         _tokens_cmd(_stories, "teacher=mlp", "teacher_ckpt=random", "cache={tmp}/cache", "tokenizer={tmp}",
                     verb="cache"),
         r"tokenizer=.* is not a Hugging Face tokenizer folder \(no tokenizer.json or "
         r"tokenizer_config.json\); pass the folder save_pretrained wrote it to$"),
    Case("tokens-teacher-hf", CONFIG, "kdcache teacher with teacher=hf: on a token dataset",
         _tokens_cmd(_stories, "teacher=hf:{tmp}/model"),
         r"`kdcache teacher` on a token dataset trains a language model of its own \(teacher=auto\); "
         r"teacher=hf:.*/model is one already: pass it to kdcache cache, or drop teacher=$"),
    Case("tokens-seq-len", CONFIG, "seq_len below 2", _tokens_cmd(_stories, "seq_len=1"),
         r"seq_len=1 must be in 2..1048576 \(a window needs a token and the next token it predicts\)$"),
    Case("tokens-vocab-size", CONFIG, "vocab_size too small for a byte-level BPE",
         _tokens_cmd(_stories, "vocab_size=100"),
         r"vocab_size=100 must be in 260..1048576 \(a byte-level BPE holds the 256 bytes and its "
         r"special tokens\)$"),
    Case("moot-seq-len", CONFIG, "seq_len= on a dataset other than tokens:",
         lambda tmp: cache_cmd(tmp, seq_len=64),
         r"seq_len=64" + MOOT + r"seq_len= applies to token datasets \(dataset=tokens:PATH\), not "
         r"dataset=synthetic:300:1x8x8:3; drop seq_len=$"),
    Case("moot-tokenizer-auto", CONFIG, "tokenizer= where teacher=auto trains one",
         _tokens_cmd(_stories, "tokenizer={tmp}"),
         r"tokenizer=.*" + MOOT + r"teacher=auto on a token dataset trains its own tokenizer with "
         r"the teacher; drop tokenizer="),
]

# =========================================================================== causal-LM teachers
# (teacher=hf:DIR on dataset=tokens:PATH, pipeline/hf_lm.py) and LM students: tiny random models
# (tests/lm_models.py), each written once per process and copied into the case's tmp

_LM: dict[str, Path] = {}


def _lm_base() -> Path:
    """A process-wide folder with a small corpus and its BPE tokenizer (deleted at exit)."""
    if "base" not in _LM:
        from lm_models import corpus_documents, train_tokenizer, write_corpus

        base = Path(tempfile.mkdtemp(prefix="kdcache-lm-"))
        atexit.register(shutil.rmtree, base, True)
        corpus = write_corpus(base / "stories.txt", count=60)
        train_tokenizer(corpus_documents(corpus)).save_pretrained(base / "tokenizer")
        train_tokenizer([d[::-1] for d in corpus_documents(corpus)]).save_pretrained(base / "other-tokenizer")
        _LM["base"] = base
    return _LM["base"]


def _lm_model(kind: str) -> Path:
    """A model folder of ``kind``, made once: ``llama`` (a tiny LlamaForCausalLM with the base
    tokenizer), ``short`` (the same, reading 16 positions), ``narrow`` (10 outputs fewer than its
    tokenizer's ids), ``wide`` (a tokenizer of 4,400 ids, past the dense limit), ``bert`` (an
    encoder, not a causal LM)."""
    if kind not in _LM:
        import transformers
        from transformers import AutoTokenizer

        base = _lm_base()
        tok = AutoTokenizer.from_pretrained(base / "tokenizer")
        if kind == "wide":
            tok.add_tokens([f"<extra{i}>" for i in range(4400 - len(tok))])
        outputs = len(tok) - 10 if kind == "narrow" else len(tok)
        torch.manual_seed(0)
        if kind == "bert":
            model = transformers.BertModel(transformers.BertConfig(
                vocab_size=outputs, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=32))
        else:
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
                vocab_size=outputs, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, intermediate_size=32,
                max_position_embeddings=16 if kind == "short" else 256,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        model.save_pretrained(base / kind)
        tok.save_pretrained(base / kind)
        _LM[kind] = base / kind
    return _LM[kind]


def _lm_cmd(kind: str, *args: str, tokenizer: str = "") -> Callable[[Path], list[str]]:
    """`kdcache cache` of the base corpus (tokens:) by the ``kind`` model copied to {tmp}/model,
    seq_len 24, with ``args`` ({tmp} filled in); ``tokenizer``: a base tokenizer's folder name
    (copied to {tmp}/tok), else the teacher's own."""
    def setup(tmp: Path) -> list[str]:
        base = _lm_base()
        shutil.copy(base / "stories.txt", tmp / "stories.txt")
        shutil.copytree(_lm_model(kind), tmp / "model")
        if tokenizer:
            shutil.copytree(base / tokenizer, tmp / "tok")
        return ["cache", f"dataset=tokens:{tmp / 'stories.txt'}", f"teacher=hf:{tmp / 'model'}",
                f"cache={tmp / 'cache'}", "device=cpu", *([f"tokenizer={tmp / 'tok'}"] if tokenizer else []),
                *(a.format(tmp=tmp) for a in (args or ("seq_len=24",)))]
    return setup


def _gguf_not_gguf(tmp: Path) -> list[str]:
    """A GGUF teacher whose file holds the magic bytes and nothing else (no tokenizer=: the
    teacher's file would give it)."""
    shutil.copy(_lm_base() / "stories.txt", tmp / "stories.txt")
    (tmp / "model").mkdir()
    (tmp / "model" / "tiny.gguf").write_bytes(b"GGUF")
    return ["cache", f"dataset=tokens:{tmp / 'stories.txt'}", f"teacher=hf:{tmp / 'model'}",
            "gguf_file=tiny.gguf", f"cache={tmp / 'cache'}", "seq_len=24"]


def _lm_student_tokenizer_changed(tmp: Path) -> list[str]:
    """A token cache built, then its tokenizer folder overwritten by another tokenizer."""
    from stages import cache as cache_stage

    argv = _lm_cmd("llama", "seq_len=24", "logits=topk:4", tokenizer="tokenizer")(tmp)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        cache_stage.main(argv[1:])
    shutil.rmtree(tmp / "tok")
    shutil.copytree(_lm_base() / "other-tokenizer", tmp / "tok")
    return ["student", f"cache={tmp / 'cache'}", "model=lm", f"runs_dir={tmp / 'runs'}", "epochs=1"]


def _lm_export_tokenizer_gone(tmp: Path) -> list[str]:
    """An lm run of a token cache whose data's tokenizer folder was deleted since: format=hf
    saves that tokenizer beside the model."""
    from stages import cache as cache_stage

    argv = _lm_cmd("llama", "seq_len=24", "logits=topk:4", tokenizer="tokenizer")(tmp)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        cache_stage.main(argv[1:])
        assert main(["student", f"cache={tmp / 'cache'}", "model=lm", f"runs_dir={tmp / 'runs'}", "epochs=1",
                     "layers=1", "width=16", "heads=2", "batch_size=64", "device=cpu", "threads=1"]) == 0
    shutil.rmtree(tmp / "tok")
    return ["export", f"run={next((tmp / 'runs' / 'cache').iterdir())}"]


CASES += [
    Case("lm-dense-over-limit", CONFIG, "logits=dense on a causal LM of more than 4,096 outputs",
         _lm_cmd("wide", "seq_len=24", "logits=dense"),
         r"logits=dense would store all 4,400 outputs at every position \(8,800 bytes per token\); above "
         r"4,096 outputs use logits=topk:K or sample:K"),
    Case("lm-layers", CONFIG, "layers= on a causal-LM teacher", _lm_cmd("llama", "seq_len=24", "layers=model.norm"),
         r"a causal-LM teacher \(hf:.*/model\) caches per-token logits, no feature layers \(model.norm\); "
         r"drop layers= \(or pass layers=none\)$"),
    Case("lm-not-causal", CONFIG, "an encoder (not a causal LM) as the teacher of a token dataset",
         _lm_cmd("bert", "seq_len=24"),
         r"teacher hf:.*/model is not a causal language model \(it has no next-token head\); a token dataset "
         r"is cached by one: pass teacher=hf:DIR of a causal LM$"),
    Case("lm-tokenizer-mismatch", CONFIG, "a token dataset tokenized with another tokenizer than the teacher's",
         _lm_cmd("llama", "seq_len=24", tokenizer="other-tokenizer"),
         r"tokenizer \(\d+ ids\) is not the one tokens:.*/stories.txt was tokenized with \(\d+ ids, another "
         r"vocabulary or merges\); tokenize the data with the teacher's tokenizer \(tokenizer=.*/model\)$"),
    Case("lm-gguf-truncated", PLUGINS, "gguf_file= a file that ends inside its GGUF header",
         _gguf_not_gguf,
         r"/model/tiny.gguf is not a readable GGUF file \(it ends inside its header\); pass gguf_file=NAME "
         r"of a .gguf model file \(written by llama.cpp's converters\)$"),
    Case("lm-random-ckpt", CKPT, "teacher_ckpt=random for a causal LM",
         _lm_cmd("llama", "seq_len=24", "teacher_ckpt=random"),
         r"is a causal LM: it runs its directory's weights, not random ones; drop teacher_ckpt= "
         r"\(or pass teacher_ckpt=pretrained\)$"),
    Case("lm-file-ckpt", CKPT, "teacher_ckpt=FILE for a causal LM",
         _lm_cmd("llama", "seq_len=24", "teacher_ckpt={tmp}/stories.txt"),
         r"is a causal LM: it runs its directory's weights \(teacher_ckpt=pretrained\), not .*stories.txt; "
         r"drop teacher_ckpt=$"),
    Case("lm-outputs-below-tokenizer", PLUGINS, "a causal LM with fewer outputs than its tokenizer's ids",
         _lm_cmd("narrow", "seq_len=24"),
         r"teacher hf:.*/model has \d+ outputs but its tokenizer \d+ ids: it cannot predict every token; "
         r"pass a model whose output layer covers its tokenizer$"),
    Case("lm-seq-len-past-positions", CONFIG, "seq_len longer than the causal LM reads",
         _lm_cmd("short", "seq_len=24"),
         r"seq_len=24 is longer than teacher hf:.*/model reads \(16 positions\); pass seq_len=N with N <= 16$"),
    Case("lm-student-tokenizer-changed", STAGE2, "model=lm after the cache's tokenizer folder changed",
         _lm_student_tokenizer_changed,
         r"the tokenizer in .*/tok \(\d+ ids, fingerprint [0-9a-f]+\) is not the one cache .*/cache was built "
         r"with \(\d+ ids, [0-9a-f]+\); a student must share the teacher's tokenizer: restore that tokenizer, "
         r"or build a new cache with this one$"),
    Case("lm-export-tokenizer-gone", EXPORT, "export of an lm run whose cache's tokenizer folder was deleted",
         _lm_export_tokenizer_gone,
         r"the tokenizer folder .*/tok that cache .*/cache's data was tokenized with is not there; format=hf "
         r"saves that tokenizer beside the model: restore the folder \(the tokenizer the cache was built "
         r"with\) and export again$"),
]

BY_ID = {case.id: case for case in CASES}
assert len(BY_ID) == len(CASES), "case ids must be unique"
assert {case.category for case in CASES} == set(CATEGORIES)


# =========================================================================== running a case

PREFIX = "kdcache {verb}: error: "
LOCK = re.compile(r"(^|/)\.[^/]+\.lock$")  # a build's flock file: not data (see CacheLock)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and directory under root."""
    out: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        out[rel + "/" if path.is_dir() else rel] = None if path.is_dir() else path.read_bytes()
    return out


def assert_unchanged(root: Path, before: dict[str, bytes | None]) -> None:
    after = snapshot(root)
    after = {k: v for k, v in after.items() if k in before or not LOCK.search(k)}
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    assert not (added or removed or changed), f"written: {added}, removed: {removed}, changed: {changed}"


def _warning_to_stderr(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextlib.contextmanager
def process_warnings():
    """Warnings as a real `kdcache` process shows them (on stderr), not as pytest records them:
    a stray RuntimeWarning is a second line on stderr."""
    with warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        warnings.showwarning = _warning_to_stderr
        yield


def assert_one_line_error(verb: str, code, out: str, err: str, pattern: str) -> str:
    """The bad-input contract; returns the error line."""
    assert "Traceback" not in out + err, err
    assert code == 2, f"exit code {code}; stderr: {err!r}"
    assert err.endswith("\n") and err.count("\n") == 1 and "\r" not in err, f"not one line: {err!r}"
    line = err[:-1]
    assert line.startswith(PREFIX.format(verb=verb)), line
    assert line.isprintable(), f"control characters in {line!r}"
    assert re.search(pattern, line), f"{pattern!r} not in {line!r}"
    assert out == "", f"stdout: {out!r}"
    return line


# =========================================================================== the doc

# What varies between machines and library versions is masked in the doc: fingerprints and
# checksums (hex, or all digits right after "fingerprint"/"!="/"is"), byte strings of checksums
# in zarr's messages, and run ids (a timestamp and a random suffix).
HEX = re.compile(r"\b(?=[0-9]*[a-f])[0-9a-f]{12,64}\b|(?<=fingerprint )[0-9]{12}\b|(?<=!= |is )[0-9]{12}\b")
BYTES = re.compile(r"b'(?:[^'\\]|\\.)*'" + r'|b"(?:[^"\\]|\\.)*"')
RUN_ID = re.compile(r"\b\d{8}-\d{6}-[\w.-]+-[0-9a-f]{6}\b")
NOISE = {"scheduler", "shard_size", "chunk_size", "infer_batch_size", "cache_root", "teacher_dir",
         "runs_dir"}  # the tiny-test settings every row shares; the doc leaves them out


LOOPBACK_PORT = re.compile(r"(?<=127\.0\.0\.1:)\d+")  # the test S3 server's, or a closed one


def normalise(text: str, tmp: Path) -> str:
    text = text.replace(str(tmp), "/tmp/x")
    text = LOOPBACK_PORT.sub("PORT", text)
    text = RUN_ID.sub("<run_id>", text)
    text = HEX.sub("<hash>", text)
    text = BYTES.sub("b'…'", text)
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def command(argv: list[str], tmp: Path) -> str:
    defaults = set(cache_args(tmp / "cache", tmp)) | {f"runs_dir={tmp / 'runs'}", f"cache_root={tmp / 'caches'}",
                                                      f"teacher_dir={tmp / 'teachers'}"}
    shown = [a for a in argv if not (a in defaults and a.partition("=")[0] in NOISE)]
    return normalise(" ".join(["kdcache", *map(shlex.quote, shown)]), tmp)


def code_span(text: str) -> str:
    ticks = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    text = text.replace("|", "\\|")
    pad = " " if text.startswith("`") or text.endswith("`") or "`" in text else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def doc_row(case: Case, argv: list[str], message: str, tmp: Path) -> str:
    kind = f"`{case.id}`: {case.kind}"
    shown = code_span(normalise(message, tmp))
    if case.bug:
        shown += f" — **known bug**: {case.bug}"
    return f"| {case.category} | {kind} | {code_span(command(argv, tmp))} | {shown} |"


def doc_rows(text: str) -> dict[str, str]:
    """case id -> its table line, from the doc."""
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| [^|]+ \| `([a-z0-9-]+)`: ", line)
        if m:
            assert m.group(1) not in rows, f"{m.group(1)} appears twice in {DOC}"
            rows[m.group(1)] = line
    return rows


INTRO = """\
# Bad input

Everything a user can get wrong — command-line arguments, config keys and values, dataset
files, checkpoints, cache directories, stage-two options — gets the same treatment:

- **exit code 2** (0 is success, 1 a `verify` that found a problem, 130 Ctrl-C);
- **one line on stderr**, `kdcache VERB: error: …`, naming what is wrong and how to fix it, and
  no traceback (a traceback is always a bug);
- **nothing half-written**: no new cache, run directory or results row, and a cache that existed
  before is left byte-for-byte as it was. (The one file a refused `kdcache cache` may leave is
  `.NAME.lock` beside the cache, the build lock, which holds only the pid of the last builder.)

The table lists every kind of bad input the tests feed to kdcache, with the exact message it
produces (temporary paths are shown as `/tmp/x`, fingerprints as `<hash>`; the tiny-test
settings every row shares, such as `scheduler=synchronous shard_size=64`, are left out of the
commands). Each row is a case in [tests/test_bad_input.py](../tests/test_bad_input.py), which
checks all of the above, plus random `key=value` overrides and malformed `.npz` files generated
with hypothesis. Rows marked **known bug** are open bugs; their tests are strict xfails.

To add a row: add a `Case(id, category, kind, setup, regex)` to `CASES` in
tests/test_bad_input.py (`setup(tmp)` writes the bad input into a tmp directory and returns the
`kdcache` argv), then regenerate this file:

    .venv/bin/python tests/test_bad_input.py --write-doc

The test of each row fails when its message differs from the one shown here.
"""


def run_for_doc(case: Case) -> str:
    """Run one case in a fresh tmp dir, as the CLI would, and return its doc row."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="kdcache-doc-") as d:
        tmp = Path(d).resolve()
        os.chdir(tmp)
        try:
            sink = io.StringIO()
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                argv = case.setup(tmp)
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), process_warnings(), \
                    case_env(case):
                try:
                    main(argv)
                    lines = err.getvalue().strip().splitlines()
                    message = lines[-1] if lines else "(no message)"
                except Exception as exc:  # a known bug: show what the user sees
                    message = f"Traceback (most recent call last): … {type(exc).__name__}: {exc}"
            return doc_row(case, argv, message, tmp)
        finally:
            os.chdir(old)


def render_doc(rows: list[str]) -> str:
    counts = ", ".join(f"{sum(c.category == cat for c in CASES)} {cat}" for cat in CATEGORIES)
    return (INTRO + f"\n{len(CASES)} kinds: {counts}.\n\n"
            "| category | kind | example | message |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")


def write_doc(only: list[str] = ()) -> None:
    """Regenerate the doc: every row, or only the cases ``only`` names (the other rows are kept
    as the doc has them; a case the doc lacks is run too)."""
    kept = {k: v for k, v in doc_rows(DOC.read_text()).items() if k not in only} if only else {}
    rows = []
    for case in CASES:
        if case.id in kept:
            rows.append(kept[case.id])
            continue
        rows.append(run_for_doc(case))
        print(f"{case.id:<34} {'bug' if case.bug else 'ok'}", file=sys.stderr)
    DOC.write_text(render_doc(rows))
    print(f"wrote {DOC} ({len(rows)} rows)", file=sys.stderr)


# =========================================================================== the tests

def _params() -> list:
    return [pytest.param(case, id=case.id,
                         marks=[pytest.mark.xfail(strict=True, reason=case.bug)] if case.bug else [])
            for case in CASES]


@pytest.mark.parametrize("case", _params())
def test_bad_input(case, tmp_path, capsys):
    argv = case.setup(tmp_path)
    before = snapshot(tmp_path)
    capsys.readouterr()

    with process_warnings(), case_env(case):
        code = main(argv)
    if case.env is not None:
        assert bucket_objects() == [], "an object was written"

    out, err = capsys.readouterr()
    line = assert_one_line_error(argv[0], code, out, err, case.message)
    assert_unchanged(tmp_path, before)
    assert not (tmp_path / SENTINEL).exists(), "a pickle was executed"
    row = doc_row(case, argv, line, tmp_path)
    assert row in DOC.read_text().splitlines(), (
        f"{DOC.name} does not show this row as\n{row}\nregenerate it: "
        ".venv/bin/python tests/test_bad_input.py --write-doc")


def test_doc_has_one_row_per_case():
    """No stale rows, none missing (the messages themselves are checked by test_bad_input)."""
    rows = doc_rows(DOC.read_text())
    assert sorted(rows) == sorted(BY_ID), (
        f"stale: {sorted(set(rows) - set(BY_ID))}, missing: {sorted(set(BY_ID) - set(rows))}; "
        "regenerate: .venv/bin/python tests/test_bad_input.py --write-doc")
    for case_id, line in rows.items():
        assert line.startswith(f"| {BY_ID[case_id].category} | `{case_id}`: {BY_ID[case_id].kind} |"), line


def test_every_category_is_covered():
    counts = {cat: sum(c.category == cat for c in CASES) for cat in CATEGORIES}
    assert len(CASES) >= 15 and min(counts.values()) >= 5, counts


@pytest.mark.parametrize("case_id", ["unknown-key", "npz-object-arrays", "dataset-changed",
                                     "ckpt-plain-pickle"])
def test_bad_input_in_a_real_process(tmp_path, case_id):
    """The installed console script: no traceback escapes at the process level either, and the
    message is the one the in-process run gives."""
    case = BY_ID[case_id]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        argv = case.setup(tmp_path)
    before = snapshot(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHONWARNINGS")}
    proc = subprocess.run([str(KDCACHE), *argv], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    line = assert_one_line_error(argv[0], proc.returncode, proc.stdout, proc.stderr, case.message)
    assert_unchanged(tmp_path, before)
    assert not (tmp_path / SENTINEL).exists()
    assert doc_row(case, argv, line, tmp_path) in DOC.read_text().splitlines()


def test_pickle_payloads_are_never_executed(tmp_path, capsys):
    """The two places a pickle could hide (npz object arrays, a torch checkpoint) are refused
    without unpickling, even while the checkpoint row is an open bug about its message."""
    import pickle

    pickle.loads(pickle.dumps(Payload(tmp_path / "probe")))  # the payload works when unpickled
    assert (tmp_path / "probe").is_dir()
    for case_id in ("npz-object-arrays", "ckpt-pickle-payload"):
        work = tmp_path / case_id
        work.mkdir()
        assert main(BY_ID[case_id].setup(work)) == 2
        assert not (work / SENTINEL).exists(), case_id
    capsys.readouterr()


# =========================================================================== hypothesis

# Each example costs milliseconds (everything is refused before any work), so these run 100
# examples instead of the profile's 25, in about a second each.
CI = settings(max_examples=100,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _field_types(cls) -> dict[str, type]:
    return typing.get_type_hints(cls)


def _parses(kind: type, text: str) -> bool:
    """Whether kdcache's coercion (pipeline.config._coerce) would accept text for this type."""
    try:
        if kind is bool:
            return text.strip().lower() in _TRUE | _FALSE
        if kind is int:
            int(text.strip())
            return True
        if kind is float:
            v = float(text)
            return v == v and abs(v) <= 3.4e38
    except (ValueError, TypeError):
        return False
    return True


def _num(values) -> st.SearchStrategy[str]:
    return values.map(lambda v: repr(v) if isinstance(v, float) else str(v))


def _invalid_text(kind: type) -> st.SearchStrategy[str]:
    return st.text(max_size=12).filter(lambda s: not _parses(kind, s))


# Valid values: small, cheap, and never what makes the run fail.
VALID_CACHE = {
    "dtype": st.sampled_from(["float16", "float32"]),
    "compression": st.sampled_from(["none", "zstd"]),
    "temperature": _num(st.floats(0.5, 8.0)),
    "pool": st.sampled_from(["true", "false", "yes", "no", "on", "off", "1", "0", "True", " off "]),
    "seed": _num(st.integers(0, 2**32 - 1)),
    "val_fraction": _num(st.floats(0.05, 0.5)),
    "workers": _num(st.integers(1, 4)),
    "threads": _num(st.integers(0, 4)),
    "infer_batch_size": _num(st.integers(1, 512)),
    "overwrite": st.sampled_from(["false", "no"]),
    "epochs": _num(st.integers(1, 50)),
    "lr": _num(st.floats(1e-5, 1.0)),
    "weight_decay": _num(st.floats(0.0, 0.1)),
    "batch_size": _num(st.integers(1, 512)),
    "teacher_augment": st.sampled_from(["auto", "none", "shift:1", "crop:1"]),
    "device": st.sampled_from(["auto", "cpu"]),
    "layers": st.sampled_from(["embed", "embed,head", "block3 embed"]),
}
VALID_STUDENT = {
    "model": st.sampled_from(["linear_svc", "logreg", "logreg_soft", "sgd", "mlp", "cnn_small"]),
    "loss": st.sampled_from(["kd", "ce", "mse_logits", "fitnet", "dkd"]),
    "target": st.sampled_from(["labels", "teacher"]),
    "layer": st.sampled_from(["", "embed"]),
    "temperature": _num(st.floats(0.5, 8.0)),
    "alpha": _num(st.floats(0.0, 1.0)),
    "C": st.one_of(st.just("auto"), _num(st.floats(0.01, 100.0))),
    "epochs": _num(st.integers(1, 3)),
    "lr": _num(st.floats(1e-4, 0.1)),
    "batch_size": _num(st.integers(1, 256)),
    "seed": _num(st.integers(0, 1000)),
    "width": _num(st.integers(0, 64)),
    "device": st.sampled_from(["auto", "cpu"]),
}
# Values outside each key's range: refused by the config's checks, whatever else is given.
OUT_OF_RANGE_CACHE = {
    "temperature": _num(st.floats(max_value=0.0, allow_nan=False, allow_infinity=False, min_value=-1e30)),
    "val_fraction": _num(st.one_of(st.floats(0.9, 1e6), st.floats(-1e6, 0.0))),
    "shard_size": _num(st.integers(max_value=0, min_value=-(2**70))),
    "chunk_size": _num(st.one_of(st.integers(-(2**40), -1), st.integers(65537, 2**70))),
    "workers": _num(st.integers(-(2**40), 0)),
    "threads": _num(st.integers(-(2**40), -1)),
    "decoders": _num(st.one_of(st.integers(-(2**40), -1), st.integers(257, 2**40))),
    "seed": _num(st.one_of(st.integers(-(2**70), -1), st.integers(2**32, 2**70))),
    "epochs": _num(st.integers(-(2**40), 0)),
    "lr": _num(st.one_of(st.floats(-1e30, 0.0), st.floats(3.5e38, 1e300))),
    "weight_decay": _num(st.floats(-1e30, -1e-9)),
    "batch_size": _num(st.integers(-(2**40), 0)),
    "infer_batch_size": _num(st.integers(-(2**40), 0)),
    "seq_len": _num(st.integers(-(2**40), 1)),
}
OUT_OF_RANGE_STUDENT = {
    "temperature": _num(st.floats(-1e30, -1e-9)),
    "alpha": _num(st.one_of(st.floats(-1e30, -1e-9), st.floats(1.000001, 1e30))),
    "epochs": _num(st.integers(-(2**40), 0)),
    "lr": _num(st.floats(-1e30, 0.0)),
    "batch_size": _num(st.integers(-(2**40), 0)),
    "sgd_alpha": _num(st.floats(-1e30, 0.0)),
    "width": _num(st.one_of(st.integers(-(2**40), -1), st.integers(4097, 2**40))),
    "loss_weight": _num(st.floats(-1e30, -1e-9)),
    "dkd_beta": _num(st.floats(-1e30, -1e-9)),
    "seed": _num(st.one_of(st.integers(-(2**40), -1), st.integers(2**32, 2**40))),
    "C": st.one_of(_num(st.floats(-1e30, 0.0)), st.sampled_from(["inf", "nan", "-inf", "1e400", "zero", ""])),
}


def _invalid_enum(valid: set[str] | Callable[[str], bool]) -> st.SearchStrategy[str]:
    ok = valid if callable(valid) else (lambda s: s in valid)
    return st.text(max_size=12).filter(lambda s: not ok(s))


def _not_a_scheduler(text: str) -> bool:
    from pipeline.config import _SCHEDULER

    return text not in ("local", "synchronous") and not _SCHEDULER.fullmatch(text)


@st.composite
def invalid_pair(draw, cls, out_of_range: dict, enums: dict) -> tuple[str, str]:
    """One key=value that config resolution must refuse, by construction."""
    types = {k: t for k, t in _field_types(cls).items() if t in (int, float, bool)}
    known = set(_field_types(cls)) | {"config"}
    how = draw(st.sampled_from(["unknown key", "unicode key", "wrong type", "out of range",
                                "empty", "second =", "bad name"]))
    if how == "unknown key":
        key = draw(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True).filter(lambda k: k not in known))
        return key, draw(st.text(max_size=8))
    if how == "unicode key":
        key = draw(st.text(min_size=1, max_size=12).filter(lambda k: "=" not in k and k.strip() not in known))
        return key, draw(st.text(max_size=8))
    if how == "out of range":
        key = draw(st.sampled_from(sorted(out_of_range)))
        return key, draw(out_of_range[key])
    if how == "bad name":
        key = draw(st.sampled_from(sorted(enums)))
        return key, draw(enums[key])
    key = draw(st.sampled_from(sorted(types)))
    kind = types[key]
    if how == "wrong type":
        return key, draw(_invalid_text(kind))
    if how == "empty":
        return key, ""
    good = {bool: "true", int: "64", float: "2.5"}[kind]
    value = f"{good}={draw(st.text(max_size=6))}"  # second =
    assert not _parses(kind, value)
    return key, value


@st.composite
def overrides(draw, valid: dict, bad: st.SearchStrategy) -> list[str]:
    """A shuffle of valid pairs and 1-2 invalid ones; no valid pair reuses an invalid key (a
    later valid value would override an out-of-range one)."""
    invalid = draw(st.lists(bad, min_size=1, max_size=2))
    taken = {k.strip() for k, _ in invalid}
    keys = draw(st.lists(st.sampled_from(sorted(k for k in valid if k not in taken)), max_size=6, unique=True))
    pairs = [f"{k}={draw(valid[k])}" for k in keys] + [f"{k}={v}" for k, v in invalid]
    return draw(st.permutations(pairs))


def _teachers() -> set[str]:
    from pipeline.teachers import TEACHERS

    return set(TEACHERS.names()) | {"auto"}


CACHE_ENUMS = {
    "dtype": _invalid_enum({"float16", "float32"}),
    "compression": _invalid_enum({"none", "zstd"}),
    "device": _invalid_enum(lambda s: re.fullmatch(r"auto|cpu|cuda(:\d+)?", s) is not None),
    "scheduler": st.text(max_size=12).filter(_not_a_scheduler),
    "teacher": _invalid_enum(lambda s: s in _teachers()),
    "dataset": st.text(max_size=12).filter(lambda s: s.partition(":")[0] not in
                                           {"digits", "npz", "synthetic", "imagefolder", "torchvision"}),
}
STUDENT_ENUMS = {
    "model": _invalid_enum({"linear_svc", "logreg", "logreg_soft", "sgd", "mlp", "cnn1d", "cnn_small", "resnet_small"}),
    "loss": _invalid_enum({"kd", "ce", "mse_logits", "fitnet", "dkd"}),
    "target": _invalid_enum({"labels", "teacher"}),
    "layer": _invalid_enum({"", "embed"}),
    "device": _invalid_enum(lambda s: re.fullmatch(r"auto|cpu|cuda(:\d+)?", s) is not None),
}


def _cache_invalid():
    from pipeline.config import CacheConfig

    return invalid_pair(CacheConfig, OUT_OF_RANGE_CACHE, CACHE_ENUMS)


def _student_invalid():
    from pipeline.config import StudentConfig

    return invalid_pair(StudentConfig, OUT_OF_RANGE_STUDENT, STUDENT_ENUMS)


def _refused(verb: str, argv: list[str], root: Path, capsys) -> None:
    before = snapshot(root)
    capsys.readouterr()
    with process_warnings():
        code = main(argv)
    out, err = capsys.readouterr()
    assert_one_line_error(verb, code, out, err, ".")
    assert_unchanged(root, before)


@CI
@given(pairs=overrides(VALID_CACHE, _cache_invalid()))
def test_random_cache_overrides_are_refused(tmp_path, capsys, pairs):
    _refused("cache", [*cache_cmd(tmp_path), *pairs], tmp_path, capsys)


@pytest.fixture
def student_cache(tmp_path) -> Path:
    return copy_cache(tmp_path)


@CI
@given(pairs=overrides(VALID_STUDENT, _student_invalid()))
def test_random_student_overrides_are_refused(tmp_path, student_cache, capsys, pairs):
    argv = ["student", f"cache={student_cache}", f"runs_dir={tmp_path / 'runs'}", *pairs]
    _refused("student", argv, tmp_path, capsys)


# --------------------------------------------------------------------------- malformed npz

GOOD_X = (np.float32, np.float64, np.float16, np.int8, np.uint8, np.int32, np.int64)


@st.composite
def valid_npz(draw) -> dict[str, np.ndarray]:
    """A valid npz (any real x dtype, optional val split, extra arrays): the base to break."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    k = draw(st.integers(2, 4))
    shape = draw(st.sampled_from([(5,), (3, 4), (2, 3, 3), (1, 4, 4)]))
    dtype = draw(st.sampled_from(GOOD_X))
    out = {}
    for split in ["train", "test"] + (["val"] if draw(st.booleans()) else []):
        n = draw(st.integers(k, 3 * k + 4))
        out[f"x_{split}"] = (rng.standard_normal((n, *shape)) * 3).astype(dtype)
        out[f"y_{split}"] = (np.arange(n) % k).astype(draw(st.sampled_from([np.int64, np.int32, np.uint8])))
    for i in range(draw(st.integers(0, 2))):  # extra keys are ignored, never a problem
        out[f"extra_{i}"] = rng.standard_normal(draw(st.integers(0, 4)))
    return out


def _rows(v) -> int | None:
    return len(v) if isinstance(v, np.ndarray) and v.ndim >= 1 else None


def _numeric(v) -> bool:
    return isinstance(v, np.ndarray) and v.dtype.kind in "iuf" and v.ndim >= 2 and v.size > 0


def _bad_dtype_array(draw, n: int, labels: bool) -> np.ndarray:
    kinds = ["object", "str", "bytes", "complex", "bool"] + ([] if labels else ["datetime", "struct"])
    kinds += ["float16", "float32", "float64"] if labels else []
    kind = draw(st.sampled_from(kinds))
    base = np.arange(n) % 2 if labels else np.ones((n, 4))
    return {
        "object": lambda: np.array([{"row": i} for i in range(n)] if labels else [[{"v": 1}] * 4] * n,
                                   dtype=object),
        "str": lambda: base.astype(str),
        "bytes": lambda: base.astype("S8"),
        "complex": lambda: base.astype(np.complex64) + 1j,
        "bool": lambda: base > 0,
        "datetime": lambda: np.zeros(base.shape, "datetime64[s]"),
        "struct": lambda: np.zeros(n, dtype=[("a", "f4"), ("b", "i4")]),
        "float16": lambda: base.astype(np.float16),
        "float32": lambda: base.astype(np.float32),
        "float64": lambda: base.astype(np.float64),
    }[kind]()


def _mutate(draw, a: dict, how: str) -> None:
    """Break ``a`` so that it is invalid *whatever was done to it before*: every mutation, applied
    last, leaves a defect kdcache must refuse. (When its precondition does not hold, e.g. x is
    no longer numeric, it drops x_train, which is invalid too.)"""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    splits = sorted(k[2:] for k in a if k.startswith("x_"))
    if not splits:
        return  # no x at all: x_train is missing
    split = draw(st.sampled_from(splits))
    others = [s for s in splits if s != "train"]
    x, y = a[f"x_{split}"], a.get(f"y_{split}")
    n = _rows(x) or 3
    give_up = lambda: a.pop("x_train", None)  # noqa: E731
    if how == "missing key":
        a.pop(draw(st.sampled_from(["x_train", "y_train", "x_test", "y_test"])), None)
    elif how == "x dtype":
        a[f"x_{split}"] = _bad_dtype_array(draw, n, labels=False)
    elif how == "y dtype":
        a[f"y_{split}"] = _bad_dtype_array(draw, n, labels=True)
    elif how == "length":
        a[f"y_{split}"] = np.arange(n + draw(st.sampled_from([1, 2, 5]))) % 2
    elif how == "non-finite":
        if not _numeric(x):
            return give_up()
        with np.errstate(over="ignore"):  # float16 may overflow to inf: all the better
            bad = x.astype(draw(st.sampled_from([np.float16, np.float32, np.float64])))
        flat = bad.reshape(-1)
        flat[rng.integers(0, flat.size, draw(st.integers(1, 3)))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        a[f"x_{split}"] = bad
    elif how == "x ndim":
        a[f"x_{split}"] = draw(st.sampled_from([np.zeros(n, np.float32), np.zeros((n, 1, 1, 1, 2), np.float32),
                                                np.float32(1.0)]))
    elif how == "y ndim":
        a[f"y_{split}"] = draw(st.sampled_from([np.zeros((n, 1), np.int64), np.zeros((n, 2), np.int64),
                                                np.int64(1)]))
    elif how == "empty":
        a[f"x_{split}"], a[f"y_{split}"] = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    elif how == "negative label":
        y = np.arange(n) % 2
        y[rng.integers(0, n)] = -draw(st.integers(1, 2**40))
        a[f"y_{split}"] = y
    elif how == "sample shape":
        if not others or not isinstance(a.get("x_train"), np.ndarray):
            return give_up()
        target = draw(st.sampled_from(others))
        rows = _rows(a[f"x_{target}"]) or 3
        shape = (9,) if a["x_train"].shape[1:] != (9,) else (7, 7)
        a[f"x_{target}"] = np.zeros((rows, *shape), np.float32)
    elif how == "zero width":
        a[f"x_{split}"] = np.zeros((n, 0, 3), np.float32)
    elif how == "label not in train":
        train = a.get("y_train")
        if not others or not isinstance(train, np.ndarray) or train.dtype.kind not in "iu" or train.ndim != 1 or not len(train):
            return give_up()
        target = draw(st.sampled_from(others))
        rows = _rows(a.get(f"y_{target}")) or 3
        y = np.arange(rows) % 2
        y[0] = int(train.max()) + draw(st.integers(1, 2**40))
        a[f"y_{target}"] = y
    elif how == "single class":
        for s in splits:
            a[f"y_{s}"] = np.zeros(_rows(a[f"x_{s}"]) or 3, np.int64)
        for s in ("train", "test", "val"):  # a lone y_ would keep other classes alive
            if f"y_{s}" in a and f"x_{s}" not in a:
                a[f"y_{s}"] = np.zeros(_rows(a[f"y_{s}"]) or 3, np.int64)
    elif how == "beyond float32":
        if not _numeric(x):
            return give_up()
        big = x.astype(np.float64)
        big.reshape(-1)[0] = draw(st.sampled_from([1e39, -1e100, 1.7e308]))
        a[f"x_{split}"] = big
    elif how == "half a val split":
        if "x_val" in a and "y_val" in a:
            del a[draw(st.sampled_from(["x_val", "y_val"]))]
        elif "x_val" not in a and "y_val" not in a:
            a["x_val"] = np.zeros((3, 5), np.float32)
        # exactly one of them present: already half a val split
    else:
        raise AssertionError(how)


MUTATIONS = ["missing key", "x dtype", "y dtype", "length", "non-finite", "x ndim", "y ndim", "empty",
             "negative label", "sample shape", "zero width", "label not in train", "single class",
             "beyond float32", "half a val split"]


@st.composite
def malformed_npz(draw) -> bytes:
    """The bytes of an .npz kdcache must refuse: a valid one with up to two mutations of any kind
    and then a final one (which alone guarantees a defect), or random bytes, or a truncated
    archive of either."""
    how = draw(st.sampled_from(["arrays"] * 6 + ["random bytes", "truncated"]))
    if how == "random bytes":
        return draw(st.binary(max_size=300).filter(lambda b: not b.startswith((b"PK", b"\x93NUMPY"))))
    a = draw(valid_npz())
    if how == "arrays" or draw(st.booleans()):
        for m in draw(st.lists(st.sampled_from(MUTATIONS), max_size=2)) + [draw(st.sampled_from(MUTATIONS))]:
            _mutate(draw, a, m)
    buf = io.BytesIO()
    (np.savez_compressed if draw(st.booleans()) else np.savez)(buf, **a)
    data = buf.getvalue()
    if how == "truncated":
        data = data[: draw(st.integers(0, len(data) - 1))]
    return data


@CI
@given(data=malformed_npz())
def test_malformed_npz_is_refused(tmp_path, capsys, data):
    path = tmp_path / "data.npz"
    path.write_bytes(data)
    _refused("cache", npz_cmd(tmp_path, path), tmp_path, capsys)
    assert not (tmp_path / "cache").exists()


if __name__ == "__main__":
    if sys.argv[1:2] != ["--write-doc"]:
        sys.exit(f"usage: {sys.argv[0]} --write-doc [CASE_ID ...]   (regenerates "
                 f"{DOC.relative_to(ROOT)}: every row, or those cases' rows)")
    write_doc(sys.argv[2:])
