"""Causal language models as teachers: ``teacher=hf:DIR`` whose config is a causal LM
(Llama, GPT-2, Qwen, SmolLM, ...), over a token dataset (``dataset=tokens:PATH``).

DIR is a local model directory (``save_pretrained``'s), a model in the local Hugging Face
cache, or a directory holding a GGUF file (``gguf_file=NAME``: weights, config and tokenizer
in one file, dequantised to float32 by transformers; needs the ``gguf`` package). Nothing is
ever downloaded. The model runs in float32, in inference mode (bfloat16 autocast on a GPU that
supports it).

**Loaded once per process.** Planning and building a cache ask for the teacher several times
(its checks, its fingerprint and shapes, its cost, the shards' forwards); dequantising a GGUF
file takes seconds to minutes (SmolLM2-135M: ~10 s here). The last model loaded is kept
(:func:`load_causal_lm`, keyed by its directory, GGUF file and their files' sizes and mtimes),
so one process loads it once; every :class:`HfCausalLM` of it shares those weights, read-only
(a teacher is only ever run in inference mode). Only the architecture is read where that is
all that is needed (:func:`is_causal_lm`: a GGUF file's header, not its tensors).

:class:`HfCausalLM` reads windows of token ids, not text: ``hidden(ids, mask)`` runs the
model's body once over a batch of windows ``[B, T]``, and ``logits(hidden)`` applies its
output layer to any set of positions, so that a cache build holds the logits of a chunk of
positions at a time, never ``[B, T, outputs]``. Position j's logits are the model's
prediction of token j + 1 (the causal LM's own convention: nothing is shifted here).

**Vocabulary.** ``vocab_size`` is ``len(tokenizer)``, the ids the tokenizer can produce;
``outputs`` the model's output layer's size. Padded vocabularies (Qwen2.5 3B: 151,936
outputs, 7B: 152,064, for one tokenizer) have ``outputs > vocab_size``: ids at or beyond
``vocab_size`` are never real tokens, so :meth:`logits` slices them away. A model with fewer
outputs than its tokenizer's ids is refused, naming both sizes.
"""

from __future__ import annotations

import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import runtime
from pipeline.errors import KdError, first_line
from pipeline.data.tokens import tokenizer_record
from pipeline.hf import _quiet, _transformers, resolve_model

PRETRAINED = "pretrained"  # teacher_ckpt of a causal LM: the directory's own weights
# float32 logits held at once per chunk of positions (64 MiB, and two temporaries of the same
# size while the top K and tail are taken): positions per chunk = CHUNK_VALUES // outputs, so
# memory is bounded by the chunk whatever the window or batch. 341 positions of SmolLM2's
# 49,152 outputs: large enough that the output layer's matrix product runs near full speed
CHUNK_VALUES = 1 << 24


def same_vocabulary(a: dict, b: dict) -> bool:
    """Whether two tokenizer records map text to the same ids (the same backend, vocabulary
    size and special tokens), whatever EOS and padding ids each uses."""
    return all(a.get(k) == b.get(k) for k in ("backend_sha256", "vocab_size", "special_tokens"))


def is_causal_lm(name: str, gguf_file: str = "") -> bool:
    """Whether ``hf:name`` holds a causal language model (its config maps to
    ``AutoModelForCausalLM`` and is not an encoder-decoder), read from its config only; for a
    GGUF file, from the architecture in its header (:func:`gguf_architecture`): false only for
    an architecture transformers knows as something else (T5, an encoder)."""
    transformers = _transformers()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    directory = resolve_model(name, gguf_file)
    if gguf_file:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        architecture = gguf_architecture(directory / gguf_file)
        model_type = GGUF_MODEL_TYPES.get(architecture, architecture.replace("-", "_"))
        return model_type not in CONFIG_MAPPING_NAMES or model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    with _quiet():
        try:
            config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
        except Exception as exc:
            raise KdError(f"{directory} has no readable model config ({type(exc).__name__}: "
                          f"{first_line(exc, 120)}); pass teacher=hf:DIR to a folder written by "
                          "save_pretrained (or gguf_file=NAME of its GGUF file)") from None
    if getattr(config, "is_encoder_decoder", False):
        return False
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


# llama.cpp's architecture names whose transformers model type is spelled otherwise
GGUF_MODEL_TYPES = {"t5encoder": "t5", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
# GGUF metadata value types of a fixed size (bytes), as the GGUF specification numbers them
_GGUF_SIZES = {0: 1, 1: 1, 7: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_architecture(path: Path) -> str:
    """The ``general.architecture`` in a GGUF file's header (``llama``, ``qwen2``, ``t5``...),
    read without the rest of its metadata or any tensor (llama.cpp writes it first; the keys
    before it are skipped by their sizes). Refused in one line for a file that is not GGUF."""
    def fail(why: str) -> KdError:
        return KdError(f"{path} is not a readable GGUF file ({why}); pass gguf_file=NAME of a .gguf "
                       "model file (written by llama.cpp's converters)")

    try:
        with open(path, "rb") as f:
            def read(n: int) -> bytes:
                data = f.read(n)
                if len(data) != n:
                    raise fail("it ends inside its header")
                return data

            def string() -> str:
                return read(struct.unpack("<Q", read(8))[0]).decode("utf-8", "replace")

            if read(4) != b"GGUF":
                raise fail("no GGUF magic bytes")
            version, _, count = struct.unpack("<IQQ", read(20))
            if version < 2:
                raise fail(f"GGUF version {version}")
            for _ in range(count):
                key, kind = string(), struct.unpack("<I", read(4))[0]
                if key == "general.architecture" and kind == _GGUF_STRING:
                    return string()
                if kind == _GGUF_STRING:
                    f.seek(struct.unpack("<Q", read(8))[0], 1)
                elif kind in _GGUF_SIZES:
                    f.seek(_GGUF_SIZES[kind], 1)
                elif kind == _GGUF_ARRAY:
                    element, n = struct.unpack("<IQ", read(12))
                    if element in _GGUF_SIZES:
                        f.seek(n * _GGUF_SIZES[element], 1)
                    elif element == _GGUF_STRING:
                        for _ in range(n):
                            f.seek(struct.unpack("<Q", read(8))[0], 1)
                    else:
                        raise fail(f"metadata {key} is an array of type {element}")
                else:
                    raise fail(f"metadata {key} has value type {kind}")
    except OSError as exc:
        raise KdError(f"{path} cannot be read ({exc.strerror or type(exc).__name__}); pass "
                      "gguf_file=NAME of a readable .gguf file") from None
    raise fail("its metadata names no general.architecture")


# The last causal LM loaded in this process: {key: (config, tokenizer, model)}, at most one
# entry (a teacher can be large), so that planning, timing and building a cache load it once.
_LOADED: dict[tuple, tuple[Any, Any, nn.Module]] = {}
_LOADED_LOCK = threading.Lock()


def _files_signature(directory: Path, gguf_file: str) -> tuple:
    """(name, size, mtime) of the files a model is loaded from: its GGUF file, or every file of
    its directory (weights, config, tokenizer), so that a model replaced in place is reloaded."""
    files = [directory / gguf_file] if gguf_file else sorted(p for p in directory.iterdir() if p.is_file())
    return tuple((p.name, st.st_size, st.st_mtime_ns) for p in files for st in (p.stat(),))


def load_causal_lm(directory: Path, gguf_file: str = "") -> tuple[Any, Any, nn.Module]:
    """``(config, tokenizer, model)`` of the causal LM in ``directory`` (or its GGUF file), the
    model in float32 and eval mode on the CPU, loaded offline and quietly, or reused from the
    last load in this process when its files are unchanged and the model is still on the CPU
    (a caller that moved it to a GPU made it its own). Refused in one line when it cannot be
    loaded."""
    transformers = _transformers()
    key = (str(directory), gguf_file, _files_signature(directory, gguf_file))
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    with _LOADED_LOCK:
        hit = _LOADED.get(key)
        if hit is not None and next(hit[2].parameters()).device.type == "cpu":
            return hit
        _LOADED.clear()  # let the previous model go before this one is loaded
        with _quiet(gguf=bool(gguf_file)):
            try:
                config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True, **extra)
                tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True, **extra)
            except Exception as exc:
                raise KdError(f"{directory} cannot be loaded as a causal language model and "
                              f"tokenizer ({type(exc).__name__}: {first_line(exc, 120)}); pass "
                              "teacher=hf:DIR to a folder written by save_pretrained, with its "
                              "tokenizer's files (or gguf_file=NAME; GGUF needs pip install gguf)") from None
            try:
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    directory, config=config, local_files_only=True, dtype=torch.float32, **extra).eval()
            except Exception as exc:
                raise KdError(f"the weights in {directory} cannot be loaded as a causal LM "
                              f"({type(exc).__name__}: {first_line(exc, 120)}); pass teacher=hf:DIR "
                              "to a folder written by save_pretrained") from None
        _LOADED[key] = (config, tokenizer, model)
        return _LOADED[key]


class HfCausalLM(nn.Module):
    """A Hugging Face causal LM over windows of token ids (see the module's docstring).

    ``num_classes`` is the vocabulary the cache's targets index (``len(tokenizer)``, the
    token dataset's ``num_classes``); ``seq_len`` the window length it is run on."""

    modality = "tokens"

    def __init__(self, name: str, num_classes: int, seq_len: int, gguf_file: str = ""):
        super().__init__()
        self.name = name
        self.gguf_file = gguf_file
        self.directory = resolve_model(name, gguf_file)
        config, self.tokenizer, self.model = load_causal_lm(self.directory, gguf_file)
        self.model_type = str(config.model_type)
        self.vocab_size = len(self.tokenizer)
        head = self.model.get_output_embeddings()
        self.outputs = int(head.weight.shape[0]) if head is not None else int(config.vocab_size)
        if self.outputs < self.vocab_size:
            raise KdError(f"teacher hf:{name} has {self.outputs:,} outputs but its tokenizer "
                          f"{self.vocab_size:,} ids: it cannot predict every token; pass a model "
                          "whose output layer covers its tokenizer")
        if int(num_classes) != self.vocab_size:
            raise KdError(f"teacher hf:{name}'s tokenizer has {self.vocab_size:,} ids but the token "
                          f"dataset's vocabulary has {int(num_classes):,}; tokenize the data with "
                          f"the teacher's tokenizer (tokenizer={self.tokenizer_path})")
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if positions and seq_len > positions:
            raise KdError(f"seq_len={seq_len} is longer than teacher hf:{name} reads ({positions} "
                          f"positions); pass seq_len=N with N <= {positions}")
        self.num_classes = self.vocab_size
        self.seq_len = int(seq_len)
        self.layers: tuple[str, ...] = ()
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.tokenizer.eos_token_id or 0)
        # the output layer applied to chunks of positions must give the model's own logits: a
        # model that transforms them further (soft-capping, scaling) is run whole instead
        self._body = getattr(self.model, "base_model", None)
        self.chunked = self._body is not None and self._body is not self.model and head is not None \
            and self._chunking_agrees()

    # ------------------------------------------------------------------ identity
    @property
    def tokenizer_path(self) -> Path:
        """Where the tokenizer is, as ``tokenizer=`` names it: the model directory, or its GGUF
        file (whose tokenizer is inside it)."""
        return self.directory / self.gguf_file if self.gguf_file else self.directory

    @property
    def tokenizer_record(self) -> dict[str, Any]:
        """The tokenizer's record (:func:`pipeline.data.tokens.tokenizer_record`, the token
        dataset's own, so that the two fingerprints compare), as a token cache's manifest holds it."""
        if self.tokenizer.eos_token_id is None:  # the record's EOS ends each document of the data
            raise KdError(f"teacher hf:{self.name}'s tokenizer has no end-of-sequence token, so it cannot "
                          "have tokenized a token dataset's documents; pass a causal LM whose tokenizer "
                          "has an eos_token")
        return tokenizer_record(self.tokenizer, self.directory)

    @property
    def vocabulary(self) -> dict[str, int]:
        """``{"vocab_size": len(tokenizer), "outputs": the output layer's size}``."""
        return {"vocab_size": self.vocab_size, "outputs": self.outputs}

    def fingerprint_identity(self) -> dict[str, Any]:
        """What :func:`pipeline.teachers.state_fingerprint` hashes besides the tensors."""
        import transformers

        return {"family": "hf-causal-lm", "model_type": self.model_type,
                "tokenizer": self.tokenizer_record["fingerprint"], **self.vocabulary,
                "transformers": transformers.__version__}

    def layer_names(self) -> list[str]:
        return []

    def tapped(self, layers: tuple[str, ...]) -> "HfCausalLM":
        if layers:
            raise KdError(f"a causal-LM teacher (hf:{self.name}) caches per-token logits, no feature "
                          f"layers ({', '.join(layers)}); drop layers= (or pass layers=none)")
        return self

    # ------------------------------------------------------------------ forward
    def hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The last hidden states ``[B, T, H]`` of windows ``ids`` ``[B, T]`` (``mask`` 1 on real
        tokens, 0 on padding; causal attention over the whole window), or, for a model whose
        logits cannot be computed by chunks, its logits ``[B, T, outputs]``."""
        if self.chunked:
            return self._body(input_ids=ids, attention_mask=mask).last_hidden_state
        return self.model(input_ids=ids, attention_mask=mask).logits

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, vocab_size]`` (float32) of ``n`` positions' :meth:`hidden` rows, the
        padded outputs beyond ``len(tokenizer)`` sliced away."""
        out = self.model.get_output_embeddings()(hidden) if self.chunked else hidden
        return out[..., :self.vocab_size].float()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Every position's logits ``[B, T, vocab_size]`` (for small inputs and references; a
        cache build uses :meth:`hidden` and :meth:`logits` by chunks)."""
        mask = torch.ones_like(ids) if mask is None else mask
        return self.logits(self.hidden(ids, mask))

    def _chunking_agrees(self) -> bool:
        ids = torch.arange(min(8, self.vocab_size))[None] % self.vocab_size
        with torch.inference_mode():
            whole = self.model(input_ids=ids).logits[..., :self.vocab_size].float()
            body = self._body(input_ids=ids).last_hidden_state
            parts = self.model.get_output_embeddings()(body)[..., :self.vocab_size].float()
        return parts.shape == whole.shape and bool(torch.allclose(parts, whole, rtol=1e-5, atol=1e-5))

    def chunk_positions(self) -> int:
        """Positions whose logits are held at once (:data:`CHUNK_VALUES` / outputs)."""
        return max(1, CHUNK_VALUES // self.outputs)

    def predict(self, ids: np.ndarray) -> np.ndarray:
        """The next token a deployed model predicts at every position, int64 ``[B, T]``, from
        windows of ids ``[B, T]`` (for timing: a forward pass and an argmax by chunks)."""
        x = torch.from_numpy(np.asarray(ids, np.int64))
        device = next(self.model.parameters()).device
        out = np.empty(x.shape, np.int64)
        with torch.inference_mode():
            h = self.hidden(runtime.to_device(x, device), torch.ones_like(x, device=device))
            flat = h.reshape(-1, h.shape[-1])
            step = self.chunk_positions()
            for a in range(0, len(flat), step):
                out.reshape(-1)[a:a + step] = self.logits(flat[a:a + step]).argmax(-1).cpu().numpy()
        return out
