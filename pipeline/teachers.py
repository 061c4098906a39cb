"""Teachers (a registry: the architectures of :mod:`pipeline.architectures`, torchvision's and
timm's models, Hugging Face text encoders, plugins), checkpoint loading, fingerprints and
feature taps.

A teacher is any ``nn.Module`` classifier. :func:`build_teacher` makes one from a
:class:`TeacherSpec` (architecture + weights), and :class:`Tapped` wraps it so that one forward
pass returns the logits and the requested intermediate features (through torchvision's FX
``create_feature_extractor``: no hooks, no model surgery).
"""

from __future__ import annotations

import hashlib
import pickle
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline import plugins
from pipeline.architectures import ARCHITECTURES, DEFAULT_LAYER, Factory
from pipeline.errors import KdError, first_line
from pipeline.hf import DEFAULT_LAYERS as TEXT_LAYERS
from pipeline.hf import DEFAULT_MAX_LENGTH, HfTeacher
from pipeline.hf_lm import PRETRAINED, HfCausalLM, is_causal_lm
from pipeline.onnx_teacher import OnnxTapped, OnnxTeacher
from pipeline.registry import Registry


def _plugin_teacher(name: str, factory: Factory) -> Factory:
    """A plugin's factory, checked: it must return a torch module (pipeline.plugins)."""
    def build(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        model = plugins.call(f"teacher {name}: factory({tuple(input_shape)}, {num_classes})",
                             factory, tuple(input_shape), int(num_classes))
        if not isinstance(model, nn.Module):
            raise KdError(f"teacher {name} returned a {type(model).__name__}, not a torch.nn.Module; "
                          "a teacher plugin is factory(input_shape, num_classes) -> nn.Module")
        return model
    return build


TEACHERS: Registry[Factory] = Registry("teacher", adapt=_plugin_teacher,
                                       also="onnx with teacher_ckpt=MODEL.onnx, timm:NAME, hf:DIR",
                                       plugins=plugins.Plugins("teacher"))

ONNX = "onnx"  # teacher=onnx teacher_ckpt=MODEL.onnx (pipeline.onnx_teacher)


def _torchvision(name: str) -> Factory:
    def factory(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        import torchvision

        if len(input_shape) != 3 or input_shape[0] != 3:
            raise KdError(f"teacher {name} needs 3-channel images (C, H, W) with C=3, not "
                          f"{tuple(input_shape)}; use teacher=cnn_small or resnet_small")
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)

    factory.__doc__ = f"torchvision's {name} (random init, or pretrained=true with local weights)."
    return factory


for _name in ARCHITECTURES:  # the built-ins, at their default (teacher) widths
    TEACHERS.register(_name)(ARCHITECTURES.get(_name))
for _name in ("resnet18", "mobilenet_v3_small"):
    TEACHERS.register(_name)(_torchvision(_name))


def _timm(name: str) -> Factory:
    """``teacher=timm:NAME``: any timm classification model, built for the dataset's classes
    and input channels (random init; ``teacher_ckpt=PATH`` loads weights, ``pretrained=true``
    starts teacher training from timm's locally cached weights)."""
    try:
        import timm
    except ImportError:
        raise KdError(f"teacher=timm:{name} needs timm, not installed here; pip install "
                      "'kdcache[timm]'") from None
    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        raise KdError(f"timm has no model {name!r}" + (f"; close: {', '.join(close)}" if close else
                      "; list them with python -c 'import timm; print(timm.list_models())'"))

    def factory(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        if len(input_shape) != 3:
            raise KdError(f"teacher timm:{name} needs images shaped (C, H, W), not "
                          f"{tuple(input_shape)}; pick another teacher (teacher=mlp fits any shape)")
        return timm.create_model(name, pretrained=False, num_classes=num_classes,
                                 in_chans=input_shape[0])

    factory.__doc__ = f"timm's {name}."
    return factory


TEACHERS.register_family("timm", _timm, package="timm")

TEXT_FAMILY = "hf"  # teacher=hf:DIR: a Hugging Face text encoder (pipeline.hf)


def is_text_teacher(arch: str) -> bool:
    """Whether teacher ``arch`` reads documents (``str``) rather than arrays."""
    return arch.startswith(TEXT_FAMILY + ":")


def _hf(name: str) -> Factory:
    """``teacher=hf:DIR``: a Hugging Face encoder from a local directory (or the local HF
    cache), with a classification head for the dataset's classes (pipeline.hf); or, when DIR
    holds a causal language model, that model over windows of token ids (pipeline.hf_lm)."""
    def factory(input_shape: tuple[int, ...], num_classes: int,
                max_length: int = DEFAULT_MAX_LENGTH, gguf_file: str = "") -> nn.Module:
        if gguf_file or is_causal_lm(name):
            if len(tuple(input_shape)) != 1:
                raise KdError(f"teacher hf:{name} is a causal language model: it reads windows of "
                              f"token ids, but the data holds {'documents' if tuple(input_shape) == () else 'arrays shaped ' + str(tuple(input_shape))}; "
                              "use a token dataset (dataset=tokens:PATH)")
            return HfCausalLM(name, num_classes, int(input_shape[0]), gguf_file)
        if tuple(input_shape) != ():
            raise KdError(f"teacher hf:{name} reads text, but the data holds arrays shaped "
                          f"{tuple(input_shape)}; use an array teacher (e.g. teacher=auto), or a "
                          "text dataset (dataset=text:PATH)")
        return HfTeacher(name, num_classes, max_length)

    factory.__doc__ = f"Hugging Face encoder {name} with a linear head."
    return factory


TEACHERS.register_family(TEXT_FAMILY, _hf, package="transformers")



def auto_teacher(input_shape: tuple[int, ...]) -> str:
    """teacher=auto: pick a built-in by the input's rank."""
    if len(input_shape) == 1:
        return "mlp"
    if len(input_shape) == 2:
        return "cnn1d"
    return "cnn_small" if max(input_shape[1:]) <= 16 else "resnet_small"


# =========================================================================== weights

@dataclass(frozen=True)
class TeacherSpec:
    """Everything needed to rebuild the same teacher anywhere (picklable, sent to workers)."""

    arch: str
    input_shape: tuple[int, ...]
    num_classes: int
    ckpt: str  # a path, or "random" (seeded random init, for tests and benchmarks)
    seed: int = 0
    layers: tuple[str, ...] = ()
    pool: bool = True
    device: str = "cpu"
    compile: bool = False
    fingerprint: str = field(default="", compare=False)
    max_length: int | None = None  # text teachers (hf:): tokens per document; None for the rest
    gguf_file: str = ""  # causal-LM teachers (hf:DIR): a GGUF file in DIR holding the model

    @classmethod
    def of_record(cls, record: dict, **changes) -> "TeacherSpec":
        """The spec of a manifest's ``teacher`` record (arch, input shape, classes, weights, seed,
        fingerprint, and a text teacher's max_length), with ``changes``."""
        values = dict(arch=record["arch"], input_shape=tuple(record["input_shape"]),
                      num_classes=record["num_classes"], ckpt=record["ckpt"], seed=record["seed"] or 0,
                      fingerprint=record["fingerprint"], max_length=record.get("max_length"),
                      gguf_file=record.get("gguf_file") or "")
        return cls(**{**values, **changes})


def create_teacher(arch: str, input_shape: tuple[int, ...], num_classes: int,
                   ckpt: str = "", max_length: int | None = None, gguf_file: str = "") -> nn.Module:
    """An untrained teacher ``arch`` for these inputs; ``teacher=onnx`` is its model file
    ``ckpt`` (an ONNX graph comes with its weights); a text teacher (``hf:``) is its
    pretrained encoder with an untrained head, reading ``max_length`` tokens per document."""
    if arch == ONNX:
        if ckpt in ("", "random"):
            raise KdError("teacher=onnx runs a model file: pass teacher_ckpt=MODEL.onnx")
        return OnnxTeacher(ckpt, tuple(input_shape), int(num_classes))
    if is_text_teacher(arch):
        return TEACHERS.get(arch)(tuple(input_shape), int(num_classes), max_length or DEFAULT_MAX_LENGTH,
                                  gguf_file)
    return TEACHERS.get(arch)(tuple(input_shape), int(num_classes))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from .safetensors or a torch file, never unpickling code."""
    path = Path(path)
    if path.is_dir():
        raise KdError(f"teacher checkpoint {path} is not a file (a directory); pass teacher_ckpt=PATH "
                      "to a state dict file (.pt/.pth/.safetensors)")
    if not path.is_file():
        raise KdError(f"teacher checkpoint {path} does not exist; pass teacher_ckpt=PATH to a "
                      "state dict (.pt/.pth/.safetensors), or omit it to train one")
    advice = "save a plain state dict with torch.save(model.state_dict(), ...) or safetensors"
    try:
        # torch warns about files it then refuses (e.g. "Detected pickle protocol 4"): the user
        # is owed kdcache's one line, not two lines of torch's own first
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():  # no refused class or function: not a torch file
            raise KdError(f"teacher checkpoint {path} cannot be read safely (not a torch state dict "
                          f"file); {advice}") from None
        # weights_only refused a class, function or other object
        raise KdError(f"teacher checkpoint {path} holds pickled Python objects besides tensors, "
                      f"which kdcache never unpickles (they could run code); {advice}") from None
    except Exception as exc:  # any unreadable file is the user's input problem
        first = (str(exc).splitlines() or [""])[0][:120]
        raise KdError(f"teacher checkpoint {path} cannot be read safely "
                      f"({type(exc).__name__}{': ' + first if first else ''}); {advice}") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise KdError(f"teacher checkpoint {path} does not hold a state dict of tensors")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}


def load_weights(model: nn.Module, path: str | Path, arch: str,
                 input_shape: tuple[int, ...] | None = None, num_classes: int | None = None) -> nn.Module:
    """Load the state dict at ``path`` into ``model`` (a teacher ``arch``), refusing one that
    does not fit. Given the model's input shape and class count, a checkpoint of this very
    architecture for another class count says so, instead of blaming the architecture."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if wrong and not missing and not unexpected and num_classes is not None:
        other = _class_count(state, own, wrong, arch, input_shape, num_classes)
        if other is not None:
            raise KdError(f"checkpoint {path} holds a {arch} teacher for {other} classes, but the "
                          f"data has {num_classes} classes; it was trained on other data: pass a "
                          "checkpoint trained on this dataset, or omit teacher_ckpt to train one")
    if missing or unexpected or wrong:
        details = "; ".join(f"{label}: {', '.join(keys[:3])}{'…' if len(keys) > 3 else ''}"
                            for label, keys in (("missing", missing), ("unexpected", unexpected),
                                                ("wrong shape", wrong)) if keys)
        raise KdError(f"checkpoint {path} does not fit teacher {arch} ({details}); pass the "
                      "teacher= architecture it was trained with")
    model.load_state_dict(state)
    return model


def _class_count(state: dict, own: dict, wrong: list[str], arch: str, input_shape,
                 num_classes: int) -> int | None:
    """The class count K' for which ``arch`` has exactly the shapes of ``state``, when the
    tensors of wrong shape differ from ``own`` only where ``own`` has ``num_classes``; else
    None (the checkpoint is of something else)."""
    counts = set()
    for key in wrong:
        theirs, ours = state[key].shape, own[key].shape
        if len(theirs) != len(ours):
            return None
        counts |= {t for t, o in zip(theirs, ours) if t != o and o == num_classes}
        if any(t != o and o != num_classes for t, o in zip(theirs, ours)):
            return None
    if len(counts) != 1:
        return None
    (other,) = counts
    try:
        fits = create_teacher(arch, tuple(input_shape), other).state_dict()
    except Exception:  # no such teacher can be built: the checkpoint is of something else
        return None
    same = fits.keys() == state.keys() and all(fits[k].shape == state[k].shape for k in fits)
    return other if same else None


def state_fingerprint(model: nn.Module, arch: str, input_shape, num_classes: int) -> str:
    """sha256 of architecture + every tensor (name, dtype, shape, bytes) in sorted order.

    torch.save files are not byte-stable, so the file itself is never hashed. A text teacher
    (:class:`pipeline.hf.HfTeacher`) is hashed with its tokenizer fingerprint and model type in
    place of its name, which holds the directory's path: the same model and tokenizer moved
    elsewhere is the same teacher.
    """
    if isinstance(model, (HfTeacher, HfCausalLM)):
        h = hashlib.sha256(repr(("hf", tuple(input_shape), int(num_classes))).encode())
        h.update(repr(sorted(model.fingerprint_identity().items())).encode())
        plugin = None
    else:
        h = hashlib.sha256(repr((arch, tuple(input_shape), int(num_classes))).encode())
        plugin = TEACHERS.identity(arch) if arch in TEACHERS else None
    if plugin:  # the code that builds it: its import path, package and version
        h.update(repr(sorted(plugin.items())).encode())
    if isinstance(model, OnnxTeacher):  # an ONNX model: graph, initializers, opsets, hashed whole
        h.update(model.sha256.encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def build_teacher(spec: TeacherSpec) -> nn.Module:
    """The plain teacher module (eval mode, on CPU) with the spec's weights."""
    if spec.arch == ONNX:
        if spec.ckpt in ("", "random"):
            raise KdError("teacher=onnx runs a model file: pass teacher_ckpt=MODEL.onnx")
        # onnxruntime places the graph itself, on the spec's device
        model = OnnxTeacher(spec.ckpt, spec.input_shape, spec.num_classes, spec.device)
    elif spec.ckpt == "random":
        torch.manual_seed(spec.seed)
        model = create_teacher(spec.arch, spec.input_shape, spec.num_classes, max_length=spec.max_length,
                               gguf_file=spec.gguf_file)
        if isinstance(model, HfCausalLM):
            raise KdError(f"teacher {spec.arch} is a causal LM: it runs its directory's weights, "
                          f"not random ones; drop teacher_ckpt= (or pass teacher_ckpt={PRETRAINED})")
    else:
        model = create_teacher(spec.arch, spec.input_shape, spec.num_classes, max_length=spec.max_length,
                               gguf_file=spec.gguf_file)
        if isinstance(model, HfCausalLM):
            if spec.ckpt != PRETRAINED:
                raise KdError(f"teacher {spec.arch} is a causal LM: it runs its directory's weights "
                              f"(teacher_ckpt={PRETRAINED}), not {spec.ckpt}; drop teacher_ckpt=")
        elif isinstance(model, HfTeacher):  # a head (or a whole model) trained for its directory
            model.load_checkpoint(spec.ckpt)
        else:
            load_weights(model, spec.ckpt, spec.arch, spec.input_shape, spec.num_classes)
    model.eval()
    if spec.fingerprint:
        actual = state_fingerprint(model, spec.arch, spec.input_shape, spec.num_classes)
        if actual != spec.fingerprint:
            raise KdError(f"teacher checkpoint {spec.ckpt} changed while the cache was being "
                          f"built (fingerprint {actual[:12]} != {spec.fingerprint[:12]}); "
                          "restore it or build a new cache")
    return model


# =========================================================================== feature taps

# FX node names by model: tracing a large model takes a while, and planning a cache asks for
# them up to three times (default layers, the taps, the timm fallback)
_NODE_NAMES: "weakref.WeakKeyDictionary[nn.Module, list[str]]" = weakref.WeakKeyDictionary()


def layer_names(model: nn.Module) -> list[str]:
    """The layers a feature tap can name: FX graph nodes, an ONNX graph's outputs, or a text
    teacher's pooled hidden layers."""
    if isinstance(model, OnnxTeacher):
        return model.outputs()
    if isinstance(model, (HfTeacher, HfCausalLM)):
        return model.layer_names()
    if model not in _NODE_NAMES:
        _NODE_NAMES[model] = _traced_names(model)
    return _NODE_NAMES[model]


def _traced_names(model: nn.Module) -> list[str]:
    get_graph_node_names = _fx(model)[0]
    try:
        return get_graph_node_names(model)[1]
    except Exception as exc:  # control flow that symbolic tracing cannot follow
        if TimmStages.fits(model):
            return TimmStages.names(model)
        first = first_line(exc, 120)
        raise KdError(f"{type(model).__name__} cannot be traced by torch.fx to tap its layers "
                      f"({type(exc).__name__}: {first}); cache it with layers=none (the logits "
                      "only), or export it to ONNX with its features as graph outputs") from None


def default_layers(model: nn.Module) -> tuple[str, ...]:
    """The penultimate layer (``embed`` where there is one); an ONNX graph's other outputs."""
    if isinstance(model, OnnxTeacher):
        return tuple(model.feature_names)
    if isinstance(model, HfCausalLM):
        return ()  # per-token logits only
    if isinstance(model, HfTeacher):
        return TEXT_LAYERS
    nodes = layer_names(model)
    if TimmStages.PRE_LOGITS in nodes and nodes[-1] == TimmStages.PRE_LOGITS:
        return (TimmStages.PRE_LOGITS,)
    return (DEFAULT_LAYER,) if DEFAULT_LAYER in nodes else (nodes[-2],)


def _fx(model: nn.Module):
    """(get_graph_node_names, create_feature_extractor): timm's own for timm models (they know
    which of timm's modules and functions to leave untraced), torchvision's otherwise."""
    if type(model).__module__.startswith("timm."):
        from timm.models import create_feature_extractor, get_graph_node_names
    else:
        from torchvision.models.feature_extraction import (create_feature_extractor,
                                                           get_graph_node_names)
    return get_graph_node_names, create_feature_extractor


def tap(model: nn.Module, layers: tuple[str, ...], pool: bool, arch: str) -> nn.Module:
    """``model`` returning ``(logits, {layer: features})``: :class:`Tapped` for torch modules,
    :class:`pipeline.onnx_teacher.OnnxTapped` for ONNX graphs; a text teacher taps its own
    pooled layers (``forward(input_ids, attention_mask)``; ``pool`` does not apply)."""
    if isinstance(model, OnnxTeacher):
        return OnnxTapped(model, layers, pool)
    if isinstance(model, (HfTeacher, HfCausalLM)):
        return model.tapped(layers)
    if layers and TimmStages.fits(model) and layer_names(model) == TimmStages.names(model):
        return TimmStages(model, layers, pool, arch)  # timm, where FX cannot trace it
    return Tapped(model, layers, pool, arch)


class TimmStages(nn.Module):
    """A timm model that torch.fx cannot trace, tapped through timm's own
    ``forward_intermediates``: its layers are its ``feature_info`` stages (e.g. ``layer3``) and
    ``pre_logits`` (the pooled penultimate features, ``forward_head(..., pre_logits=True)``)."""

    PRE_LOGITS = "pre_logits"

    @staticmethod
    def fits(model: nn.Module) -> bool:
        return type(model).__module__.startswith("timm.") and hasattr(model, "forward_intermediates")

    @classmethod
    def names(cls, model: nn.Module) -> list[str]:
        return [info["module"] for info in model.feature_info] + [cls.PRE_LOGITS]

    def __init__(self, model: nn.Module, layers: tuple[str, ...], pool: bool, arch: str):
        super().__init__()
        names = self.names(model)
        unknown = [l for l in layers if l not in names]
        if unknown:
            raise KdError(f"teacher {arch} has no layer {unknown[0]!r}; it cannot be traced by "
                          f"torch.fx, so its layers are its stages: {', '.join(names)}")
        self.model, self.layers, self.pool = model, tuple(layers), pool
        self.stages = sorted(names.index(l) for l in layers if l != self.PRE_LOGITS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        final, maps = self.model.forward_intermediates(x, indices=self.stages or [0])
        by_name = dict(zip((self.names(self.model)[i] for i in self.stages), maps))
        feats = {}
        for name in self.layers:
            f = self.model.forward_head(final, pre_logits=True) if name == self.PRE_LOGITS else by_name[name]
            feats[name] = f.flatten(2).mean(-1) if self.pool and f.dim() > 2 else f
        return self.model.forward_head(final), feats


class Tapped(nn.Module):
    """A teacher that returns ``(logits, {layer: features})`` from one forward pass."""

    def __init__(self, model: nn.Module, layers: tuple[str, ...], pool: bool, arch: str = "teacher",
                 role: str = "teacher"):
        super().__init__()
        create_feature_extractor = _fx(model)[1]
        if not layers:  # layers=none: the model's own forward, untraced, so any model caches
            self.layers, self.pool, self.extractor = (), pool, model
            return
        nodes = layer_names(model)
        unknown = [l for l in layers if l not in nodes]
        if unknown:
            sample = ", ".join(nodes[-8:])
            raise KdError(f"{role} {arch} has no layer {unknown[0]!r}; layers include: {sample} "
                          f"({len(nodes)} in all)")
        self.layers = tuple(layers)
        self.pool = pool
        self.output_node = nodes[-1]
        returns = {name: name for name in self.layers}
        returns[self.output_node] = "__logits__"
        self.extractor = create_feature_extractor(model, return_nodes=returns)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.extractor(x)
        if not self.layers:
            return out, {}
        logits = out.pop("__logits__")
        feats = {}
        for name in self.layers:
            # the output node is returned once, as the logits; tapping it means the logits
            f = logits if name == self.output_node else out[name]
            if self.pool and f.dim() > 2:  # spatial map → one vector per sample
                f = f.flatten(2).mean(-1)
            feats[name] = f
        return logits, feats


def pretrained_state(arch: str, input_shape: tuple[int, ...], num_classes: int) -> dict[str, torch.Tensor]:
    """torchvision's default weights for ``arch`` from the local torch hub cache.

    kdcache never downloads weights during a run; with internet, fetch them once with
    ``torchvision.models.get_model_weights(arch).DEFAULT.get_state_dict()``. ``timm:NAME``:
    timm's weights from its local Hugging Face cache (fetch them once with
    ``timm.create_model(NAME, pretrained=True)``).
    """
    if arch.startswith("timm:"):
        return _timm_pretrained(arch.removeprefix("timm:"), tuple(input_shape), num_classes)
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError):
        raise KdError(f"teacher {arch} has no torchvision pretrained weights; set pretrained=false") from None
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.is_file():
        raise KdError(f"pretrained weights for {arch} are not in {path.parent}; fetch them once "
                      "with internet access, or set pretrained=false")
    return torch.load(path, map_location="cpu", weights_only=True)


def _timm_pretrained(name: str, input_shape: tuple[int, ...], num_classes: int) -> dict[str, torch.Tensor]:
    import huggingface_hub.constants as hub
    import timm

    # huggingface_hub reads HF_HUB_OFFLINE once, at import: set its flag itself, so that
    # nothing is downloaded during a run
    offline, hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE, True
    try:
        # timm adapts the stem to the input's channels; the new head stays untrained
        return timm.create_model(name, pretrained=True, num_classes=num_classes,
                                 in_chans=input_shape[0]).state_dict()
    except Exception as exc:
        first = first_line(exc, 120)
        raise KdError(f"pretrained weights for timm:{name} are not in the local Hugging Face cache "
                      f"({type(exc).__name__}: {first}); fetch them once with internet: python -c "
                      f"\"import timm; timm.create_model('{name}', pretrained=True)\", or set "
                      "pretrained=false") from None
    finally:
        hub.HF_HUB_OFFLINE = offline
