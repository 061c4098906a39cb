"""Bring your own model: plugins by import path and by entry point, timm teachers, ONNX teachers,
and ``layers=none``, each end to end through the CLI, offline.

The plugin is a real module outside kdcache (tests/data/myplug.py), copied into a temporary
directory on ``sys.path`` as the package ``myplug``; the entry-point test installs it the way
pip would, as a ``.dist-info`` directory beside it.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build, run_cli
from pipeline.cache import open_cache
from pipeline.cache import format as fmt
from pipeline.data import DATASETS
from pipeline.errors import KdError
from pipeline.losses import LOSSES
from pipeline.results import read_results, results_dir
from pipeline.students import STUDENTS
from pipeline.teachers import TEACHERS, create_teacher
from stages.cli import main

PLUGIN = Path(__file__).parent / "data" / "myplug.py"
REGISTRIES = (TEACHERS, DATASETS, STUDENTS, LOSSES)


def forget_plugins() -> None:
    """Drop what plugins registered and imported, so every test loads them afresh."""
    for registry in REGISTRIES:
        registry.forget_plugins()
    sys.modules.pop("myplug", None)


@pytest.fixture
def plugin(tmp_path, monkeypatch) -> Path:
    """The myplug package, importable (version 0.3.1)."""
    root = tmp_path / "site"
    (root / "myplug").mkdir(parents=True)
    shutil.copy(PLUGIN, root / "myplug" / "__init__.py")
    monkeypatch.syspath_prepend(str(root))
    forget_plugins()
    yield root
    forget_plugins()


def set_version(root: Path, version: str) -> None:
    path = root / "myplug" / "__init__.py"
    path.write_text(path.read_text().replace('__version__ = "0.3.1"', f'__version__ = "{version}"'))
    forget_plugins()


def cache_cmd(root: Path, *args: str) -> list[str]:
    return ["cache", "dataset=myplug:blobs:400", "teacher=myplug:tiny", "teacher_ckpt=random",
            "scheduler=synchronous", f"cache={root}", *args]


def test_plugins_by_import_path_run_cache_student_report(plugin, tmp_path, capsys):
    cache = tmp_path / "cache"
    summary = run_cli(capsys, *cache_cmd(cache))
    assert summary["dataset"] == "myplug:blobs:400" and summary["teacher"] == "myplug:tiny"
    manifest = open_cache(cache).manifest
    identity = manifest["dataset"]["plugin"]
    source = hashlib.sha256((plugin / "myplug" / "__init__.py").read_bytes()).hexdigest()
    assert identity == {"name": "myplug:blobs", "import": "myplug:blobs", "package": None,
                        "version": "0.3.1", "source_sha256": source}
    saved = json.loads((cache / fmt.CONFIG).read_text())["plugins"]
    assert saved["teacher=myplug:tiny"]["version"] == "0.3.1" and saved["dataset=myplug:blobs"] == identity

    runs = tmp_path / "runs"
    ridge = run_cli(capsys, "student", f"cache={cache}", f"runs_dir={runs}", "model=myplug:Ridge")
    soft = run_cli(capsys, "student", f"cache={cache}", f"runs_dir={runs}", "model=mlp",
                   "loss=myplug:soft_ce", "epochs=3")
    assert ridge["kind"] == "features" and ridge["test_accuracy"] > 0.5
    assert soft["loss"] == "myplug:soft_ce" and soft.get("temperature") == 4.0  # it declared one
    assert ":" not in ridge["run_id"] and Path(ridge["run_dir"]).is_dir()
    recorded = json.loads((Path(soft["run_dir"]) / "config.json").read_text())["plugins"]
    assert recorded["loss=myplug:soft_ce"]["import"] == "myplug:soft_ce"
    report = run_cli(capsys, "report", f"cache={cache}")
    assert {b["model"] for b in report["leaderboard"]} == {"myplug:Ridge", "mlp"}
    assert read_results(results_dir(cache)).num_rows == 2


def test_a_plugin_s_version_enters_the_fingerprints(plugin, tmp_path, capsys):
    cache = tmp_path / "cache"
    run_cli(capsys, *cache_cmd(cache))
    before = open_cache(cache).manifest
    set_version(plugin, "0.4.0")
    capsys.readouterr()
    assert main(cache_cmd(cache)) == 2  # same weights and rows, other code: another cache
    assert "was built from another teacher" in capsys.readouterr().err
    other = tmp_path / "other"
    run_cli(capsys, *cache_cmd(other))
    after = open_cache(other).manifest
    assert after["teacher"]["fingerprint"] != before["teacher"]["fingerprint"]
    assert after["dataset"]["fingerprint"] != before["dataset"]["fingerprint"]


def test_plugins_by_entry_point(plugin, tmp_path, capsys):
    """An installed package registers names through entry points; its name and version (from
    its metadata) are its identity."""
    info = plugin / "myplug-0.3.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: myplug\nVersion: 0.3.1\n")
    (info / "top_level.txt").write_text("myplug\n")
    (info / "entry_points.txt").write_text(
        "[kdcache.teachers]\ntiny = myplug:tiny\n\n[kdcache.datasets]\nblobs = myplug:blobs\n\n"
        "[kdcache.students]\nridge = myplug:Ridge\n\n[kdcache.losses]\nsoft_ce = myplug:soft_ce\n")
    assert "tiny" in TEACHERS.names() and "ridge" in STUDENTS.names()
    cache = tmp_path / "cache"
    run_cli(capsys, "cache", "dataset=blobs:300", "teacher=tiny", "teacher_ckpt=random",
            "scheduler=synchronous", f"cache={cache}")
    manifest = open_cache(cache).manifest
    assert manifest["dataset"]["plugin"] == {"name": "blobs", "import": "myplug:blobs",
                                             "package": "myplug", "version": "0.3.1"}
    row = run_cli(capsys, "student", f"cache={cache}", f"runs_dir={tmp_path / 'runs'}",
                  "model=mlp", "loss=soft_ce", "epochs=2")
    assert row["loss"] == "soft_ce"
    assert run_cli(capsys, "student", f"cache={cache}", f"runs_dir={tmp_path / 'runs'}",
                   "model=ridge")["kind"] == "features"


# --------------------------------------------------------------------------- timm

def test_timm_teacher_with_random_weights_and_a_checkpoint(tmp_path, capsys):
    timm = pytest.importorskip("timm")
    spec = "synthetic:300:3x16x16:3"
    first = run_cli(capsys, "cache", f"dataset={spec}", "teacher=timm:resnet18", "teacher_ckpt=random",
                    "scheduler=synchronous", f"cache={tmp_path / 'random'}")
    assert list(first["layers"]) == ["global_pool.flatten"] and first["layers"]["global_pool.flatten"] == [512]
    saved = json.loads((tmp_path / "random" / fmt.CONFIG).read_text())["plugins"]
    assert saved["teacher=timm:resnet18"] == {"name": "timm:resnet18", "import": None,
                                              "package": "timm", "version": timm.__version__}
    # local weights (what a user fine-tuned), and a tap by name, unpooled
    torch.manual_seed(3)
    model = create_teacher("timm:resnet18", (3, 16, 16), 3)
    torch.save(model.state_dict(), tmp_path / "resnet18.pt")
    summary = run_cli(capsys, "cache", f"dataset={spec}", "teacher=timm:resnet18",
                      f"teacher_ckpt={tmp_path / 'resnet18.pt'}", "layers=layer3.1.act2,global_pool.flatten",
                      "pool=false", "scheduler=synchronous", f"cache={tmp_path / 'ckpt'}")
    assert summary["layers"] == {"layer3.1.act2": [256, 1, 1], "global_pool.flatten": [512]}
    cache = open_cache(tmp_path / "ckpt")
    x = torch.from_numpy(cache.open_dataset().inputs("test", 0, 4))
    with torch.inference_mode():
        expected = model.eval()(x).numpy()
    np.testing.assert_allclose(cache.raw_logits("test")[:4], expected, rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------- ONNX

class _Outputs(torch.nn.Module):
    """A torch teacher exported with its logits and its penultimate feature as graph outputs;
    ``nhwc``: taking channels-last images, as Keras models do."""

    def __init__(self, model: torch.nn.Module, nhwc: bool = False):
        super().__init__()
        from pipeline.teachers import Tapped

        self.tapped, self.nhwc = Tapped(model, ("embed",), True), nhwc

    def forward(self, x):
        logits, feats = self.tapped(x.permute(0, 3, 1, 2) if self.nhwc else x)
        return logits, feats["embed"]


def export_teacher(path: Path, nhwc: bool = False, seed: int = 0) -> Path:
    """A seeded cnn_small for digits as ONNX at ``path`` (its torch weights beside it, .pt):
    a copy of one export per (nhwc, seed) and process, as a dynamo export takes seconds. The
    graph keeps its weights in an external file, copied under the name the graph refers to."""
    source = _exported(nhwc, seed)
    shutil.copyfile(source, path)
    shutil.copyfile(source.with_suffix(".pt"), path.with_suffix(".pt"))
    shutil.copyfile(source.with_name(f"{source.name}.data"), path.with_name(f"{source.name}.data"))
    return path


_EXPORT_DIRS: list[Path] = []
atexit.register(lambda: [shutil.rmtree(d, ignore_errors=True) for d in _EXPORT_DIRS])


@functools.cache
def _exported(nhwc: bool, seed: int) -> Path:
    import contextlib
    import io
    import warnings

    work = Path(tempfile.mkdtemp(prefix="kdcache-onnx-teacher-"))  # outside every test's tmp dir
    _EXPORT_DIRS.append(work)
    path = work / "teacher.onnx"
    torch.manual_seed(seed)
    model = create_teacher("cnn_small", (1, 8, 8), 10).eval()
    torch.save(model.state_dict(), path.with_suffix(".pt"))
    example = torch.zeros((2, 8, 8, 1) if nhwc else (2, 1, 8, 8))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(_Outputs(model, nhwc), (example,), str(path), dynamo=True,
                          input_names=["image"], output_names=["logits", "embed"],
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    assert sorted(p.name for p in work.iterdir()) == ["teacher.onnx", "teacher.onnx.data", "teacher.pt"]
    return path


@pytest.mark.parametrize("nhwc", [False, True], ids=["NCHW", "NHWC"])
def test_onnx_teacher_caches_what_its_torch_source_does(nhwc, tmp_path, capsys):
    onnx_path = export_teacher(tmp_path / "teacher.onnx", nhwc)
    common = ["dataset=digits", "scheduler=synchronous"]
    from_onnx = run_cli(capsys, "cache", *common, "teacher=onnx", f"teacher_ckpt={onnx_path}",
                        f"cache={tmp_path / 'onnx'}")
    run_cli(capsys, "cache", *common, "teacher=cnn_small", f"teacher_ckpt={onnx_path.with_suffix('.pt')}",
            f"cache={tmp_path / 'torch'}")
    a, b = open_cache(tmp_path / "onnx"), open_cache(tmp_path / "torch")
    assert from_onnx["layers"] == {"embed": [128]}  # the graph's other output, tapped by default
    for split in ("train", "val", "test"):
        assert np.array_equal(a.sample_ids(split), b.sample_ids(split))
        np.testing.assert_allclose(a.raw_logits(split), b.raw_logits(split), atol=1e-2, rtol=1e-2)
        np.testing.assert_allclose(a.features(split, "embed"), b.features(split, "embed"), atol=1e-2, rtol=1e-2)
    assert a.teacher_fingerprint != b.teacher_fingerprint
    # the graph's initializers: the exporter folds BatchNorm into the convolutions before them
    assert 0.95 * b.manifest["teacher"]["num_params"] < a.manifest["teacher"]["num_params"] <= \
        b.manifest["teacher"]["num_params"]
    assert run_cli(capsys, "verify", f"cache={tmp_path / 'onnx'}")["ok"]
    row = run_cli(capsys, "student", f"cache={tmp_path / 'onnx'}", f"runs_dir={tmp_path / 'runs'}",
                  "model=cnn_small", "epochs=1")
    assert row["teacher_fingerprint"] == a.teacher_fingerprint


def test_an_onnx_teacher_that_records_other_preprocessing_is_refused(tmp_path, capsys):
    import onnx

    path = export_teacher(tmp_path / "teacher.onnx")
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {"kdcache.preprocessing": json.dumps({"mean": [0.5], "std": [0.2]})})
    onnx.save(model, str(tmp_path / "marked.onnx"))
    capsys.readouterr()
    assert main(["cache", "dataset=digits", "teacher=onnx", f"teacher_ckpt={tmp_path / 'marked.onnx'}",
                 f"cache={tmp_path / 'c'}"]) == 2
    assert "expects inputs normalised with mean [0.5]" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------------- layers=none

@pytest.mark.parametrize("teacher", ["cnn_small", "timm:resnet18", "onnx"])
def test_layers_none_caches_logits_only(teacher, tmp_path, capsys):
    ckpt = str(export_teacher(tmp_path / "t.onnx")) if teacher == "onnx" else "random"
    dataset = "synthetic:300:3x16x16:3" if teacher.startswith("timm") else "digits"
    summary = run_cli(capsys, "cache", f"dataset={dataset}", f"teacher={teacher}", f"teacher_ckpt={ckpt}",
                      "layers=none", "scheduler=synchronous", f"cache={tmp_path / 'c'}")
    assert summary["layers"] == {}
    assert not list((tmp_path / "c" / fmt.ARRAYS / "train").glob("features*"))
    row = run_cli(capsys, "student", f"cache={tmp_path / 'c'}", f"runs_dir={tmp_path / 'runs'}",
                  "model=mlp", "loss=kd", "epochs=1")
    assert row["loss"] == "kd"
    capsys.readouterr()
    assert main(["student", f"cache={tmp_path / 'c'}", f"runs_dir={tmp_path / 'runs'}", "model=logreg"]) == 2
    assert "holds no features (it was built with layers=none)" in capsys.readouterr().err


def test_registry_errors_name_the_plugin(plugin):
    with pytest.raises(KdError, match=r"student myplug:nothing: module myplug has no 'nothing'"):
        STUDENTS.get("myplug:nothing")


def test_an_untraceable_teacher_caches_with_layers_none(plugin, tmp_path, capsys):
    args = ["cache", "dataset=myplug:blobs:300", "teacher=myplug:branchy", "teacher_ckpt=random",
            "scheduler=synchronous"]
    capsys.readouterr()
    assert main([*args, f"cache={tmp_path / 'a'}"]) == 2
    err = capsys.readouterr().err
    assert "_Branchy cannot be traced by torch.fx" in err and "cache it with layers=none" in err
    assert not (tmp_path / "a").exists()
    summary = run_cli(capsys, *args, "layers=none", f"cache={tmp_path / 'b'}")
    assert summary["layers"] == {} and summary["rows"]["test"] == 100


def test_an_interrupted_onnx_build_resumes_byte_identical(tmp_path, monkeypatch, capsys):
    """The ONNX teacher runs through the same shards as a torch teacher: a crash mid-build
    resumes, computing only the missing shards, into the bytes of an uninterrupted build."""
    from conftest import FailOnCall
    from pipeline.cache import shard
    from test_cache import tree_bytes

    path = export_teacher(tmp_path / "teacher.onnx")
    args = ["dataset=digits", "teacher=onnx", f"teacher_ckpt={path}", "shard_size=256",
            "scheduler=synchronous"]
    real = shard.compute_shard
    monkeypatch.setattr(shard, "compute_shard", FailOnCall(real, fail_on=3))
    capsys.readouterr()
    from stages import cache as cache_stage

    with pytest.raises(RuntimeError, match="simulated crash"):
        cache_stage.main([*args, f"cache={tmp_path / 'resumed'}"])
    spy = FailOnCall(real)
    monkeypatch.setattr(shard, "compute_shard", spy)
    run_cli(capsys, "cache", *args, f"cache={tmp_path / 'resumed'}")
    shards = sum(open_cache(tmp_path / "resumed").manifest["splits"][s]["shards"] for s in ("train", "val", "test"))
    assert len(spy.calls) == shards - 2  # the two finished before the crash are kept
    monkeypatch.setattr(shard, "compute_shard", real)
    run_cli(capsys, "cache", *args, f"cache={tmp_path / 'fresh'}")
    assert tree_bytes(tmp_path / "resumed", fmt.ARRAYS, fmt.INDEX) == tree_bytes(tmp_path / "fresh", fmt.ARRAYS, fmt.INDEX)


def test_a_timm_model_fx_cannot_trace_is_tapped_through_its_stages(tmp_path, capsys, monkeypatch):
    """Where torch.fx fails, timm's forward_intermediates taps the model's stages: the same
    features as the traced graph gives (here tracing is made to fail; the model is real)."""
    timm_models = pytest.importorskip("timm.models")

    spec = ["dataset=synthetic:300:3x16x16:3", "teacher=timm:resnet18", "teacher_ckpt=random",
            "scheduler=synchronous", "pool=false"]
    traced = run_cli(capsys, "cache", *spec, "layers=layer3.1.act2,global_pool.flatten",
                     f"cache={tmp_path / 'traced'}")

    def untraceable(model, *args, **kwargs):
        raise RuntimeError("symbolically traced variables cannot be used as inputs to control flow")

    monkeypatch.setattr(timm_models, "get_graph_node_names", untraceable)
    staged = run_cli(capsys, "cache", *spec, "layers=layer3,pre_logits", f"cache={tmp_path / 'staged'}")
    assert staged["layers"] == {"layer3": traced["layers"]["layer3.1.act2"],
                                "pre_logits": traced["layers"]["global_pool.flatten"]}
    a, b = open_cache(tmp_path / "traced"), open_cache(tmp_path / "staged")
    np.testing.assert_array_equal(a.raw_logits("test"), b.raw_logits("test"))
    np.testing.assert_array_equal(a.features("test", "layer3.1.act2"), b.features("test", "layer3"))
    np.testing.assert_array_equal(a.features("test", "global_pool.flatten"), b.features("test", "pre_logits"))
    default = run_cli(capsys, "cache", *spec[:-1], f"cache={tmp_path / 'default'}")
    assert list(default["layers"]) == ["pre_logits"]


class _ChannelsLastMap(torch.nn.Module):
    """A Keras-like graph: NHWC images in, logits and an NHWC feature map out."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        from pipeline.teachers import Tapped

        self.tapped = Tapped(model, ("block3.2",), pool=False)

    def forward(self, x):
        logits, feats = self.tapped(x.permute(0, 3, 1, 2))
        return logits, feats["block3.2"].permute(0, 2, 3, 1)


def test_an_nhwc_feature_map_is_pooled_over_its_spatial_axes(tmp_path, capsys):
    import contextlib
    import io
    import warnings

    torch.manual_seed(0)
    model = create_teacher("cnn_small", (1, 8, 8), 10).eval()
    torch.save(model.state_dict(), tmp_path / "t.pt")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(_ChannelsLastMap(model), (torch.zeros(2, 8, 8, 1),), str(tmp_path / "t.onnx"),
                          dynamo=True, input_names=["image"], output_names=["logits", "map"],
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    common = ["dataset=digits", "scheduler=synchronous", "dtype=float32"]
    run_cli(capsys, "cache", *common, "teacher=onnx", f"teacher_ckpt={tmp_path / 't.onnx'}",
            "layers=map", f"cache={tmp_path / 'onnx'}")
    run_cli(capsys, "cache", *common, "teacher=cnn_small", f"teacher_ckpt={tmp_path / 't.pt'}",
            "layers=block3.2", f"cache={tmp_path / 'torch'}")
    a, b = open_cache(tmp_path / "onnx"), open_cache(tmp_path / "torch")
    assert a.manifest["layers"]["map"] == b.manifest["layers"]["block3.2"]  # (channels,) both
    np.testing.assert_allclose(a.features("test", "map"), b.features("test", "block3.2"), atol=1e-4, rtol=1e-4)
