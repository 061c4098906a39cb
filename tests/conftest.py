"""Shared fixtures: tiny synthetic caches built in tmp directories, and the hypothesis profile.

Every build passes ``cache`` (or else ``cache_root``) and, when it trains a teacher,
``teacher_dir`` inside a tmp directory, and every test runs with its tmp directory as the
working directory, so the relative defaults (``data/caches``, ``data/teachers``) can never
write into the repository.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=25,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci")

# A dataset and teacher small enough that one whole build takes a fraction of a second:
# 300 rows -> train 240 (4 shards of 64), val 30 (1 shard), test 30 (1 shard); 16-row chunks.
SMALL_DATASET = "synthetic:300:1x8x8:3"
SMALL_SHAPE = (1, 8, 8)
SMALL_CLASSES = 3


def cache_args(root: Path, work: Path, **overrides) -> list[str]:
    """``key=value`` arguments of `kdcache cache` for a tiny, synchronous, random-teacher build."""
    values = {
        "dataset": SMALL_DATASET,
        "teacher": "cnn_small",
        "teacher_ckpt": "random",
        "scheduler": "synchronous",
        "shard_size": 64,
        "chunk_size": 16,
        "infer_batch_size": 32,
        "cache": root,
        "cache_root": work / "caches",
        "teacher_dir": work / "teachers",
    }
    values.update(overrides)
    # a key that does not apply is refused: no cache_root beside a cache, no teacher_dir beside
    # the teacher's weights
    if values["cache"] and "cache_root" not in overrides:
        values.pop("cache_root")
    if values["teacher_ckpt"] and "teacher_dir" not in overrides:
        values.pop("teacher_dir")
    return [f"{k}={v}" for k, v in values.items()]


def run_cli(capsys, *argv: str) -> dict:
    """Run ``kdcache ARGV --json`` in-process; it must succeed. Returns its JSON summary."""
    import json

    from stages.cli import main as cli

    capsys.readouterr()
    rc = cli([*argv, "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out.strip().splitlines()[-1])


def build(root: Path, work: Path | None = None, **overrides) -> dict:
    """Build (or resume) a cache in-process; KdError propagates. Returns the stage summary."""
    from stages import cache as cache_stage

    work = Path(root).parent if work is None else work
    return cache_stage.main(cache_args(Path(root), work, **overrides))


class FailOnCall:
    """Wraps ``shard.compute_shard``: records each call's (split, shard) and raises ``error``
    (a simulated crash, or e.g. KeyboardInterrupt for Ctrl-C) on call number ``fail_on``."""

    def __init__(self, real, fail_on: int | None = None,
                 error: type[BaseException] = RuntimeError):
        self.real, self.fail_on, self.error, self.calls = real, fail_on, error, []

    def __call__(self, job, *args):
        self.calls.append((job.split, job.shard))
        if len(self.calls) == self.fail_on:
            raise self.error("simulated crash")
        return self.real(job, *args)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's) on 127.0.0.1 for the whole session, stopped after."""
    from servers import S3Server

    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def dask_cluster(tmp_path_factory, s3_server):
    """``dask scheduler`` + ``dask worker --nworkers 2 --nthreads 1`` processes on 127.0.0.1 for
    the session (bench.dask_processes), shared by the cluster and object-storage tests; stopped
    by process group at the end, even after a failure. The workers start with the test S3
    server's AWS environment, as a user starts workers that write a cache to S3; nothing else
    in them depends on it."""
    from bench.dask_processes import ProcessCluster

    with pytest.MonkeyPatch.context() as env:  # the processes keep their copy of it
        for key, value in s3_server.env().items():
            env.setenv(key, value)
        processes = ProcessCluster(tmp_path_factory.mktemp("dask"), workers=2).__enter__()
    try:
        yield processes
    finally:
        processes.stop()


@pytest.fixture
def s3(s3_server, monkeypatch, request) -> str:
    """A new, empty bucket on the test S3 server, and the standard AWS environment pointing at
    it (as a user sets it for MinIO). Returns ``s3://BUCKET``."""
    from s3fs import S3FileSystem

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    S3FileSystem.clear_instance_cache()  # none made under another environment is reused
    name = "kd-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    name = f"{name}-{len(_BUCKETS)}"
    _BUCKETS.append(name)
    return s3_server.create_bucket(name)


_BUCKETS: list[str] = []


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _forget_plugins():
    """Plugins a test loaded (by import path, entry point or timm:NAME) do not outlive it: the
    registries hold kdcache's own entries again for the next test."""
    yield
    from pipeline.data import DATASETS
    from pipeline.losses import LOSSES
    from pipeline.students import STUDENTS
    from pipeline.teachers import TEACHERS

    for registry in (DATASETS, LOSSES, STUDENTS, TEACHERS):
        registry.forget_plugins()


@pytest.fixture(scope="session")
def builder() -> Callable[..., dict]:
    """The :func:`build` helper: ``builder(root, work=None, **overrides) -> summary``."""
    return build


@pytest.fixture(scope="session")
def args_for() -> Callable[..., list[str]]:
    """The :func:`cache_args` helper: ``args_for(root, work, **overrides) -> [key=value]``."""
    return cache_args


@pytest.fixture
def make_cache(tmp_path) -> Callable[..., Path]:
    """``make_cache(name="cache", **overrides) -> Path`` builds a tiny cache under tmp_path."""

    def make(name: str = "cache", **overrides) -> Path:
        root = tmp_path / name
        build(root, tmp_path, **overrides)
        return root

    return make


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory) -> Path:
    """One float32 cache with features, shared read-only by the reader tests."""
    work = tmp_path_factory.mktemp("small_cache")
    root = work / "cache"
    build(root, work, dtype="float32")
    return root


@pytest.fixture(scope="session")
def harness_reference(tmp_path_factory) -> tuple[Path, float]:
    """The fault harness's uninterrupted build (``test_faults.uninterrupted``) and its seconds,
    made once per session: the kill tests of test_faults.py and test_object_storage.py compare
    against the same bytes, and each build is a subprocess of several seconds. Read-only."""
    from test_faults import uninterrupted

    return uninterrupted(tmp_path_factory.mktemp("harness_reference"))


@pytest.fixture(scope="session")
def small_cache_f16(tmp_path_factory) -> Path:
    """The same cache stored as float16 (the default dtype)."""
    work = tmp_path_factory.mktemp("small_cache_f16")
    root = work / "cache"
    build(root, work, dtype="float16")
    return root


def declared(model: str, **values) -> list[str]:
    """``key=value`` arguments for the hyperparameters among ``values`` that ``model``'s
    constructor declares (e.g. epochs= for a network, not for logreg: kdcache refuses a key a
    student does not take)."""
    from pipeline.students import student_params

    return [f"{k}={v}" for k, v in values.items() if k in student_params(model)]


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    """A 240-row, 3-class CSV of short documents (tests/text_models.py)."""
    from tests.text_models import write_corpus

    return write_corpus(tmp_path_factory.mktemp("text") / "mail.csv")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, text_corpus) -> Path:
    """A Hugging Face model directory of a tiny random BERT with a WordPiece tokenizer trained
    on :func:`text_corpus` (built once per session, in about a second)."""
    from tests.text_models import corpus_texts, write_tiny_bert

    return write_tiny_bert(tmp_path_factory.mktemp("hf") / "tiny-bert", corpus_texts(text_corpus))


@pytest.fixture(scope="session")
def token_corpus(tmp_path_factory) -> Path:
    """A .txt corpus of 200 short English-like documents separated by blank lines
    (tests/lm_models.py): ``dataset=tokens:PATH``."""
    from tests.lm_models import write_corpus

    return write_corpus(tmp_path_factory.mktemp("lm") / "stories.txt")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, token_corpus) -> Path:
    """A Hugging Face model directory of a tiny random LlamaForCausalLM (32 wide, 2 layers)
    with a byte-level BPE (300 entries, EOS ``<|endoftext|>``, pad ``<pad>``) trained on
    :func:`token_corpus`: ``teacher=hf:DIR`` and ``tokenizer=DIR``. Outputs = len(tokenizer)."""
    from tests.lm_models import corpus_documents, write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny-llama", corpus_documents(token_corpus))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, token_corpus) -> Path:
    """Like :func:`tiny_llama`, a random GPT2LMHeadModel with the same tokenizer, its output
    layer padded to len(tokenizer) + 20 (a padded vocabulary)."""
    from tests.lm_models import corpus_documents, write_tiny_gpt2

    return write_tiny_gpt2(tmp_path_factory.mktemp("hf") / "tiny-gpt2", corpus_documents(token_corpus))
