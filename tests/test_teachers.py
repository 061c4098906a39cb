"""Teachers: every registered architecture builds, taps features, fingerprints its weights and
round-trips through checkpoints; foreign or unsafe checkpoints are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import KdError
from pipeline.teachers import (TEACHERS, Tapped, TeacherSpec, auto_teacher, build_teacher,
                               create_teacher, default_layers, layer_names, read_state_dict,
                               state_fingerprint)

K = 4
# An input shape each architecture fits. A teacher added to the registry without a shape here
# fails test_every_teacher_has_a_shape.
# The input each teacher is tested on: the first of CANDIDATES its factory accepts, unless
# named here. A teacher registered later is covered by every test below without an edit.
CANDIDATES = [(12,), (2, 16), (1, 8, 8), (3, 16, 16), (3, 32, 32)]
PREFERRED: dict[str, tuple[int, ...]] = {
    "mlp": (12,), "cnn1d": (2, 16), "cnn_small": (1, 8, 8), "resnet_small": (3, 16, 16),
    "resnet18": (3, 32, 32), "mobilenet_v3_small": (3, 32, 32),
}


def _shape(arch: str) -> tuple[int, ...] | None:
    from pipeline.errors import KdError
    from pipeline.teachers import create_teacher

    if arch in PREFERRED:
        return PREFERRED[arch]
    for shape in CANDIDATES:
        try:
            create_teacher(arch, shape, K)
            return shape
        except KdError:
            continue
    return None


ARCHS = TEACHERS.names()
SHAPES: dict[str, tuple[int, ...] | None] = {arch: _shape(arch) for arch in ARCHS}


def test_every_teacher_takes_one_of_the_test_shapes():
    assert all(SHAPES.values()), {a: s for a, s in SHAPES.items() if s is None}


def spec(arch: str, ckpt: str = "random", seed: int = 0, **kw) -> TeacherSpec:
    return TeacherSpec(arch, SHAPES[arch], K, ckpt, seed, **kw)


def batch(arch: str, n: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *SHAPES[arch]), generator=g)


@torch.inference_mode()
def forward(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    return model(x).numpy()


@pytest.mark.parametrize("arch", ARCHS)
def test_tapped_default_layers(arch):
    model = build_teacher(spec(arch))
    assert not model.training  # built in eval mode
    layers = default_layers(model)
    assert len(layers) == 1
    tapped = Tapped(model, layers, pool=True, arch=arch)
    x = batch(arch)
    with torch.inference_mode():
        logits, feats = tapped(x)
    assert logits.shape == (3, K)
    assert set(feats) == set(layers)
    (feature,) = feats.values()
    assert feature.dim() == 2 and feature.shape[0] == 3 and feature.shape[1] > 0
    # tapping must not change what the teacher outputs
    np.testing.assert_allclose(logits.numpy(), forward(model, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["cnn_small", "resnet_small"])
def test_tapped_spatial_layer_pooling(arch):
    model = build_teacher(spec(arch))
    layer = "block2.2" if arch == "cnn_small" else "stage1.1.act"
    x = batch(arch)
    with torch.inference_mode():
        _, pooled = Tapped(model, (layer,), pool=True, arch=arch)(x)
        _, maps = Tapped(model, (layer,), pool=False, arch=arch)(x)
    assert maps[layer].dim() == 4 and pooled[layer].dim() == 2
    torch.testing.assert_close(pooled[layer], maps[layer].mean(dim=(2, 3)))


def test_tapping_the_output_layer_returns_the_logits():
    model = build_teacher(spec("cnn_small"))
    output = layer_names(model)[-1]
    with torch.inference_mode():
        logits, feats = Tapped(model, ("embed", output), pool=True, arch="cnn_small")(batch("cnn_small"))
    assert set(feats) == {"embed", output}
    torch.testing.assert_close(feats[output], logits)


def test_unknown_layer_is_named():
    model = build_teacher(spec("mlp"))
    with pytest.raises(KdError, match=r"teacher mlp has no layer 'fc9'; layers include: .*fc2"):
        Tapped(model, ("fc9",), pool=True, arch="mlp")


def test_built_in_fingerprints_stay_what_they_were():
    """Caches name their teacher by this hash: a built-in teacher's must not change when kdcache
    does (it was this before plugins could enter fingerprints)."""
    model = build_teacher(TeacherSpec("cnn_small", (1, 8, 8), 10, "random", 0))
    assert state_fingerprint(model, "cnn_small", (1, 8, 8), 10) == \
        "5f33261867107fb5c9a13d48ba6a119679fe1cfdc100e00988236a82ddc91395"


@pytest.mark.parametrize("arch", ARCHS)
def test_state_fingerprint(arch):
    shape = SHAPES[arch]
    a, b = build_teacher(spec(arch, seed=0)), build_teacher(spec(arch, seed=0))
    fp = state_fingerprint(a, arch, shape, K)
    assert fp == state_fingerprint(b, arch, shape, K)  # same weights, same fingerprint
    assert fp != state_fingerprint(build_teacher(spec(arch, seed=1)), arch, shape, K)
    assert fp != state_fingerprint(a, arch, shape, K + 1)  # architecture is part of it
    with torch.no_grad():
        param = next(iter(b.parameters()))
        param.view(-1)[-1] += 1e-3  # one weight
    assert state_fingerprint(b, arch, shape, K) != fp


def test_fingerprint_sees_buffers():
    model = build_teacher(spec("cnn_small"))
    fp = state_fingerprint(model, "cnn_small", SHAPES["cnn_small"], K)
    model.block1[1].running_mean[0] += 1.0  # BatchNorm statistics change the outputs too
    assert state_fingerprint(model, "cnn_small", SHAPES["cnn_small"], K) != fp


def _save(model: torch.nn.Module, path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_round_trip(tmp_path, arch, suffix):
    original = build_teacher(spec(arch, seed=3))
    path = _save(original, tmp_path / f"teacher{suffix}")
    loaded = build_teacher(spec(arch, ckpt=str(path)))
    shape = SHAPES[arch]
    assert state_fingerprint(loaded, arch, shape, K) == state_fingerprint(original, arch, shape, K)
    x = batch(arch)
    np.testing.assert_array_equal(forward(loaded, x), forward(original, x))


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module_prefix"])
def test_common_checkpoint_layouts_load(tmp_path, wrap):
    original = build_teacher(spec("mlp", seed=5))
    state = original.state_dict()
    if wrap == "module_prefix":  # saved from DataParallel / DDP
        payload = {f"module.{k}": v for k, v in state.items()}
    elif wrap == "plain":
        payload = state
    else:
        payload = {wrap: state, "epoch": torch.tensor(3)}
    torch.save(payload, tmp_path / "c.pth")
    loaded = build_teacher(spec("mlp", ckpt=str(tmp_path / "c.pth")))
    x = batch("mlp")
    np.testing.assert_array_equal(forward(loaded, x), forward(original, x))


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_of_another_architecture_does_not_fit(tmp_path, arch):
    other = "cnn1d" if arch == "mlp" else "mlp"
    path = _save(create_teacher(other, SHAPES[other], K), tmp_path / "other.pt")
    with pytest.raises(KdError, match=f"does not fit teacher {arch}"):
        build_teacher(spec(arch, ckpt=str(path)))


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_with_wrong_number_of_classes_names_the_class_counts(tmp_path, arch):
    """The architecture is right, the data is not: the message says so, and does not send the
    user looking for another teacher= (it did)."""
    path = _save(create_teacher(arch, SHAPES[arch], K + 2), tmp_path / "k6.pt")
    with pytest.raises(KdError, match=rf"k6.pt holds a {arch} teacher for {K + 2} classes, but the data "
                                      rf"has {K} classes; it was trained on other data") as info:
        build_teacher(spec(arch, ckpt=str(path)))
    assert "teacher=" not in str(info.value)


def _touch(path):  # what a malicious pickle would run on load
    Path(path).write_text("pwned")


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_touch, (self.marker,))


def test_pickled_object_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save({"head.weight": torch.zeros(2), "extra": Payload(str(marker))}, path)
    with pytest.raises(KdError, match="holds pickled Python objects .* never unpickles"):
        read_state_dict(path)
    with pytest.raises(KdError, match="holds pickled Python objects"):
        build_teacher(spec("mlp", ckpt=str(path)))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"w": "not a tensor"}, "does not hold a state dict of tensors"),
        ([torch.zeros(2)], "does not hold a state dict of tensors"),
    ],
)
def test_non_state_dict_checkpoints(tmp_path, content, match):
    path = tmp_path / "x.pt"
    torch.save(content, path)
    with pytest.raises(KdError, match=match):
        read_state_dict(path)


@pytest.mark.parametrize("name", ["junk.pt", "junk.safetensors"])
def test_unreadable_checkpoint(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(KdError, match="cannot be read safely") as info:
        read_state_dict(path)
    assert "\n" not in str(info.value)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(KdError, match="does not exist"):
        build_teacher(spec("mlp", ckpt=str(tmp_path / "nope.pt")))


def test_changed_checkpoint_is_detected_by_fingerprint(tmp_path):
    path = _save(build_teacher(spec("mlp", seed=0)), tmp_path / "t.pt")
    fp = state_fingerprint(build_teacher(spec("mlp", ckpt=str(path))), "mlp", SHAPES["mlp"], K)
    assert build_teacher(spec("mlp", ckpt=str(path), fingerprint=fp)) is not None
    _save(build_teacher(spec("mlp", seed=1)), path)  # replaced behind the cache's back
    with pytest.raises(KdError, match="changed while the cache was being built"):
        build_teacher(spec("mlp", ckpt=str(path), fingerprint=fp))


@pytest.mark.parametrize(
    ("arch", "shape", "match"),
    [
        ("cnn_small", (12,), r"teacher cnn_small needs inputs shaped \(C, H, W\)"),
        ("cnn1d", (1, 4, 4), r"teacher cnn1d needs inputs shaped \(L,\) or \(C, L\)"),
        ("resnet18", (1, 32, 32), "teacher resnet18 needs 3-channel images"),
    ],
)
def test_input_shape_that_does_not_fit(arch, shape, match):
    with pytest.raises(KdError, match=match):
        create_teacher(arch, shape, K)


@pytest.mark.parametrize(("arch", "shape"), [("cnn1d", (20,)), ("cnn_small", (8, 8))])
def test_channel_adapters(arch, shape):
    model = create_teacher(arch, shape, K).eval()
    with torch.inference_mode():
        assert model(torch.randn(2, *shape)).shape == (2, K)


@pytest.mark.parametrize(
    ("shape", "arch"),
    [((10,), "mlp"), ((2, 30), "cnn1d"), ((1, 8, 8), "cnn_small"), ((3, 32, 32), "resnet_small")],
)
def test_auto_teacher(shape, arch):
    assert auto_teacher(shape) == arch
    create_teacher(arch, shape, K)  # and the pick fits
