"""ONNX teachers: a model from any framework (Keras/TensorFlow through tf2onnx, JAX, PyTorch,
...) cached like a PyTorch teacher, run by onnxruntime (``teacher=onnx teacher_ckpt=model.onnx``).

The graph takes one float input, ``[batch, *input_shape]`` in the dataset's layout (NCHW for
images) or, for images, NHWC ``[batch, H, W, C]`` (transposed from kdcache's NCHW here), and
is fed exactly what a PyTorch teacher is fed: the dataset's inputs normalised as its
``preprocessing`` says. Its first output, or the one named ``logits``, is the logits
``[batch, num_classes]``; every other named output is a feature kdcache can cache
(``layers=NAME,...``; by default all of them; ``layers=none`` for the logits only). The
fingerprint hashes the graph and its initializers. A model that records the preprocessing it
expects (the ``kdcache.preprocessing`` metadata key, which ``kdcache export`` writes) is
checked against the dataset's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.errors import KdError, first_line

_FLOAT_TYPES = {1: np.float32, 10: np.float16, 11: np.float64}  # onnx TensorProto element types


class OnnxTeacher(nn.Module):
    """``forward(x) -> logits`` through an onnxruntime session; :meth:`outputs` names the graph's
    outputs (the layers it offers) and :class:`OnnxTapped` taps them."""

    def __init__(self, path: str | Path, input_shape: tuple[int, ...], num_classes: int,
                 device: str = "cpu"):
        super().__init__()
        try:
            import onnx
            import onnxruntime  # noqa: F401
        except ImportError:
            raise KdError("teacher=onnx needs onnx and onnxruntime, not installed here; pip install "
                          "'kdcache[export]'") from None

        path = Path(path)
        if not path.is_file():
            raise KdError(f"ONNX teacher {path} does not exist; pass teacher_ckpt=MODEL.onnx")
        try:
            model = onnx.load(str(path))
            onnx.checker.check_model(model)
        except Exception as exc:
            first = first_line(exc, 120)
            raise KdError(f"teacher checkpoint {path} is not an ONNX model ({type(exc).__name__}: "
                          f"{first}); export the model to ONNX (e.g. tf2onnx for Keras)") from None
        self.path = str(path)
        self.sha256 = hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()
        self.num_params = int(sum(np.prod(t.dims) for t in model.graph.initializer))
        self.weights_bytes = _bytes_on_disk(path)
        initializers = {t.name for t in model.graph.initializer}
        inputs = [i for i in model.graph.input if i.name not in initializers]
        if len(inputs) != 1:
            raise KdError(f"ONNX teacher {path} takes {len(inputs)} inputs "
                          f"({', '.join(i.name for i in inputs)}); kdcache feeds one (the sample)")
        tensor = inputs[0].type.tensor_type
        self.input_name = inputs[0].name
        self.input_dtype = _FLOAT_TYPES.get(tensor.elem_type)
        if self.input_dtype is None:
            raise KdError(f"ONNX teacher {path} takes input {self.input_name} of element type "
                          f"{tensor.elem_type}, not float; export it with a float input")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        if dims and dims[0] is not None:
            raise KdError(f"ONNX teacher {path} takes a fixed batch of {dims[0]}; export it with a "
                          "dynamic batch axis (e.g. torch.onnx.export(..., dynamic_shapes=...) or "
                          "tf2onnx with an input signature of shape (None, ...))")
        self.layout = _layout(dims[1:], tuple(input_shape))
        if self.layout is None:
            nhwc = f" or NHWC {(input_shape[1], input_shape[2], input_shape[0])}" if len(input_shape) == 3 else ""
            shown = ["batch" if d is None else d for d in dims]
            raise KdError(f"ONNX teacher {path} takes inputs shaped {shown}, but the dataset's samples "
                          f"are {tuple(input_shape)}{nhwc}; export the model for this input shape")
        recorded = _metadata(model).get("kdcache.preprocessing")
        # what it says it expects, if it says (checked against the dataset by the cache's plan)
        self.expected_preprocessing = json.loads(recorded) if recorded else None
        names = [o.name for o in model.graph.output]
        self.logits_name = "logits" if "logits" in names else names[0]
        self.feature_names = [n for n in names if n != self.logits_name]
        self.num_classes = num_classes
        self._session = _session(self.path, device)

    def outputs(self) -> list[str]:
        """The graph's outputs: the layers a cache can hold (the logits' name included)."""
        return [*self.feature_names, self.logits_name]

    def run(self, x: torch.Tensor, names: list[str]) -> list[np.ndarray]:
        batch = x.detach().float().cpu().numpy()
        if self.layout == "NHWC":
            batch = batch.transpose(0, 2, 3, 1)
        try:
            return self._session.run(names, {self.input_name: np.ascontiguousarray(batch, self.input_dtype)})
        except Exception as exc:  # onnxruntime's own errors (a shape or type the graph refuses)
            first = first_line(exc)
            raise KdError(f"onnxruntime failed to run {self.path} ({type(exc).__name__}: {first})") from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.run(x, [self.logits_name])[0], np.float32))


class OnnxTapped(nn.Module):
    """An ONNX teacher returning ``(logits, {layer: features})`` from one run of its graph, like
    :class:`pipeline.teachers.Tapped`; spatial maps are averaged to vectors with ``pool``."""

    def __init__(self, teacher: OnnxTeacher, layers: tuple[str, ...], pool: bool):
        super().__init__()
        unknown = [l for l in layers if l not in teacher.outputs()]
        if unknown:
            raise KdError(f"ONNX teacher {teacher.path} has no output {unknown[0]!r}; its outputs: "
                          f"{', '.join(teacher.outputs())} (tap a layer by making it a graph output)")
        self.teacher, self.layers, self.pool = teacher, tuple(layers), pool

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        names = [self.teacher.logits_name, *[l for l in self.layers if l != self.teacher.logits_name]]
        values = dict(zip(names, self.teacher.run(x, names)))
        logits = torch.from_numpy(np.asarray(values[self.teacher.logits_name], np.float32))
        feats = {}
        for name in self.layers:
            f = torch.from_numpy(np.asarray(values[name], np.float32))
            if self.pool and f.dim() > 2:  # channels first (NCHW) or last (NHWC), as the graph's
                f = f.flatten(2).mean(-1) if self.teacher.layout != "NHWC" else f.flatten(1, -2).mean(1)
            feats[name] = f
        return logits, feats


def _layout(dims: list[int | None], shape: tuple[int, ...]) -> str | None:
    def fits(want: tuple[int, ...]) -> bool:
        return len(dims) == len(want) and all(d is None or d == w for d, w in zip(dims, want))

    if fits(shape):
        return "NCHW" if len(shape) == 3 else "as is"
    if len(shape) == 3 and fits((shape[1], shape[2], shape[0])):
        return "NHWC"
    return None


def _metadata(model) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def _session(path: str, device: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    providers: list = ["CPUExecutionProvider"]
    # (onnxruntime-gpu has the CUDA provider; the onnxruntime package is CPU-only)
    if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        index = int(str(device).partition(":")[2] or 0)
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
    return ort.InferenceSession(path, options, providers=providers)


def _bytes_on_disk(path: Path) -> int:
    """The model file plus the external data files its initializers are stored in (torch's
    exporter writes weights beside the graph, as ``model.onnx.data``)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    files = {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in files
                                     if (path.parent / f).is_file())
