"""Typed configuration: frozen dataclasses, resolved from defaults, an optional YAML file and
``key=value`` overrides, in that order.

Unknown keys and values of the wrong type are errors, never ignored; so is a key given where it
does not apply (``cache=X dataset=digits3``: the cache decides the data). Each config says
which of its keys its other values make moot (its ``moot()`` method); :func:`resolve` refuses
those among the keys the user gave, on the command line or in the YAML file. The fully resolved
config is saved beside every artifact (teacher checkpoint, cache, student run; by
:mod:`pipeline.provenance`) so that any result can be traced back to exactly what produced it.

Paths are stored absolute: :func:`resolve` makes every path field (declared with
:func:`path_field`) and, through :mod:`pipeline.settings`, the file of a path-taking dataset
(``npz:rel.npz``) absolute against the working directory, so caches, manifests and run configs
mean the same from anywhere.

Values whose meaning another module owns (the dataset spec: :mod:`pipeline.data`; augmentation
policies: :mod:`pipeline.augment`; the logits mode: :mod:`pipeline.sparse`) are checked by that
module, through :mod:`pipeline.settings`, which sits above them: this module imports none of
them, so that they can all import it.

A field typed ``X | None`` is optional: None (``key=none``, ``key=``, or YAML ``null``) means
"not given", and whoever reads the config says what that means (e.g. a student run's
``temperature=None`` takes the cache's default when the run uses a temperature at all).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable, TypeVar

from pipeline.errors import KdError
from pipeline.storage import is_url, location

C = TypeVar("C")
TRACKERS = ("none", "mlflow")  # tracking=: where student runs are also logged (pipeline.tracking)


def path_field(default: str, keywords: tuple[str, ...] = ()) -> Any:
    """A config field holding a filesystem path, stored absolute (""  and ``keywords`` such
    as ``random`` are kept as they are). The fields named in pipeline.storage.OBJECT_STORE_KEYS
    (cache, cache_root, out) may hold an object store URL instead, kept as written."""
    return field(default=default, metadata={"path": True, "keywords": keywords})


def dataset_field(default: str) -> Any:
    """The ``dataset=NAME[:ARG]`` field: ARG is made absolute for sources that take a path
    (by :func:`pipeline.settings.owned`, since the dataset registry owns that knowledge)."""
    return field(default=default, metadata={"dataset": True})


MIN_SEQ_LEN, MAX_SEQ_LEN = 2, 1 << 20  # tokens per window of a token dataset
TOKEN_DATA_KEYS = ("tokenizer", "seq_len", "pack")  # keys only token datasets (tokens:) take


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, and how it is split. Shared by every stage that reads inputs."""

    dataset: str = dataset_field("digits")  # registry name, e.g. digits, npz:PATH, synthetic:N:SHAPE[:K]
    data_root: str = path_field("data/datasets")  # where torchvision / downloaded datasets live
    download: bool = False  # torchvision datasets: download when missing (needs internet)
    val_fraction: float = 0.15  # carved from train (stratified) when a dataset has no val split
    seed: int = 0  # seeds the val split, synthetic data and teacher training
    # processes that decode file-backed datasets (imagefolder) while the teacher runs; 0 = auto:
    # cores - 1 on a GPU, 1 (the loading thread) on CPU (pipeline.decoding.auto_decoders). In no
    # fingerprint or cache key: the decoded values are bit-identical for any number of them
    decoders: int = 0
    # text datasets (text:PATH): the columns holding the documents and their labels, and the
    # share of rows carved as test when the file has no split column
    text_column: str = "text"
    label_column: str = "label"
    test_fraction: float = 0.2
    # token datasets (tokens:PATH, pipeline.data.tokens): the Hugging Face tokenizer directory
    # that turns documents into ids ("" = the teacher's: `kdcache cache teacher=hf:DIR` fills
    # it), the tokens per window, and whether documents are packed (joined with EOS and cut
    # every seq_len) or each given a window of its own (truncated, right-padded)
    tokenizer: str = path_field("")
    seq_len: int = 256
    pack: bool = True

    def check(self) -> None:
        if not MIN_SEQ_LEN <= self.seq_len <= MAX_SEQ_LEN:
            raise KdError(f"seq_len={self.seq_len} must be in {MIN_SEQ_LEN}..{MAX_SEQ_LEN} (a "
                          "window needs a token and the next token it predicts)")
        if not 0.0 < self.test_fraction < 0.9:
            raise KdError(f"test_fraction={self.test_fraction} must be in (0, 0.9)")
        if not 0.0 < self.val_fraction < 0.9:
            raise KdError(f"val_fraction={self.val_fraction} must be in (0, 0.9)")
        if not 0 <= self.decoders <= MAX_DECODERS:
            raise KdError(f"decoders={self.decoders} must be in 0..{MAX_DECODERS} (0 = auto: one "
                          "process per core the teacher leaves free)")


@dataclass(frozen=True)
class TeacherConfig(DataConfig):
    """The teacher: its architecture, its weights, and how `kdcache teacher` trains it."""

    teacher: str = "auto"  # registry name, or auto: picked by the input's rank
    teacher_ckpt: str = path_field("", ("random",))  # "" = the trained teacher under teacher_dir; "random"; or a PATH
    teacher_dir: str = path_field("data/teachers")
    pretrained: bool = False  # start training from torchvision weights found locally
    epochs: int = 40
    lr: float = 3e-3
    weight_decay: float = 5e-4
    batch_size: int = 128
    # augmentation while *training* the teacher (a policy, see pipeline.augment); auto = shift:1
    # for inputs with a channel axis and none for flat (D,) rows, which may be tabular
    teacher_augment: str = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # torch threads; 0 = auto: torch's default (every core) for `kdcache teacher`, and for a
    # cache build cores / (workers x streams) here, on a scheduler's workers each worker's
    # share of its own host's cores (pipeline.cluster)
    threads: int = 0
    # text teachers (teacher=hf:DIR): tokens per document (longer ones are truncated), and what
    # `kdcache teacher` trains: head (the linear head on frozen encoder features, fast on CPU)
    # or full (every weight; give it a small lr, e.g. lr=3e-5)
    max_length: int = 128
    finetune: str = "head"
    # causal-LM teachers (teacher=hf:DIR): a GGUF file in DIR (weights, config and tokenizer)
    gguf_file: str = ""
    # a token dataset's teacher trained here (teacher=auto on dataset=tokens:PATH): the size of
    # the byte-level BPE vocabulary trained on its train documents (pipeline.lm_teacher)
    vocab_size: int = 1024

    def check(self) -> None:
        super().check()
        _check_threads(self.threads)
        _positive(self, "epochs", "lr", "batch_size")
        if self.max_length < 2:
            raise KdError(f"max_length={self.max_length} must be >= 2 (a document's tokens, special "
                          "tokens included)")
        if self.finetune not in FINETUNES:
            raise KdError(f"finetune={self.finetune!r} is not a way to train a text teacher; use "
                          f"{' or '.join(FINETUNES)}")
        _at_most(self, lr=MAX_LR)
        if not MIN_VOCAB <= self.vocab_size <= MAX_VOCAB:
            raise KdError(f"vocab_size={self.vocab_size} must be in {MIN_VOCAB}..{MAX_VOCAB} (a "
                          "byte-level BPE holds the 256 bytes and its special tokens)")
        if self.weight_decay < 0:
            raise KdError(f"weight_decay={self.weight_decay} must be >= 0")
        _check_device(self.device)

    def moot(self) -> dict[str, str]:
        """The keys this config's values make moot, each with why and the fix (see
        :func:`resolve`). `kdcache teacher` trains a checkpoint: it loads none."""
        return {"teacher_ckpt": "`kdcache teacher` trains the teacher into teacher_dir; drop "
                                "teacher_ckpt= (kdcache cache teacher_ckpt=PATH uses a checkpoint)",
                **_text_teacher_keys(self), **_token_keys(self)}


@dataclass(frozen=True)
class CacheConfig(TeacherConfig):
    """Stage one: how the teacher's outputs are written to the cache."""

    cache: str = path_field("")  # "" = <cache_root>/<dataset>-<teacher>
    cache_root: str = path_field("data/caches")
    layers: tuple[str, ...] = ()  # feature taps by node name; () = the penultimate layer; none = logits only
    pool: bool = True  # global-average-pool spatial feature maps to vectors
    dtype: str = "float16"  # float16 | float32
    compression: str = "none"  # none | zstd: ~10% smaller on dense features, ~2x slower to stream
    temperature: float = 4.0  # default distillation temperature recorded for students
    # how the logits are kept: dense (all C) | topk:K (the K largest and a tail) | sample:K
    # (K classes drawn from softmax(z / temperature)); see README "Choosing a logits mode"
    logits: str = "dense"
    # teacher outputs per train row: view 0 is the input as it is, views 1.. are augmented by
    # `augment` with parameters drawn from (seed, split, sample_id, view); val and test hold view 0
    views: int = 1
    augment: str = "none"  # the views' policy: NAME[:ARG] joined by +, e.g. shift:3, crop:4+flip
    # rows per shard: the unit of work, of writing and of resuming. Each shard costs a few
    # fsyncs and Zarr calls (~10 ms): 4096 rows amortise them even for a light teacher. With
    # views, capped at 64 MiB of outputs (see pipeline.cache.plan.resolve_layout).
    shard_size: int = 4096
    # rows per inner chunk, the unit of reading; 0 = auto: up to 256, sized so that the last
    # chunk of each split (stored whole) pads little (see pipeline.cache.plan.resolve_layout)
    chunk_size: int = 0
    infer_batch_size: int = 256
    scheduler: str = "local"  # local (dask threads when workers > 1) | synchronous | tcp://HOST:PORT
    workers: int = 1  # local dask workers (each runs one shard at a time)
    # teacher forwards an in-process build (workers=1) runs at once, on threads; 0 = auto: one
    # per core (at most 4) on CPU, where small inputs keep a single forward from using all
    # cores well (resnet18 at 32x32: 2 one-thread forwards ~1.2x faster than one on 2 threads),
    # and 1 on GPU
    streams: int = 0
    compile: bool = False  # torch.compile the teacher (worth it on GPU)
    overwrite: bool = False  # replace a cache built from other inputs
    # recompute the shards of a complete cache that fail their checksums (reads every shard
    # once), with the settings the cache was built with (pipeline.cache.build.repair_settings)
    repair: bool = False

    def check(self) -> None:
        super().check()
        _positive(self, "temperature", "shard_size", "infer_batch_size", "workers")
        if "none" in self.layers and len(self.layers) > 1:
            raise KdError(f"layers={','.join(self.layers)} names layers beside none; pass layers=none "
                          "for the logits only, or the layers to tap")
        if self.chunk_size < 0:
            raise KdError(f"chunk_size={self.chunk_size} must be >= 0 (0 = auto)")
        if self.dtype not in ("float16", "float32"):
            raise KdError(f"dtype={self.dtype!r} is not supported; use float16 or float32")
        if self.compression not in ("none", "zstd"):
            raise KdError(f"compression={self.compression!r} is not supported; use none or zstd")
        if self.chunk_size and self.shard_size % self.chunk_size:
            raise KdError(
                f"shard_size={self.shard_size} must be a multiple of chunk_size={self.chunk_size}"
            )
        if not 1 <= self.views <= MAX_VIEWS:
            raise KdError(f"views={self.views} must be in 1..{MAX_VIEWS} (view 0 is the input itself)")
        if self.views > 1 and self.augment == "none":
            raise KdError(f"views={self.views} with augment=none would cache {self.views} identical "
                          "views; pass augment=POLICY (e.g. augment=shift:3) or views=1")
        if self.views == 1 and self.augment != "none":
            raise KdError(f"augment={self.augment} with views=1 caches no augmented view (view 0 is "
                          "the input itself); pass views=K with K > 1, e.g. views=8")
        if self.streams < 0:
            raise KdError(f"streams={self.streams} must be >= 0 (0 = auto)")
        if self.chunk_size > MAX_CHUNK_SIZE:
            raise KdError(f"chunk_size={self.chunk_size} must be at most {MAX_CHUNK_SIZE} rows "
                          "(a chunk is read whole)")
        if self.chunk_size and self.shard_size // self.chunk_size > MAX_CHUNKS_PER_SHARD:
            raise KdError(f"shard_size={self.shard_size} must be at most {MAX_CHUNKS_PER_SHARD} "
                          f"chunks of chunk_size={self.chunk_size} rows")
        _check_scheduler(self.scheduler)

    def moot(self) -> dict[str, str]:
        """See :meth:`TeacherConfig.moot`."""
        out = {**_text_teacher_keys(self), **_token_keys(self)}
        if self.cache:
            out["cache_root"] = (f"cache={self.cache} is where the cache goes; drop cache_root= (or "
                                 "drop cache= for the default cache under cache_root)")
        if self.teacher_ckpt:  # the weights are given: no teacher is trained or looked up
            for key in ("teacher_dir", "pretrained", *TRAINING_KEYS):
                out[key] = (f"teacher_ckpt={self.teacher_ckpt} gives the teacher's weights, so none "
                            f"is trained; drop {key}= (or drop teacher_ckpt= to use, or train, the "
                            "teacher under teacher_dir)")
        if _is_address(self.scheduler):
            for key in ("workers", "streams"):
                out[key] = (f"scheduler={self.scheduler} runs each shard on one of its own workers, "
                            f"one forward at a time; drop {key}= (threads= sets their torch threads)")
        if self.layers == ("none",):
            out["pool"] = f"layers=none caches no features to pool; drop pool= (or pass layers=NAME)"
        return out


MIN_VOCAB, MAX_VOCAB = 260, 1 << 20  # a trained BPE: 256 bytes, its special tokens, merges


# `kdcache teacher`'s training settings: moot where a checkpoint is given instead
TRAINING_KEYS = ("epochs", "lr", "weight_decay", "batch_size", "teacher_augment", "finetune",
                 "vocab_size")
FINETUNES = ("head", "full")  # text teachers: what `kdcache teacher` trains (pipeline.hf)
TEXT_TEACHER_KEYS = ("max_length", "finetune", "gguf_file")  # keys only text teachers (hf:) take


def _text_teacher_keys(cfg: Any) -> dict[str, str]:
    """The text teachers' keys, moot for any other teacher (see :meth:`TeacherConfig.moot`)."""
    if cfg.teacher.startswith("hf:"):
        return {}
    return {key: f"{key}= applies to text teachers (teacher=hf:DIR), not teacher={cfg.teacher}; "
                 f"drop {key}=" for key in TEXT_TEACHER_KEYS}


def _token_keys(cfg: Any) -> dict[str, str]:
    """The token datasets' keys, moot for any other dataset, and ``vocab_size``, moot but for
    the teacher trained on one (teacher=auto on dataset=tokens:PATH)."""
    tokens = cfg.dataset.startswith("tokens:")
    out = {} if tokens else {
        key: f"{key}= applies to token datasets (dataset=tokens:PATH), not dataset={cfg.dataset}; "
             f"drop {key}=" for key in TOKEN_DATA_KEYS}
    if tokens and cfg.teacher == "auto":
        out["tokenizer"] = ("teacher=auto on a token dataset trains its own tokenizer with the "
                            "teacher; drop tokenizer= (or pass teacher=hf:DIR, whose tokenizer the "
                            "data must share)")
    else:
        out["vocab_size"] = ("vocab_size= sizes the tokenizer trained for teacher=auto on a token "
                             f"dataset (dataset=tokens:PATH), not teacher={cfg.teacher} on "
                             f"dataset={cfg.dataset}; drop vocab_size=")
    return out


@dataclass(frozen=True)
class InfoConfig:
    """`kdcache info`: which cache to look at."""

    cache: str = path_field("")
    cache_root: str = path_field("data/caches")
    dataset: str = dataset_field("digits")  # used only to find the default cache when cache is empty
    teacher: str = "auto"

    def check(self) -> None:
        pass

    def moot(self) -> dict[str, str]:
        """See :meth:`TeacherConfig.moot`."""
        return _cache_decides(self)


@dataclass(frozen=True)
class VerifyConfig(InfoConfig):
    """`kdcache verify`: which cache, and how many of its rows to re-run through the teacher."""

    rows: int = 256  # rows re-run through the teacher (0: checksums and fingerprints only)
    seed: int = 0  # which rows
    device: str = "auto"
    threads: int = 0  # verify: torch threads of the teacher's forward passes; 0 = torch's default

    def check(self) -> None:
        _check_threads(self.threads)
        if self.rows < 0:
            raise KdError(f"rows={self.rows} must be >= 0")
        _check_seed("seed", self.seed)
        _check_device(self.device)


def _cache_decides(cfg: Any) -> dict[str, str]:
    """A verb that reads a cache: with cache= given, the keys that only find the default cache
    (dataset, teacher, cache_root) are moot."""
    if not cfg.cache:
        return {}
    decides = {"dataset": "the data", "teacher": "the teacher", "cache_root": "where the cache is"}
    return {key: f"cache={cfg.cache} decides {what}; drop {key}= (or drop cache= to use the default "
                 "cache of dataset/teacher under cache_root)" for key, what in decides.items()}


def _is_address(scheduler: str) -> bool:
    """A dask scheduler's address, as opposed to local or synchronous."""
    return scheduler not in ("local", "synchronous")


def _positive(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not value > 0:
            raise KdError(f"{name}={value} must be > 0")


FLOAT32_MAX = 3.4028234663852886e38
MAX_SEED = 2**32 - 1  # scikit-learn's and numpy's legacy seeds are 32-bit
MAX_CHUNK_SIZE = 1 << 16  # rows: a chunk is decoded whole on every read
MAX_CHUNKS_PER_SHARD = 1 << 12  # a shard's index holds one entry per chunk
MAX_LR = 10.0  # AdamW learning rates far above 1 only diverge
MAX_SGD_ALPHA = 100.0  # SGDClassifier regularisation: beyond this every weight is ~0
MAX_WIDTH = 4096  # student width: beyond this a "small" student no longer fits in memory
MAX_DECODERS = 256  # decoding processes: each one costs ~30 MB and a start-up
MAX_VIEWS = 256  # cached views per row: each one is a full teacher forward and its outputs on disk
MAX_LOSS_WEIGHT = 1e6  # pkt's paper weight is 3·10⁴; far beyond that the CE term vanishes
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
# local | synchronous | [PROTOCOL://]HOST:PORT (IPv6 hosts in brackets) | inproc://ADDRESS
_SCHEDULER = re.compile(r"(?:[a-z][a-z0-9+.-]*://)?(?:\[[0-9a-fA-F:.]+\]|[^\s/:\[\]]+):\d+|inproc://\S+")


def _at_most(cfg: Any, **limits: float) -> None:
    for name, limit in limits.items():
        if getattr(cfg, name) > limit:
            raise KdError(f"{name}={getattr(cfg, name)} is above {limit:g}, where training only diverges; "
                          f"use a value in (0, {limit:g}]")


def _check_threads(threads: int) -> None:
    if threads < 0:
        raise KdError(f"threads={threads} must be >= 0 (0 = auto)")


def _check_seed(name: str, value: int) -> None:
    if not 0 <= value <= MAX_SEED:
        raise KdError(f"{name}={value} must be in 0..{MAX_SEED}")


def _check_scheduler(scheduler: str) -> None:
    if not (scheduler in ("local", "synchronous") or _SCHEDULER.fullmatch(scheduler)):
        raise KdError(f"scheduler={scheduler!r} is not a scheduler; use local, synchronous or "
                      "the address of a dask scheduler, e.g. tcp://HOST:8786")


def in_process(cfg: Any) -> bool:
    """The scheduling rule of builds and sweeps (``cfg``: a CacheConfig or a SweepConfig):
    whether the shards or runs run in this process, one after another (one local worker gains
    nothing from dask but its start-up, ~0.5 s), rather than as dask tasks. Here, beside the
    scheduler's grammar, rather than in :mod:`pipeline.cluster`, which imports distributed
    (~0.8 s) and is imported only when a scheduler is in use."""
    return cfg.scheduler == "synchronous" or (cfg.scheduler == "local" and cfg.workers == 1)


def _check_device(device: str) -> None:
    # torch.device() also accepts meta, mps, xla, hpu, ...: kdcache runs on none of them
    if not _DEVICE.fullmatch(device):
        raise KdError(f"device={device!r} is not a device; use auto, cpu, cuda or cuda:N")


# --------------------------------------------------------------------------- resolution

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _optional(annotation: Any) -> Any:
    """``X`` for an annotation ``X | None``, else None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0]
    return None


def _coerce(cls: type, name: str, annotation: Any, value: Any) -> Any:
    """Convert a YAML or command-line value to the field's declared type."""
    inner = _optional(annotation)
    if inner is not None:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            return None
        return _coerce(cls, name, inner, value)
    origin = typing.get_origin(annotation)
    if value is None:  # `key:` with nothing after it in a YAML file
        raise KdError(f"{name} has no value (null) in the config file; give it one or remove the key")
    try:
        if annotation is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError
        if annotation is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(str(value).strip()) if not isinstance(value, (int, float)) else int(value)
        if annotation is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if out != out or out in (float("inf"), float("-inf")):
                raise ValueError
            if abs(out) > FLOAT32_MAX:  # every number ends up in float32 tensors
                raise KdError(f"{name}={value!r} is beyond the float32 range (±{FLOAT32_MAX:.3g})")
            return out
        if annotation is str:
            if isinstance(value, (list, dict)):
                raise ValueError
            if "\x00" in str(value):  # no path or name can hold one; open() would raise
                raise KdError(f"{name}={value!r} contains a NUL character")
            return str(value)
        if origin is tuple:
            (item_type, _ellipsis) = typing.get_args(annotation)
            if isinstance(value, dict):
                raise ValueError
            # lists are comma- or space-separated, so Make's MODELS="a b c" passes through
            items = value if isinstance(value, (list, tuple)) else str(value).replace(",", " ").split()
            return tuple(_coerce(cls, name, item_type, v.strip() if isinstance(v, str) else v)
                         for v in items)
    except (TypeError, ValueError):
        kind = {bool: "true or false", int: "an integer", float: "a finite number",
                str: "a string"}.get(annotation, "a comma-separated list")
        raise KdError(f"{name}={value!r} is not valid: {name} expects {kind}") from None
    raise TypeError(f"unsupported config field type {annotation!r} on {cls.__name__}.{name}")


ParamsHook = Callable[[Any, dict[str, Any]], Any]  # (cfg, keys beyond its fields) -> completed cfg


def resolve(cls: type[C], overrides: list[str] | dict[str, Any] = (), verb: str = "", *,
            owners: Callable[[C], C], params: ParamsHook | None = None) -> C:
    """Build a config of type ``cls`` from defaults, an optional ``config=FILE.yaml`` and
    ``key=value`` overrides. Raises :class:`KdError` on unknown keys or bad values.

    ``owners(cfg)`` checks the values that other modules own (a dataset spec, augmentation
    policies, a logits mode) and returns ``cfg`` completed (a dataset's file made absolute);
    it runs before the config's own checks, which may presume those values valid. It is
    :func:`pipeline.settings.owned`: resolve configs with :func:`pipeline.settings.resolve`,
    which passes it (this module imports none of those owners).

    A config with a ``params`` field (student runs) takes, besides its own fields, the
    hyperparameters its student and loss declare: ``params(cfg, given)`` — supplied by the
    owner of those declarations (pipeline.students.complete) — checks the keys ``given``
    beyond the fields and returns ``cfg`` completed. A config with a ``grid`` field (sweeps)
    also takes ``grid.KEY=V1,V2``."""
    pairs: list[tuple[str, Any]] = []
    items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in overrides]
    for key, value in items:
        if key == "config":
            pairs = _read_yaml(value) + pairs
        else:
            pairs.append((key, value))

    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    known = names - {"params", "grid", "default_grid"}
    values: dict[str, Any] = {}
    given: dict[str, Any] = {}  # keys beyond the fields: hyperparameters, checked by `params`
    grid: dict[str, tuple[str, ...]] = {}
    for key, value in pairs:
        if key in known:
            values[key] = _coerce(cls, key, hints[key], value)
        elif "grid" in names and key.startswith("grid.") and key[5:]:
            items = value if isinstance(value, (list, tuple)) else str(value).replace(",", " ").split()
            grid[key[5:]] = tuple(str(v).strip() for v in items)
        elif "grid" in names and key in OLD_GRID_KEYS:
            raise KdError(f"{key}= is spelled grid.{OLD_GRID_KEYS[key]}= now (every hyperparameter "
                          f"can be an axis), e.g. grid.{OLD_GRID_KEYS[key]}={str(value).replace(' ', ',')}")
        elif "params" in names and params is not None:
            given[key] = value
        else:
            where = f" for `kdcache {verb}`" if verb else ""
            raise KdError(f"unknown key {key!r}{where}; known keys: {', '.join(sorted(known))}")
    if "grid" in names:  # the default axes, for keys given neither as an axis nor once
        values["grid"] = tuple(grid.items())
        values["default_grid"] = tuple((k, v) for k, v in DEFAULT_GRID
                                       if k not in grid and k not in values and k not in given)
    cfg = cls(**values)
    # before paths are made absolute: a moot dataset= names a file or plugin nobody will open
    moot = cfg.moot() if hasattr(cfg, "moot") else {}
    written = dict(pairs)  # the user's keys, each with its last value as given
    for key in written:
        if key in moot:
            raise KdError(f"{key}={_shown(written[key])} does not apply: {moot[key]}")
    cfg = owners(_absolute_paths(cfg))
    cfg.check()
    if "params" in names and params is not None:
        cfg = params(cfg, given)
    return cfg


def coerce_field(cls: type, name: str, value: Any) -> Any:
    """``value`` (text or YAML) as the type of field ``name`` of config class ``cls``."""
    return _coerce(cls, name, typing.get_type_hints(cls)[name], value)


def _shown(value: Any) -> str:
    """A given value as the user wrote it (a YAML list as a space-separated one)."""
    if isinstance(value, (list, tuple)):
        return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def from_record(cls: type[C], record: dict[str, Any]) -> C:
    """A config rebuilt exactly as it was recorded (e.g. a manifest's dataset config): its
    values were resolved when it was saved, so paths are taken as they are."""
    known = {f.name for f in fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in record.items() if k in known}
    if "params" in values:
        values["params"] = Params(values["params"])
    for key in ("grid", "default_grid"):
        if key in values:
            values[key] = tuple((k, tuple(v)) for k, v in values[key])
    return cls(**values)


def _absolute_paths(cfg: C) -> C:
    """``cfg`` with its path fields absolute (see :func:`path_field`)."""
    changes = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get("path") and value and value not in f.metadata["keywords"]:
            loc = location(value, f.name)  # refuses URLs where only a local path is meant
            # an object store URL is kept as written; a local path (or file://) made absolute
            changes[f.name] = value.rstrip("/") if is_url(value) and not isinstance(loc, Path) \
                else os.path.abspath(os.path.expanduser(str(loc)))
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _split(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise KdError(f"argument {text!r} is not key=value; write e.g. dataset=digits")
    return key.strip(), value


def _read_yaml(path: str) -> list[tuple[str, Any]]:
    import yaml  # only when a config file is used

    p = Path(path)
    if not p.is_file():
        raise KdError(f"config file {path} does not exist; pass config=PATH to a YAML file")
    try:
        data = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise KdError(f"config file {path} is not UTF-8 text (byte {exc.start}); save it as "
                      "UTF-8 YAML") from None
    except OSError as exc:
        raise KdError(f"config file {path} cannot be read ({exc.strerror or type(exc).__name__})") from None
    except yaml.YAMLError as exc:
        raise KdError(f"config file {path} is not valid YAML "
                      f"({(str(exc).splitlines() or [type(exc).__name__])[0]})") from None
    if not isinstance(data, dict):
        raise KdError(f"config file {path} must hold a mapping of key: value")
    return [(str(k), v) for k, v in data.items()]


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as JSON-able values: tuples as lists, ``params`` as a mapping."""
    out = dataclasses.asdict(cfg)
    return {k: dict(v) if isinstance(v, Mapping) else _listed(v) for k, v in out.items()}


def _listed(value: Any) -> Any:
    return [_listed(v) for v in value] if isinstance(value, tuple) else value


def fingerprint(obj: Any) -> str:
    """sha256 of a JSON-able object (configs as dicts), stable across runs and machines."""
    if dataclasses.is_dataclass(obj):
        obj = to_dict(obj)
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


class Params(Mapping):
    """A run's hyperparameters by name: immutable, hashable, picklable (sent to Dask workers),
    ordered by name. Which names a run takes is declared by its student's constructor and its
    loss's registration (pipeline.students.hyperparameters), never listed here."""

    __slots__ = ("_items",)

    def __init__(self, items: Any = ()):
        object.__setattr__(self, "_items", tuple(sorted(dict(items).items())))

    def __getitem__(self, name: str) -> Any:
        for key, value in self._items:
            if key == name:
                return value
        raise KeyError(name)

    def __iter__(self):
        return (key for key, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self) == dict(other)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Params are immutable; use .replace(name=value)")

    def __reduce__(self):
        return Params, (dict(self._items),)

    def __deepcopy__(self, memo: dict) -> "Params":
        return self

    def __repr__(self) -> str:
        return f"Params({dict(self._items)!r})"

    def replace(self, **changes: Any) -> "Params":
        return Params({**dict(self._items), **changes})


@dataclass(frozen=True)
class Param:
    """One declared hyperparameter: a student constructor's argument or a loss's registered
    parameter. ``annotation`` is its type (int, float, bool, str, ``X | None``, or
    ``float | str`` for a number or a keyword such as C=auto); ``low``/``high`` bound numbers
    (``low_open``: the bound itself is refused)."""

    name: str
    annotation: Any
    default: Any
    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def coerce(self, value: Any) -> Any:
        """``value`` (text from the command line, or YAML) as this parameter's type, checked
        against its bounds; a one-line KdError otherwise."""
        inner = _optional(self.annotation)
        if inner is not None and (value is None or str(value).strip().lower() in ("", "none")):
            return None
        kind = inner or self.annotation
        if _is_number_or_word(kind):
            text = str(value).strip()
            try:
                out = float(text)
            except ValueError:
                words = PARAM_WORDS.get(self.name, ())
                if text not in words:
                    raise KdError(f"{self.name}={text!r} must be a number"
                                  + (f" or {' or '.join(words)}" if words else "")) from None
                return text
            if out != out or out in (float("inf"), float("-inf")):
                raise KdError(f"{self.name}={text!r} must be a finite number")
        else:
            out = _coerce(Param, self.name, kind, value)
        if isinstance(out, (int, float)) and not isinstance(out, bool):
            below = self.low is not None and (out < self.low or (self.low_open and out == self.low))
            if below or (self.high is not None and out > self.high):
                raise KdError(f"{self.name}={value} must be {self.range_text()}")
        return out

    def range_text(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"


# Bounds of the hyperparameters kdcache knows, by name (low, high, low excluded), declared once
# here and applied to whichever student or loss declares a parameter of that name; a plugin's
# own parameters are checked for their type only.
PARAM_BOUNDS: dict[str, tuple[float, float | None, bool]] = {
    "epochs": (1, None, False), "batch_size": (1, None, False),
    "lr": (0, 10.0, True),  # AdamW learning rates far above 1 only diverge
    "weight_decay": (0, None, False),
    "width": (1, 4096, False),  # beyond this a "small" student no longer fits in memory
    "alpha": (0, 1, False), "dkd_alpha": (0, None, False), "dkd_beta": (0, None, False),
    "loss_weight": (0, 1e6, False),  # pkt's paper weight is 3·10⁴; far beyond, CE vanishes
    "temperature": (0, None, True),
    "sgd_alpha": (0, 100.0, True),  # SGDClassifier's L2 penalty: beyond this every weight is ~0
    "C": (0, None, True),
    # text students: hash buckets (rows of an embedding, or columns of a hashed vectoriser),
    # word n-gram orders (beyond 5, n-grams almost never repeat and their count explodes),
    # words kept per document, and a vocabulary term's minimum document count
    "buckets": (1, 10_000_000, False), "ngrams": (1, 5, False), "max_tokens": (1, None, False),
    "min_df": (1, None, False),
}


# Keywords a number-or-word parameter (annotated ``float | str``) takes instead of a number
PARAM_WORDS: dict[str, tuple[str, ...]] = {"C": ("auto",)}  # auto: chosen on val (C_GRID)


def declared_param(name: str, annotation: Any, default: Any) -> Param:
    """The :class:`Param` ``name`` of a declaration, with kdcache's bounds for that name."""
    low, high, low_open = PARAM_BOUNDS.get(name, (None, None, False))
    return Param(name, annotation, default, low, high, low_open)


def _is_number_or_word(annotation: Any) -> bool:
    """``float | str``: a number, or a keyword the owner checks (C=auto)."""
    return (typing.get_origin(annotation) in (typing.Union, types.UnionType)
            and set(typing.get_args(annotation)) == {float, str})


@dataclass(frozen=True)
class StudentConfig:
    """Stage two: one student trained from a cache (the teacher is never loaded).

    The fields below say which run: the cache, the student (``model``), its loss, which cached
    data it reads, the seed and where it goes. Everything the student learns *with* — width,
    epochs, lr, temperature, alpha, C, a plugin's own arguments, ... — is ``params``: the
    arguments the student's constructor declares and the parameters its loss registered
    (pipeline.students.hyperparameters), given as ``key=value`` like any other key and
    completed with their declared defaults when the config is resolved. A key that neither
    the student nor its loss declares is refused.
    """

    cache: str = path_field("")  # "" = the default cache of dataset/teacher under cache_root
    cache_root: str = path_field("data/caches")
    dataset: str = dataset_field("digits")  # only to find the default cache when cache is empty
    teacher: str = "auto"
    model: str = "linear_svc"  # a student registry name
    loss: str | None = None  # students trained with a loss: a loss registry name (default kd)
    layer: str | None = None  # cached feature read by feature students and feature losses (default: the first)
    # cached views drawn from: all | N (views 0..N-1): input students and sgd draw one per train
    # row per epoch, in-memory feature students take every view's features as rows
    views: str = "all"
    seed: int = 0
    device: str = "auto"
    runs_dir: str = path_field("data/runs")
    tracking: str = "none"  # none | mlflow: also log the run to MLFLOW_TRACKING_URI (pipeline.tracking)
    # torch threads; 0 = auto: torch's default (every core). On a core shared with other jobs
    # threads=1 can be far faster (docs/BENCHMARKS.md, student_threads)
    threads: int = 0
    params: Params = field(default_factory=Params)  # the student's and the loss's hyperparameters

    def check(self) -> None:
        _check_threads(self.threads)
        if self.tracking not in TRACKERS:
            raise KdError(f"tracking={self.tracking!r} is not a tracker; use {' or '.join(TRACKERS)}")
        _check_seed("seed", self.seed)
        _check_device(self.device)
        if self.views != "all" and not (self.views.isdigit() and 1 <= int(self.views) <= MAX_VIEWS):
            raise KdError(f"views={self.views!r} must be all or a number of views in 1..{MAX_VIEWS}")

    def param(self, name: str, default: Any = None) -> Any:
        """The hyperparameter ``name`` of this run (``default`` where the run has none)."""
        return self.params.get(name, default)

    def moot(self) -> dict[str, str]:
        """See :meth:`TeacherConfig.moot` (hyperparameters that the run's student and loss do
        not declare are refused by pipeline.students.complete)."""
        return _cache_decides(self)


# The sweep's default grid, where neither grid.KEY= nor KEY= is given for that key.
DEFAULT_GRID = (("model", ("linear_svc", "logreg", "cnn_small")), ("loss", ("kd", "ce")),
                ("seed", ("0", "1", "2")))
# Spellings of the grid before every hyperparameter could be an axis: refused, naming the new one
OLD_GRID_KEYS = {"models": "model", "losses": "loss", "seeds": "seed", "temperatures": "temperature"}


@dataclass(frozen=True)
class SweepConfig(StudentConfig):
    """A grid of students from one cache: every combination of the ``grid.KEY=V1,V2,...``
    axes that applies. KEY is any run key (model, loss, seed, layer, views) or any declared
    hyperparameter (width, lr, temperature, C, ...); an axis a run's student or loss does not
    declare is dropped for that run (a feature student has no loss axis; a label-only loss no
    temperature axis), but every axis must apply to some run."""

    grid: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (key, values as given), in the order given
    # DEFAULT_GRID's axes for the keys given neither as grid.KEY= nor KEY= (set by resolve)
    default_grid: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # where the runs go: local with workers=1 (default) or synchronous: one after another in
    # this process; local with workers=N: as dask tasks on N local worker processes of one
    # thread each; tcp://HOST:PORT: as tasks on that dask scheduler's workers
    scheduler: str = "local"
    workers: int = 1
    # (threads, from StudentConfig: per run; 0 = torch's default here (all cores), on a worker
    # its share of its host's cores. Results can differ in the last digits with the thread
    # count: give the same threads (e.g. threads=1) wherever runs must match)

    def check(self) -> None:
        super().check()
        _check_scheduler(self.scheduler)
        _positive(self, "workers")
        for key, values in self.grid:
            if not values:
                raise KdError(f"grid.{key} is empty; give it values, e.g. grid.{key}=A,B")

    def moot(self) -> dict[str, str]:
        """See :meth:`TeacherConfig.moot`: an axis replaces the key's single value."""
        out = super().moot()
        for key, values in self.grid:
            out[key] = (f"grid.{key}={','.join(values)} makes {key} an axis of the sweep; drop "
                        f"{key}= (or add its value to grid.{key}=)")
        if _is_address(self.scheduler):
            out["workers"] = (f"scheduler={self.scheduler} runs the sweep on its own workers; "
                              "drop workers=")
        return out


@dataclass(frozen=True)
class ReportConfig:
    cache: str = path_field("")
    cache_root: str = path_field("data/caches")
    dataset: str = dataset_field("digits")
    teacher: str = "auto"
    out: str = path_field("")  # "" = <results table>/report
    runs_dir: str = path_field("")  # "" = every run of the cache; DIR = only the runs that went there

    def check(self) -> None:
        pass

    def moot(self) -> dict[str, str]:
        """See :meth:`TeacherConfig.moot`."""
        return _cache_decides(self)


EXPORT_FORMATS = ("auto", "onnx", "skops", "hf")


@dataclass(frozen=True)
class ExportConfig:
    """`kdcache export`: a finished student run, exported for deployment."""

    run: str = path_field("")  # a run directory, as `kdcache student` prints it
    # onnx (torch students) | skops (scikit-learn students) | hf (language-model students: a
    # Hugging Face model directory) | auto: the one that fits
    format: str = "auto"
    threads: int = 0  # torch threads of the export and its check; 0 = torch's default

    def check(self) -> None:
        _check_threads(self.threads)
        if not self.run:
            raise KdError("export needs run=RUN_DIR, a run directory `kdcache student` printed "
                          "(under runs_dir)")
        if self.format not in EXPORT_FORMATS:
            raise KdError(f"format={self.format!r} is not an export format; use "
                          f"{', '.join(EXPORT_FORMATS)}")
