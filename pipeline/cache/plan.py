"""What a build will write, decided before any shard is computed: the array layout (chunk and
shard sizes), the codecs, the teacher's output shapes, and the manifest with its key.

A text teacher (``teacher=hf:DIR``) also tokenizes every document once here: the sha256 of
every split's token ids (row by row, :func:`pipeline.tokens.update_hash`) and the tokenizer's
record (fingerprint, max_length, truncation and padding side, vocabulary size) enter the
manifest and its key, so a cache is never resumed, nor verified, by a tokenization that
differs from its own.

A causal-LM teacher (``teacher=hf:DIR`` on a token dataset, pipeline.hf_lm) makes a **token
cache** (format 4): per window, its token ids, loss mask and segments, and per position the
teacher's sparse (or, for a vocabulary of at most :data:`MAX_DENSE_OUTPUTS`, dense) logits;
the manifest's ``lm`` entry records the tokenizer, ``len(tokenizer)``, the model's output size,
seq_len and pack (:func:`describe_lm`)."""

from __future__ import annotations

import dataclasses
import platform
from pathlib import Path
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import torch

import hashlib

import pipeline
from pipeline import plugins, runtime, tokens
from pipeline.augment import parse
from pipeline.cache import format as fmt
from pipeline.config import CacheConfig, DataConfig, fingerprint
from pipeline.data import Dataset
from pipeline.data.dataset import BLOCK
from pipeline.errors import KdError
from pipeline.hf import HfTeacher, load_tokenizer
from pipeline.data.tokens import tokenizer_record
from pipeline.hf_lm import HfCausalLM, is_causal_lm, same_vocabulary
from pipeline.keyed_random import RNG
from pipeline.latency import WINDOW_BATCHES, per_sample_ms, torch_predict
from pipeline.onnx_teacher import OnnxTeacher
from pipeline.sparse import check_mode, classes_dtype, parse_mode
from pipeline.teachers import (TeacherSpec, build_teacher, default_layers, is_text_teacher,
                               state_fingerprint, tap)

def codecs(compression: str) -> list:
    """Inner-chunk codecs: optionally zstd, then always a CRC32C so a flipped byte fails loudly
    on read. Not compressing is the default: float16 already halves the bytes, zstd saves ~10%
    more on dense features but halves streaming speed (docs/BENCHMARKS.md)."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return ([ZstdCodec(level=3)] if compression == "zstd" else []) + [Crc32cCodec()]


def codec_names(compression: str) -> list[str]:
    return (["zstd(level=3)"] if compression == "zstd" else []) + ["crc32c"]


AUTO_CHUNK_ROWS = (32, 256)  # the chunk sizes chunk_size=0 chooses from (rows)


MAX_SHARD_BYTES = 64 << 20  # a multi-view shard's outputs in memory (two are in flight)
# logits=dense on a token cache stores every output at every position: above this many outputs
# (4,096 float16 values, 8 KiB per token) a sparse mode is the only sensible one
MAX_DENSE_OUTPUTS = 4096
MAX_CHUNK_BYTES = 4 << 20  # a multi-view chunk, decoded whole on every read


def resolve_layout(cfg: CacheConfig, dataset: Dataset,
                   shapes: dict[str, tuple[int, ...]]) -> CacheConfig:
    """``cfg`` with ``chunk_size=0`` (auto) made concrete for this dataset, and, with several
    views, shards and chunks capped so that memory stays bounded whatever the views.

    Zarr stores the last chunk of every split whole, padding included: a fixed 256-row chunk
    pads digits' splits (1,221 / 216 / 360 rows) by 251 rows, 14% of the data. Auto takes the
    largest chunk of 32-256 rows (1-256 windows in a token cache; at most ``shard_size``) that pads the splits by at most 1% of
    their rows (256 for any large dataset; 72 for digits, 3 rows of padding), or failing that
    the one that pads least. ``shard_size`` is rounded down to a multiple of the chunk and
    capped at the largest split (a shard index has an entry per chunk, used or not).

    A chunk and a shard hold every view of their rows. With ``views > 1``, given the teacher's
    per-sample output ``shapes``, a shard holds at most 64 MiB of outputs and a chunk at most
    4 MiB (at least one row), so neither grows with the number of views (an explicit
    ``chunk_size`` beyond that is refused); single-view layouts are exactly as they were.
    """
    shard_rows, chunk_rows = cfg.shard_size, AUTO_CHUNK_ROWS[1]
    fewest = AUTO_CHUNK_ROWS[0]
    if "tokens" in shapes:  # a token cache: a row is a window of T positions (token_row_bytes)
        row_bytes = token_row_bytes(cfg, shapes["tokens"][0], shapes["logits"][0])
        shard_rows = min(shard_rows, max(1, MAX_SHARD_BYTES // row_bytes))
        chunk_rows = min(chunk_rows, max(1, MAX_CHUNK_BYTES // row_bytes))
        # a window is already T positions: a chunk of a few windows reads well, and a 35-window
        # chunk padded a 19-window val split of SmolLM2's topk:32 cache to 35 (13% more bytes)
        fewest = 1
        if cfg.chunk_size > chunk_rows:
            raise KdError(f"chunk_size={cfg.chunk_size} makes chunks of {cfg.chunk_size * row_bytes / 2**20:.1f} "
                          f"MiB ({shapes['tokens'][0]} positions per window; a chunk is decoded whole); "
                          f"use chunk_size <= {chunk_rows} or leave it to auto (chunk_size=0)")
    elif cfg.views > 1:
        itemsize = np.dtype(cfg.dtype).itemsize
        mode = parse_mode(cfg.logits)
        if mode.sparse:  # K (+ M) ids and K values (at most 4 bytes each) in place of C logits
            shapes = {**shapes, "logits": (2 * (mode.k + mode.m) * 4 // itemsize + 1,)}
        row_bytes = cfg.views * itemsize * sum(int(np.prod(shape)) for shape in shapes.values())
        shard_rows = min(shard_rows, max(1, MAX_SHARD_BYTES // row_bytes))
        chunk_rows = min(chunk_rows, max(1, MAX_CHUNK_BYTES // row_bytes))
        if cfg.chunk_size > chunk_rows:
            raise KdError(f"chunk_size={cfg.chunk_size} with views={cfg.views} makes chunks of "
                          f"{cfg.chunk_size * row_bytes / 2**20:.1f} MiB (a chunk is decoded whole, "
                          f"every view of its rows); use chunk_size <= {chunk_rows} or leave it to "
                          "auto (chunk_size=0)")
    if cfg.chunk_size:
        if shard_rows == cfg.shard_size:
            return cfg
        return dataclasses.replace(cfg, shard_size=max(1, shard_rows // cfg.chunk_size) * cfg.chunk_size)
    rows = [len(split) for split in dataset.splits.values()]
    largest = min(chunk_rows, shard_rows)
    smallest = min(fewest, largest)
    candidates = range(largest, smallest - 1, -1)

    def padding(chunk: int) -> int:
        return sum(-n % chunk for n in rows)

    fitting = [c for c in candidates if padding(c) <= 0.01 * sum(rows)]
    chunk = fitting[0] if fitting else min(candidates, key=lambda c: (padding(c), -c))
    shard = min(max(1, shard_rows // chunk), -(-max(rows) // chunk)) * chunk
    return dataclasses.replace(cfg, chunk_size=chunk, shard_size=shard)


def token_row_bytes(cfg: CacheConfig, seq_len: int, outputs: int) -> int:
    """Bytes one window takes in a token cache: ids, mask and segments (9 bytes per position),
    and per position the logits mode's arrays (topk:K: K ids, K logits and a float32 tail
    pair; sample:K: K ids; topk:K+sample:M: both; dense: every output in the cache dtype)."""
    itemsize = np.dtype(cfg.dtype).itemsize
    mode = parse_mode(cfg.logits)
    per = 9
    if mode.has_topk:
        per += mode.k * (np.dtype(classes_dtype(outputs)).itemsize + itemsize) + 8
    if mode.has_draws:
        per += mode.draws * np.dtype(classes_dtype(outputs)).itemsize
    if not mode.sparse:
        per += outputs * itemsize
    return seq_len * per


def plan(cfg: CacheConfig, dataset: Dataset, spec: TeacherSpec, shapes: dict[str, tuple],
         num_params: int, text: dict | None = None) -> dict[str, Any]:
    """The manifest of the cache these inputs define, before any shard is computed.

    ``key`` hashes everything that determines the cached bytes; two builds with the same key
    produce identical caches, and a cache is only ever resumed by a build with its own key.
    ``text`` (a text teacher's, :func:`describe_teacher`): the tokenizer's record and every
    split's token ids' sha256, both in the key.
    """
    mode = parse_mode(cfg.logits)
    check_mode(mode, spec.num_classes)
    lm = (text or {}).get("lm")
    version = fmt.TOKEN_FORMAT if lm else fmt.version_for(cfg.views, mode.sparse)
    splits = {}
    for name, split in dataset.splits.items():
        n = len(split)
        splits[name] = {"rows": n, "shards": -(-n // cfg.shard_size)}
        if version >= 2:  # only the train split is augmented: val and test are scored on view 0
            splits[name]["views"] = cfg.views if name == "train" else 1
    identity = {
        "teacher_fingerprint": spec.fingerprint,
        "dataset_fingerprint": dataset.fingerprint,
        "preprocessing": dataset.preprocessing,
        "layers": list(spec.layers), "pool": spec.pool,
        "dtype": cfg.dtype, "shard_size": cfg.shard_size, "chunk_size": cfg.chunk_size,
        "compression": cfg.compression, "views": cfg.views, "format_version": version,
    }
    logits = mode.record(spec.num_classes, cfg.seed, cfg.temperature)
    if mode.sparse:  # dense caches keep the keys they had before sparse modes existed
        identity["logits"] = logits
    if lm is not None:
        identity["lm"] = lm
        identity["logits"] = logits
    elif text is not None:  # array caches keep the keys they had before text existed
        identity["tokenizer"] = text["tokenizer"]
        identity["token_ids"] = {split: t["sha256"] for split, t in text["tokens"].items()}
    augment = None
    if cfg.views > 1:
        policy = parse(cfg.augment, dataset.input_shape)
        augment = {"policy": policy.spec, "params": list(policy.columns), "seed": cfg.seed,
                   "rng": RNG, "dtype": fmt.AUGMENT_DTYPE}
        identity["augment"] = augment
    # what reopens the data; not decoders, how this machine decodes it (whoever reopens the data
    # decides that for its own cores: auto)
    data_cfg = {f: getattr(cfg, f) for f in DataConfig.__dataclass_fields__ if f != "decoders"}
    manifest = {
        "format": fmt.FORMAT, "format_version": version,
        "status": "building", "key": fingerprint(identity),
        "created": now(),
        "teacher": {"arch": spec.arch, "ckpt": spec.ckpt, "seed": spec.seed if spec.ckpt == "random" else None,
                    "fingerprint": spec.fingerprint, "num_params": num_params,
                    "input_shape": list(spec.input_shape), "num_classes": spec.num_classes},
        "dataset": {**dataset.describe(), "fingerprint": dataset.fingerprint, "config": data_cfg},
        "preprocessing": dataset.preprocessing,
        "temperature": cfg.temperature, "views": cfg.views, "dtype": cfg.dtype,
        "shard_size": cfg.shard_size, "chunk_size": cfg.chunk_size,
        "compression": cfg.compression, "codecs": codec_names(cfg.compression),
        "layers": {name: list(shape) for name, shape in shapes.items() if name != "logits"},
        "num_classes": spec.num_classes, "pool": spec.pool,
        "splits": splits,
        "versions": versions(),
    }
    if augment is not None:
        manifest["augment"] = augment
    if mode.sparse or lm is not None:
        manifest["logits"] = logits
    if lm is not None:
        import importlib.metadata

        manifest["versions"].update({name: importlib.metadata.version(name)
                                     for name in ("transformers", "tokenizers")})
        manifest["teacher"]["gguf_file"] = spec.gguf_file
        manifest["tokenizer"] = lm["tokenizer"]
        manifest["lm"] = lm
    elif text is not None:
        import importlib.metadata

        manifest["versions"].update({name: importlib.metadata.version(name)
                                     for name in ("transformers", "tokenizers")})
        manifest["teacher"]["max_length"] = spec.max_length
        manifest["tokenizer"] = text["tokenizer"]
        manifest["tokens"] = text["tokens"]
    return manifest


def teacher_params(model: torch.nn.Module) -> int:
    if isinstance(model, OnnxTeacher):  # its initializers
        return model.num_params
    return sum(p.numel() for p in model.parameters())


def probe(model: torch.nn.Module, dataset: Dataset, arch: str = "teacher") -> tuple[dict[str, tuple[int, ...]], bool]:
    """Per-sample output shapes, and whether every output is finite, from one forward pass on
    two real training rows (so bad weights, or a model that does not take these inputs, fail
    before anything is written)."""
    rows = dataset.inputs("train", 0, min(2, len(dataset.splits["train"])))
    if isinstance(model, HfTeacher):  # documents: tokenized by the teacher
        batch = model.encode(rows)
        with torch.inference_mode():
            logits, feats = model(torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"]))
        return _shapes(logits, feats)
    x = torch.from_numpy(rows)
    with torch.inference_mode():
        logits, feats = plugins.call(f"teacher {arch} on inputs shaped {tuple(x.shape[1:])}", model, x)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise KdError(f"teacher {arch} returned {type(logits).__name__}"
                      f"{' shaped ' + str(tuple(logits.shape)) if isinstance(logits, torch.Tensor) else ''}; "
                      "a teacher's forward returns the logits, one tensor [batch, classes]")
    return _shapes(logits, feats)


def _shapes(logits: torch.Tensor, feats: dict[str, torch.Tensor]) -> tuple[dict[str, tuple[int, ...]], bool]:
    shapes = {"logits": tuple(logits.shape[1:])}
    shapes.update({name: tuple(f.shape[1:]) for name, f in feats.items()})
    finite = all(bool(torch.isfinite(t).all()) for t in (logits, *feats.values()))
    return shapes, finite

def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    import dask
    import sklearn
    import torchvision
    import zarr

    return {"kdcache": pipeline.__version__, "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "zarr": zarr.__version__, "pyarrow": pa.__version__, "numpy": np.__version__,
            "dask": dask.__version__, "scikit-learn": sklearn.__version__}


def describe_teacher(cfg: CacheConfig, dataset: Dataset, arch: str,
                     ckpt: str) -> tuple[TeacherSpec, dict[str, tuple[int, ...]], int, dict | None]:
    """Build the teacher once here (on the CPU) to fingerprint its weights and learn the tapped
    layers' shapes. Returns (spec for the workers, per-sample output shapes, parameters, and
    for a text teacher its tokenization: :func:`tokenization`). Weights that emit NaN/inf, or
    logits of the wrong width, are refused before anything is written."""
    device = runtime.pick_device(cfg.device)
    if getattr(dataset, "modality", "array") == "tokens":
        return describe_lm(cfg, dataset, arch, ckpt, device)
    text = is_text_teacher(arch)
    spec = TeacherSpec(arch, dataset.input_shape, dataset.num_classes, ckpt, cfg.seed,
                       device=str(device), compile=cfg.compile, pool=cfg.pool,
                       max_length=cfg.max_length if text else None)
    model = build_teacher(spec)
    expected = model.expected_preprocessing if isinstance(model, OnnxTeacher) else None
    if expected is not None and expected != dataset.preprocessing:
        raise KdError(f"teacher {ckpt} expects inputs normalised with mean {expected.get('mean')} and "
                      f"std {expected.get('std')}, but {dataset.spec} is normalised with mean "
                      f"{dataset.preprocessing['mean']} and std {dataset.preprocessing['std']}; "
                      "cache it on the data it was trained on")
    # layers=none: the logits only (a model with no recognisable penultimate layer still caches)
    layers = () if cfg.layers == ("none",) else cfg.layers or default_layers(model)
    shapes, finite = probe(tap(model, layers, cfg.pool, arch), dataset, arch)
    if not finite:
        raise KdError(f"teacher {arch} produced NaN/inf outputs on the first training rows; check "
                      f"the checkpoint {ckpt} and the inputs")
    if shapes["logits"] != (dataset.num_classes,):
        raise KdError(f"teacher {arch} outputs {shapes['logits']} logits but {dataset.spec} has "
                      f"{dataset.num_classes} classes; use a checkpoint trained on this dataset")
    spec = dataclasses.replace(spec, layers=tuple(layers), fingerprint=state_fingerprint(
        model, arch, dataset.input_shape, dataset.num_classes))
    return spec, shapes, teacher_params(model), tokenization(model, dataset) if text else None


def check_token_teacher(arch: str, dataset: Dataset, gguf_file: str = "") -> None:
    """Refuse, before any model is built, a teacher that cannot cache a token dataset: one that
    is not ``hf:`` (it does not read token ids), or an ``hf:`` directory that holds no causal LM
    (an encoder would otherwise be built as a text teacher, and refused for reading text)."""
    if getattr(dataset, "modality", "array") != "tokens":
        return
    if not is_text_teacher(arch):
        raise KdError(f"teacher {arch} does not read token ids; a token dataset ({dataset.spec}) "
                      "is cached by a causal language model: teacher=hf:DIR")
    if not is_causal_lm(arch.split(":", 1)[1], gguf_file):  # a GGUF file: its header's architecture
        raise KdError(f"teacher {arch}{' ' + gguf_file if gguf_file else ''} is not a causal language "
                      "model (it has no next-token head); a token dataset is cached by one: pass "
                      "teacher=hf:DIR of a causal LM")


def describe_lm(cfg: CacheConfig, dataset: Dataset, arch: str, ckpt: str,
                device) -> tuple[TeacherSpec, dict[str, tuple[int, ...]], int, dict]:
    """:func:`describe_teacher` for a token dataset: the teacher must be a causal LM
    (``hf:DIR``) whose tokenizer maps text to the same ids as the dataset's, its logits must be
    finite on two real windows, and ``logits=dense`` is refused above
    :data:`MAX_DENSE_OUTPUTS` outputs. Returns the spec, ``{"logits": (vocabulary,), "tokens":
    (seq_len,)}``, the parameters, and ``{"lm": ...}``, the manifest's ``lm`` entry."""
    check_token_teacher(arch, dataset, cfg.gguf_file)
    seq_len = int(dataset.input_shape[0])
    spec = TeacherSpec(arch, dataset.input_shape, dataset.num_classes, ckpt, cfg.seed,
                       device=str(device), compile=cfg.compile, pool=cfg.pool, gguf_file=cfg.gguf_file)
    model = build_teacher(spec)
    if not isinstance(model, HfCausalLM):
        raise KdError(f"teacher {arch} is not a causal language model (it has no next-token head); "
                      f"a token dataset is cached by one: pass teacher=hf:DIR of a causal LM")
    if cfg.layers and cfg.layers != ("none",):
        model.tapped(cfg.layers)  # refused: per-token logits only
    mode = parse_mode(cfg.logits)
    if not mode.sparse and model.vocab_size > MAX_DENSE_OUTPUTS:
        raise KdError(f"logits=dense would store all {model.vocab_size:,} outputs at every position "
                      f"({model.vocab_size * np.dtype(cfg.dtype).itemsize:,} bytes per token); above "
                      f"{MAX_DENSE_OUTPUTS:,} outputs use logits=topk:K or sample:K (e.g. topk:32)")
    record, own = dataset_tokenizer_record(dataset), model.tokenizer_record
    if record is not None and not same_vocabulary(record, own):
        raise KdError(f"teacher {arch}'s tokenizer ({model.vocab_size:,} ids) is not the one "
                      f"{dataset.spec} was tokenized with ({record['vocab_size']:,} ids, another "
                      "vocabulary or merges); tokenize the data with the teacher's tokenizer "
                      f"(tokenizer={model.tokenizer_path})")
    if record is not None and record.get("fingerprint") != own["fingerprint"]:
        raise KdError(f"teacher {arch}'s tokenizer has the data's vocabulary but ends documents or "
                      f"pads otherwise (EOS {own.get('eos_id')} vs {record.get('eos_id')}, padding "
                      f"{own.get('pad_id')} vs {record.get('pad_id')}); tokenize the data with the "
                      f"teacher's tokenizer (tokenizer={model.tokenizer_path})")
    windows = dataset.windows("train", 0, min(2, len(dataset.splits["train"])))
    with torch.inference_mode():
        logits = model(torch.from_numpy(np.asarray(windows["ids"], np.int64)),
                       torch.from_numpy((np.asarray(windows["segments"]) >= 0).astype(np.int64)))
    if not bool(torch.isfinite(logits).all()):
        raise KdError(f"teacher {arch} produced NaN/inf logits on the first training windows; "
                      f"check the model in {model.directory}")
    spec = dataclasses.replace(spec, layers=(), fingerprint=state_fingerprint(
        model, arch, dataset.input_shape, dataset.num_classes))
    lm = {"tokenizer": model.tokenizer_record, **model.vocabulary, "seq_len": seq_len,
          "pack": bool(dataset_pack(dataset)), "target": "position j holds the distribution of token j+1",
          "attention": "causal over the whole window"}
    return spec, {"logits": (model.vocab_size,), "tokens": (seq_len,)}, teacher_params(model), {"lm": lm}


def dataset_tokenizer_record(dataset: Dataset) -> dict | None:
    """The record (:func:`pipeline.data.tokens.tokenizer_record`) of the tokenizer a token dataset was
    tokenized with: the dataset's own ``tokenizer_record`` when it has one, else read from its
    ``tokenizer=DIR`` (or ``.gguf`` file); None when neither is known."""
    record = getattr(dataset, "tokenizer_record", None)
    if isinstance(record, dict):
        return record
    folder = getattr(dataset.cfg, "tokenizer", "") or getattr(dataset, "tokenizer_dir", "")
    if not folder:
        return None
    return tokenizer_record(load_tokenizer(folder), Path(folder))


def dataset_pack(dataset: Dataset) -> bool:
    """Whether a token dataset packs documents into windows (``pack=true``)."""
    pack = getattr(dataset, "pack", None)
    return bool(getattr(dataset.cfg, "pack", True) if pack is None else pack)


def tokenization(model: HfTeacher, dataset: Dataset) -> dict:
    """How a text teacher tokenizes this dataset: ``{"tokenizer": its record, "tokens": {split:
    {"sha256", "tokens", "truncated", "max_tokens"}}}``, the sha256 of every row's token ids in
    row order (:func:`pipeline.tokens.update_hash`), their count, the rows truncation cut and
    the longest row. Reads every document once, in blocks (memory flat in the rows)."""
    out = {}
    for split, rows in dataset.splits.items():
        h, total, truncated, longest = hashlib.sha256(), 0, 0, 0
        for a in range(0, len(rows), BLOCK):
            ids, cut = model.tokenize(dataset.inputs(split, a, min(a + BLOCK, len(rows))))
            tokens.update_hash(h, ids)
            total += sum(len(r) for r in ids)
            truncated += int(cut.sum())
            longest = max([longest, *(len(r) for r in ids)])
        out[split] = {"sha256": h.hexdigest(), "tokens": total, "truncated": truncated,
                      "max_tokens": longest}
    return {"tokenizer": model.tokenizer_record, "tokens": out}


def prepare(cfg: CacheConfig, dataset: Dataset, arch: str,
            ckpt: str) -> tuple[CacheConfig, TeacherSpec, dict[str, Any]]:
    """Everything a build needs before its first shard: the teacher described (fingerprint,
    output shapes), the layout resolved for them and the manifest planned. Returns the
    resolved config (saved with the cache), the teacher's spec and the manifest."""
    spec, shapes, num_params, text = describe_teacher(cfg, dataset, arch, ckpt)
    cfg = resolve_layout(cfg, dataset, shapes)  # chunk_size=0 (auto) made concrete, saved as such
    shapes = {name: shape for name, shape in shapes.items() if name != "tokens"}
    return cfg, spec, plan(cfg, dataset, spec, shapes, num_params, text)


def teacher_cost(spec: TeacherSpec, dataset: Dataset) -> dict[str, Any]:
    """What deploying the teacher costs, measured once, when its cache is created (students
    compare themselves with it and never load it): the bytes of its weights saved as
    safetensors, and its CPU latency per sample at batch 1 and 256 (:mod:`pipeline.latency`),
    on real training rows. A text teacher is timed from the documents' text, tokenization
    included (a text student's time includes its own text processing too)."""
    from safetensors.torch import save

    model = build_teacher(dataclasses.replace(spec, device="cpu", compile=False))
    # a tensor held under two names (tied embeddings; a causal LM's body is also its model's
    # submodule) is saved once, as save_pretrained does: SmolLM2 counted 1,189 MB, not 538
    state, seen = {}, set()
    for k, v in model.state_dict().items():
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            state[k] = v.detach().contiguous().clone()
    rows = dataset.inputs("train", 0, min(256, len(dataset.splits["train"])))
    size = model.weights_bytes if isinstance(model, OnnxTeacher) else len(save(state))
    if isinstance(model, HfCausalLM):  # per window of seq_len tokens; 256 windows would take minutes
        rows = dataset.inputs("train", 0, min(WINDOW_BATCHES[-1], len(dataset.splits["train"])))
        return {"weights_bytes": size, "latency": {
            **per_sample_ms(model.predict, rows, WINDOW_BATCHES), "per": "window"}}
    predict = model.predict if isinstance(model, HfTeacher) else torch_predict(model)
    return {"weights_bytes": size, "latency": per_sample_ms(predict, rows)}


