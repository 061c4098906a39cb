"""Hugging Face teachers over text: ``teacher=hf:PATH``.

PATH is a local model directory (``config.json``, the weights and the tokenizer's files, as
``save_pretrained`` writes them), or a model name found in the local Hugging Face cache. kdcache
never downloads: a model that is not on this machine is refused naming the command that fetches
it. :class:`HfTeacher` holds

- the tokenizer (``AutoTokenizer``): documents are truncated to ``max_length`` tokens on the
  tokenizer's truncation side, and a batch is padded to its longest row on its padding side;
- the encoder (``AutoModel``: BERT, MiniLM, RoBERTa, DeBERTa, ...), loaded in float32;
- a classification head ``nn.Linear(hidden, num_classes)`` on the masked mean of the last
  hidden layer's token states (``mean.-1``). ``kdcache teacher`` trains it
  (pipeline.teacher_training); ``teacher_ckpt=random`` is a seeded random head.

**Feature layers** (``layers=``), each one vector of the encoder's width per document:

- ``mean.N``: the mean of hidden layer N's token states over the document's real tokens
  (padding masked out);
- ``cls.N``: hidden layer N's state of the document's first token (``[CLS]`` for BERT-style
  tokenizers, ``<s>`` for RoBERTa).

N counts hidden layers as transformers does: 0 is the embeddings' output, 1..L the L
transformer layers, and negative N counts from the last (``-1`` is layer L). The default is
``mean.-1``, the feature the head reads.

**Fingerprints.** :attr:`HfTeacher.tokenizer_record` describes how documents become ids: the
tokenizer's serialised backend (vocabulary, merges, normaliser, pre-tokeniser, post-processor;
or the bytes of its vocabulary files for a tokenizer without one), its special tokens,
``len(tokenizer)``, ``max_length``, the truncation and the padding side; its sha256 is the
tokenizer fingerprint, part of the teacher fingerprint (pipeline.teachers.state_fingerprint).
:attr:`HfTeacher.base_fingerprint` names the model directory's encoder weights and tokenizer:
a trained head records it, and is refused on any other model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from pipeline import runtime, tokens
from pipeline.errors import KdError, first_line

DEFAULT_MAX_LENGTH = 128
POOLINGS = ("mean", "cls")
HEAD_LAYER = "mean.-1"  # what the classification head reads, and the default feature tap
DEFAULT_LAYERS = (HEAD_LAYER,)
FINETUNES = ("head", "full")
# keys of a trained teacher's safetensors metadata (strings only)
META_KIND = "kdcache.hf.finetune"  # head: the head's tensors only; full: every tensor
META_BASE = "kdcache.hf.base"  # base_fingerprint of the model directory it was trained from
META_MODEL = "kdcache.hf.model"  # the model name or directory, for the message only


def fetch_command(name: str) -> str:
    """The command that puts model ``name`` into the local Hugging Face cache (with internet)."""
    return f"python -c \"from huggingface_hub import snapshot_download; snapshot_download('{name}')\""


def resolve_model(name: str, gguf_file: str = "") -> Path:
    """The local directory of model ``name``: a directory as given, or a name found in the local
    Hugging Face cache (offline, never downloading). Refused in one line otherwise. With
    ``gguf_file``, the directory holds that GGUF file (weights, config and tokenizer in one)
    in place of config.json."""
    if not name:
        raise KdError("teacher=hf: needs a model: teacher=hf:DIR (a Hugging Face model directory) or "
                      "hf:NAME (a model in the local Hugging Face cache)")
    path = Path(name).expanduser()
    if path.is_dir():
        if gguf_file:
            if not (path / gguf_file).is_file():
                found = sorted(p.name for p in path.glob("*.gguf"))
                raise KdError(f"{path} holds no GGUF file {gguf_file!r}"
                              f"{' (it holds ' + ', '.join(found[:3]) + ')' if found else ''}; pass "
                              "gguf_file=NAME of a .gguf file in that directory")
            return path.resolve()
        if not (path / "config.json").is_file():
            raise KdError(f"{path} is not a Hugging Face model directory (no config.json); pass "
                          "teacher=hf:DIR to a folder written by save_pretrained")
        return path.resolve()
    if path.exists():
        raise KdError(f"teacher=hf:{name} is a file, not a model directory; pass teacher=hf:DIR")
    # a hub name is NAME or ORG/NAME; anything else that is not there is a missing directory
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep in name.replace("/", ""):
        raise KdError(f"no model directory at {name}; pass teacher=hf:DIR to a folder written by "
                      "save_pretrained, or hf:NAME of a model in the local Hugging Face cache")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not cached, or not a valid model name: the same advice either way
        pass
    raise KdError(f"model {name!r} is neither a local directory nor in the local Hugging Face cache, "
                  f"and kdcache never downloads; fetch it once with internet: {fetch_command(name)}, "
                  "or pass teacher=hf:DIR to a model directory")


@contextlib.contextmanager
def _quiet(gguf: bool = False) -> Iterator[None]:
    """transformers and huggingface_hub silenced while a model loads (progress bars, notes on
    unused weights such as a pooler): kdcache prints what matters in its own words. The hub's
    offline flag is set too, so that nothing is ever fetched (it is read once, at import).
    ``gguf``: also the bar transformers draws with plain tqdm, outside its logging settings,
    while it dequantises a GGUF file's tensors ("Converting and de-quantizing GGUF tensors")."""
    import huggingface_hub.constants as hub
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    offline, hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE, True
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    converter = bar = None
    if gguf:
        import functools

        try:  # where transformers (5.25 here) draws it; elsewhere the bar is left as it is
            from transformers import modeling_gguf_pytorch_utils as converter
        except ImportError:
            converter = None
        bar = getattr(converter, "tqdm", None)
        if bar is not None:
            converter.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            converter.tqdm = bar
        hub.HF_HUB_OFFLINE = offline
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _transformers():
    try:
        import transformers
    except ImportError:
        raise KdError("teacher=hf:... needs transformers, not installed here; pip install "
                      "'kdcache[text]'") from None
    return transformers


GGUF_SUFFIX = ".gguf"


def load_tokenizer(directory: str | Path, key: str = "tokenizer"):
    """The Hugging Face tokenizer saved in ``directory`` (by ``save_pretrained``), or held in a
    GGUF file (``directory`` is then the ``.gguf`` file itself: its vocabulary, merges and special
    tokens, as ``AutoTokenizer.from_pretrained(DIR, gguf_file=NAME)`` reads them), loaded
    offline; refused in one line, naming ``key=`` (the setting that gave the path), when there
    is none there."""
    transformers = _transformers()
    path = Path(directory).expanduser()
    if path.suffix.lower() == GGUF_SUFFIX and path.is_file():
        with _quiet():
            try:
                return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name,
                                                                  local_files_only=True)
            except Exception as exc:
                raise KdError(f"{key}={directory} cannot be loaded as a GGUF file's tokenizer "
                              f"({type(exc).__name__}: {first_line(exc, 120)}); pass a .gguf file "
                              "holding a tokenizer (reading one needs pip install gguf), or a "
                              "tokenizer folder written by save_pretrained") from None
    if not path.is_dir():
        raise KdError(f"{key}={directory}: no such folder; pass {key}=DIR, a folder holding a "
                      "tokenizer written by save_pretrained (tokenizer.json or tokenizer_config.json), "
                      "or a .gguf file")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise KdError(f"{key}={directory} is not a Hugging Face tokenizer folder (no tokenizer.json "
                      "or tokenizer_config.json); pass the folder save_pretrained wrote it to")
    with _quiet():
        try:
            return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:
            raise KdError(f"{key}={directory} cannot be loaded as a tokenizer ({type(exc).__name__}: "
                          f"{first_line(exc, 120)}); pass a folder written by save_pretrained") from None


def tokenizer_source(tok, directory: Path | None = None) -> dict[str, Any]:
    """What makes a tokenizer turn text into the ids it does, whatever settings it is called
    with: its class, the sha256 of its serialised backend (vocabulary, merges, normaliser,
    pre-tokeniser, post-processor; less the truncation and padding calls set on it) or, for a
    tokenizer without one, of its vocabulary files in ``directory``, ``len(tokenizer)``, its
    special tokens and its normaliser. The part of :attr:`HfTeacher.tokenizer_record` and of a
    token dataset's record (pipeline.data.tokens) that is the tokenizer itself."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        # the serialised backend, less the truncation and padding that calling the
        # tokenizer sets on it (they are recorded beside it as the settings kdcache uses)
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        source = json.dumps(state, sort_keys=True)
        normalizer = str(backend.normalizer)
    else:  # a tokenizer without a Rust backend: the bytes of its vocabulary files
        h = hashlib.sha256()
        for file in sorted(getattr(tok, "vocab_files_names", {}).values()):
            if directory is not None and (Path(directory) / file).is_file():
                h.update(file.encode() + b"\0" + (Path(directory) / file).read_bytes())
        source, normalizer = h.hexdigest(), "n/a"
    return {"class": type(tok).__name__,
            "backend_sha256": hashlib.sha256(source.encode()).hexdigest(),
            "vocab_size": len(tok),
            "special_tokens": {k: str(v) for k, v in sorted(tok.special_tokens_map.items())},
            "normalizer": normalizer}


def parse_layer(name: str, hidden_layers: int) -> tuple[str, int]:
    """``("mean" | "cls", index into hidden_states)`` of a layer name such as ``mean.-1``."""
    pooling, _, number = name.partition(".")
    try:
        n = int(number)
    except ValueError:
        n = None
    if pooling not in POOLINGS or n is None or not -(hidden_layers + 1) <= n <= hidden_layers:
        raise KdError(f"layer {name!r} is not a layer of this text teacher; name one as POOLING.N "
                      f"with POOLING mean or cls and N in -{hidden_layers + 1}..{hidden_layers} (0: "
                      f"the embeddings, -1: the last of its {hidden_layers} layers), e.g. mean.-1,cls.-1")
    return pooling, n % (hidden_layers + 1)


def _tensor_digest(h, state: dict[str, torch.Tensor]) -> None:
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


PREDICT_BUCKET = 64  # documents per forward when a deployed teacher predicts a large batch


class HfTeacher(nn.Module):
    """A Hugging Face encoder with a classification head, over documents (``str``).

    ``encode(texts)`` tokenizes a batch; ``forward(input_ids, attention_mask)`` returns
    ``(logits [B, C], {layer: features [B, hidden]})`` for the layers chosen with
    :meth:`tapped` (default ``mean.-1``); ``predict(texts)`` does both, for timing."""

    modality = "text"

    def __init__(self, name: str, num_classes: int, max_length: int = DEFAULT_MAX_LENGTH):
        super().__init__()
        transformers = _transformers()
        self.name = name
        self.directory = resolve_model(name)
        with _quiet():
            try:
                config = transformers.AutoConfig.from_pretrained(self.directory, local_files_only=True)
                self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.directory, local_files_only=True)
            except Exception as exc:
                raise KdError(f"{self.directory} cannot be loaded as a Hugging Face model and tokenizer "
                              f"({type(exc).__name__}: {first_line(exc, 120)}); pass teacher=hf:DIR to "
                              "a folder written by save_pretrained, with its tokenizer's files") from None
            if getattr(config, "is_encoder_decoder", False):
                raise KdError(f"{self.directory} holds an encoder-decoder model ({config.model_type}); "
                              "teacher=hf: takes encoders (BERT, MiniLM, RoBERTa, DeBERTa, ...)")
            # the head first, from the caller's seeded RNG, whatever loading the encoder draws
            self.head = nn.Linear(int(config.hidden_size), int(num_classes))
            try:
                self.encoder = transformers.AutoModel.from_pretrained(
                    self.directory, config=config, local_files_only=True, dtype=torch.float32).eval()
            except Exception as exc:
                raise KdError(f"the weights in {self.directory} cannot be loaded "
                              f"({type(exc).__name__}: {first_line(exc, 120)}); pass teacher=hf:DIR "
                              "to a folder written by save_pretrained") from None
        positions = getattr(config, "max_position_embeddings", None)
        if max_length < 2 or (positions and max_length > positions):
            raise KdError(f"max_length={max_length} does not fit {name}: it takes 2.."
                          f"{positions or 'any'} tokens per document; pass max_length=N in that range")
        self.model_type = str(config.model_type)
        self.max_length = int(max_length)
        self.num_classes = int(num_classes)
        self.hidden_layers = int(config.num_hidden_layers)
        self.layers: tuple[str, ...] = DEFAULT_LAYERS
        pad = self.tokenizer.pad_token_id
        # tokenizers without a padding token (GPT-style) pad with any real id: the mask hides it
        self.pad_id = int(pad if pad is not None else self.tokenizer.eos_token_id or 0)
        # a fast tokenizer sets its truncation on its Rust backend at every call: threads that
        # tokenize at once (local dask workers share one teacher) must take turns
        self._tokenizing = threading.Lock()
        # now, while the encoder holds the directory's weights (finetune=full changes them)
        self.base_fingerprint = self._base()

    # ------------------------------------------------------------------ identity
    @property
    def tokenizer_record(self) -> dict[str, Any]:
        """How documents become ids: what the manifest records, and what a cache or a teacher
        compares (:func:`tokenizer_difference`). ``fingerprint`` hashes the rest."""
        tok = self.tokenizer
        record = {
            **tokenizer_source(tok, self.directory),
            "max_length": self.max_length,
            "truncation": tok.truncation_side,
            "padding_side": tok.padding_side,
            "pad_id": self.pad_id,
        }
        return {**record, "fingerprint": hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()}

    @property
    def tokenizer_fingerprint(self) -> str:
        """sha256 of :attr:`tokenizer_record` (vocabulary, special tokens, normaliser,
        max_length, truncation and padding side)."""
        return self.tokenizer_record["fingerprint"]

    def _base(self) -> str:
        """``base_fingerprint``: sha256 of the model directory's encoder (every tensor) and
        tokenizer (its backend and special tokens, not the settings kdcache chooses), what a
        trained head or model was trained from; taken when the directory is loaded."""
        h = hashlib.sha256(repr(("hf-base", self.model_type)).encode())
        record = self.tokenizer_record
        h.update(repr((record["backend_sha256"], record["vocab_size"], record["special_tokens"])).encode())
        _tensor_digest(h, self.encoder.state_dict())
        return h.hexdigest()

    def fingerprint_identity(self) -> dict[str, Any]:
        """What :func:`pipeline.teachers.state_fingerprint` hashes besides the tensors: the
        model type, the tokenizer fingerprint and transformers' version, not the directory's
        path (the same model elsewhere is the same teacher)."""
        import transformers

        return {"family": "hf", "model_type": self.model_type, "tokenizer": self.tokenizer_fingerprint,
                "transformers": transformers.__version__}

    # ------------------------------------------------------------------ layers
    def layer_names(self) -> list[str]:
        return [f"{p}.{n}" for p in POOLINGS for n in range(self.hidden_layers + 1)]

    def tapped(self, layers: tuple[str, ...]) -> "HfTeacher":
        """This teacher, returning the features of ``layers`` (checked) from its forward."""
        for name in layers:
            parse_layer(name, self.hidden_layers)
        self.layers = tuple(layers)
        return self

    # ------------------------------------------------------------------ tokens
    def tokenize(self, texts) -> tuple[list[list[int]], np.ndarray]:
        """``(ids per document, truncated)``: each document's token ids (special tokens added,
        truncated to ``max_length``, unpadded), and whether truncation cut it."""
        texts = [str(t) for t in texts]
        with self._tokenizing:
            rows = self.tokenizer(texts, truncation=True, max_length=self.max_length,
                                  verbose=False)["input_ids"]
            truncated = np.zeros(len(rows), dtype=bool)
            full = [i for i, ids in enumerate(rows) if len(ids) >= self.max_length]
            if full:  # only a document that reached the limit may have been cut: one token more says
                longer = self.tokenizer([texts[i] for i in full], truncation=True,
                                        max_length=self.max_length + 1, verbose=False)["input_ids"]
                truncated[full] = [len(ids) > self.max_length for ids in longer]
        return [list(ids) for ids in rows], truncated

    def pad(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        """``{"input_ids", "attention_mask"}`` int64 [B, longest row], padded on the
        tokenizer's padding side."""
        ids, mask = tokens.pad(rows, self.pad_id, self.tokenizer.padding_side)
        return {"input_ids": ids, "attention_mask": mask}

    def encode(self, texts) -> dict[str, np.ndarray]:
        """A batch of documents as ``{"input_ids", "attention_mask"}`` (int64 numpy arrays):
        truncated to ``max_length``, padded to the batch's longest row."""
        return self.pad(self.tokenize(texts)[0])

    # ------------------------------------------------------------------ forward
    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """``{layer: [B, hidden] float32}`` for ``layers`` (see the module's docstring)."""
        parsed = {name: parse_layer(name, self.hidden_layers) for name in layers}
        last = self.hidden_layers
        hidden = any(n != last for _, n in parsed.values())
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                           output_hidden_states=hidden)
        states = out.hidden_states if hidden else {last: out.last_hidden_state}
        mask = attention_mask.unsqueeze(-1).float()
        count = mask.sum(1).clamp(min=1.0)
        first = attention_mask.long().argmax(1)  # the first real token, whichever side pads
        feats = {}
        for name, (pooling, n) in parsed.items():
            h = states[n].float()  # pooled in float32, also under autocast
            if pooling == "mean":
                feats[name] = (h * mask).sum(1) / count
            else:
                feats[name] = h[torch.arange(h.shape[0], device=h.device), first]
        return feats

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(logits [B, C], {layer: features [B, hidden]})`` of a tokenized batch."""
        feats = self.pooled(input_ids, attention_mask, tuple(dict.fromkeys((HEAD_LAYER, *self.layers))))
        logits = self.head(feats[HEAD_LAYER].to(self.head.weight.dtype))
        return logits, {name: feats[name] for name in self.layers}

    def predict(self, texts) -> np.ndarray:
        """Logits [B, C] (float32, on the CPU) of a batch of documents, from their text:
        tokenization included, as a deployed teacher would run (its cost is timed this way).
        A large batch runs in length buckets of :data:`PREDICT_BUCKET` documents, as the cache
        build does, so the teacher is timed at its best, not padded to its longest document."""
        return run_bucketed(self, np.asarray(texts, dtype=object), PREDICT_BUCKET,
                            self.head.weight.device)

    # ------------------------------------------------------------------ weights
    def load_checkpoint(self, path: str | Path) -> "HfTeacher":
        """Load a checkpoint ``kdcache teacher`` wrote for this model: the head's tensors
        (``finetune=head``; the encoder stays the model directory's) or every tensor
        (``finetune=full``). Refused when it records another model directory's encoder or
        tokenizer, or none (it was not written by kdcache for an hf: teacher)."""
        path = Path(path)
        if not path.is_file():
            raise KdError(f"teacher checkpoint {path} does not exist; pass teacher_ckpt=PATH to a "
                          "checkpoint `kdcache teacher teacher=hf:DIR` wrote, or random")
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise KdError(f"teacher checkpoint {path} is not a safetensors file ({type(exc).__name__}); "
                          "an hf: teacher loads the model.safetensors `kdcache teacher` wrote") from None
        kind = meta.get(META_KIND)
        if kind not in FINETUNES:
            raise KdError(f"teacher checkpoint {path} records no model it was trained on (not written "
                          f"by kdcache for an hf: teacher); train one with kdcache teacher "
                          f"teacher=hf:{self.name}, or pass teacher_ckpt=random")
        if meta.get(META_BASE) != self.base_fingerprint:
            raise KdError(f"teacher checkpoint {path} was trained on another model ({meta.get(META_MODEL)}, "
                          f"encoder and tokenizer {str(meta.get(META_BASE))[:12]}; {self.name} is "
                          f"{self.base_fingerprint[:12]}); pass the teacher=hf: it was trained on, or "
                          "train a head for this one with kdcache teacher")
        own = self.state_dict() if kind == "full" else {k: v for k, v in self.state_dict().items()
                                                         if k.startswith("head.")}
        wrong = sorted(k for k in own if k not in state or state[k].shape != own[k].shape)
        if wrong or set(state) - set(own):
            other = state.get("head.bias")
            if other is not None and other.ndim == 1 and other.shape[0] != self.num_classes:
                raise KdError(f"checkpoint {path} holds a head for {other.shape[0]} classes, but the "
                              f"data has {self.num_classes}; it was trained on other data: pass a "
                              "checkpoint trained on this dataset, or omit teacher_ckpt to train one")
            raise KdError(f"checkpoint {path} does not fit teacher hf:{self.name} "
                          f"({', '.join((wrong or sorted(set(state) - set(own)))[:3])}); train one "
                          "with kdcache teacher")
        self.load_state_dict(state, strict=kind == "full")
        return self

    def checkpoint(self, finetune: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """``(tensors, metadata)`` of a trained teacher's safetensors file (see
        :meth:`load_checkpoint`): the head's tensors only for ``finetune=head``."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                 if finetune == "full" or k.startswith("head.")}
        return state, {META_KIND: finetune, META_BASE: self.base_fingerprint, META_MODEL: self.name}


def tokenizer_difference(old: dict, new: dict) -> str | None:
    """What differs between two :attr:`HfTeacher.tokenizer_record` s, in words (None: nothing),
    e.g. ``max_length 128 vs 64`` or ``vocabulary 30,522 vs 200 tokens``."""
    if old.get("fingerprint") == new.get("fingerprint"):
        return None
    for key, words in (("max_length", "max_length"), ("truncation", "truncation side"),
                       ("padding_side", "padding side"), ("vocab_size", "vocabulary"),
                       ("special_tokens", "special tokens"), ("normalizer", "normaliser"),
                       ("class", "tokenizer class"), ("pad_id", "padding id")):
        if old.get(key) != new.get(key):
            a, b = old.get(key), new.get(key)
            if key == "vocab_size":
                return f"vocabulary {a:,} vs {b:,} tokens"
            return f"{words} {a} vs {b}"
    return "vocabulary or merges (the tokenizer's files differ)"


# =========================================================================== batches of text

def bucketed(model: HfTeacher, texts: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, dict]]:
    """``(rows, batch)`` over ``texts`` in length buckets (:func:`pipeline.tokens.buckets`):
    each batch's row positions and its ``encode``-style arrays."""
    rows, _ = model.tokenize(texts)
    for at in tokens.buckets(np.array([len(r) for r in rows]), batch_size):
        yield at, model.pad([rows[i] for i in at])


def run_bucketed(model: HfTeacher, texts: np.ndarray, batch_size: int, device: torch.device,
                 layer: str | None = None) -> np.ndarray:
    """The logits [N, C] (or, given ``layer``, that layer's features [N, hidden]) of every
    document, float32, in their order: batches bucketed by length, run on ``device`` in
    inference mode (mixed precision on a GPU)."""
    out: np.ndarray | None = None
    with torch.inference_mode():
        for at, batch in bucketed(model, texts, batch_size):
            args = [runtime.to_device(torch.from_numpy(batch[k]), device)
                    for k in ("input_ids", "attention_mask")]
            with runtime.autocast(device, runtime.text_autocast_dtype(device)):
                value = model.pooled(*args, (layer,))[layer] if layer else model(*args)[0]
            value = value.float().cpu().numpy()
            if out is None:
                out = np.empty((len(texts), value.shape[1]), np.float32)
            out[at] = value
    return out if out is not None else np.zeros((0, 0), np.float32)


class TokenRows(nn.Module):
    """``teacher`` as a module of one float32 tensor ``[B, 2, L]`` (ids and mask, padded to a
    common L), so that the shared training loop (pipeline.training.fit), which moves float
    arrays, fine-tunes it whole: each batch is cut to its own longest row before the forward.
    Ids up to 2**24 are exact in float32."""

    def __init__(self, teacher: HfTeacher):
        super().__init__()
        self.teacher = teacher

    @staticmethod
    def pack(model: HfTeacher, texts: np.ndarray) -> np.ndarray:
        """Documents as the ``[N, 2, L]`` float32 rows this module takes (L: the longest)."""
        batch = model.encode(texts)
        if batch["input_ids"].size and batch["input_ids"].max() >= 2 ** 24:
            raise KdError(f"{model.name}'s vocabulary has ids beyond 2**24; finetune=full cannot "
                          "carry them as float32: use finetune=head")
        return np.stack([batch["input_ids"], batch["attention_mask"]], axis=1).astype(np.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[:, 0].long(), x[:, 1].long()
        keep = mask.bool().any(0)  # the batch's own longest row, whichever side pads
        return self.teacher(ids[:, keep], mask[:, keep])[0]
