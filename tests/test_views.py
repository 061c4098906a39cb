"""Views: augmentation-consistent multi-view caching.

1. The policies against independent references (numpy loops, torchvision's resized_crop), their
   identities, their parameter ranges, and the keyed random numbers behind them.
2. Caches with views: layout and format, view 0 equal to a single-view cache, byte-identical
   rebuilds and resumes, and — for every policy — the teacher on the replayed inputs giving the
   cached logits exactly (float32).
3. Students drawing views: the (sample_id, view) join, views=1 reading view 0 only, feature
   students on every view, fresh augmentation for label-only losses, what a run records.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import FailOnCall
from pipeline import augment as A
from pipeline import keyed_random
from pipeline import runtime
from pipeline.cache import format as fmt
from pipeline.cache import open_cache, shard
from pipeline.data import positions_of
from pipeline.students import StudentData
from pipeline.teachers import Tapped, TeacherSpec, build_teacher
from stages.cli import main as cli

IMAGE = (2, 7, 9)  # (C, H, W): not square, so a swapped axis shows
SIGNAL = (3, 11)  # (C, L)
FLAT = (13,)  # (L,)
POLICIES = ["shift:2", "crop:3", "flip", "rrc:0.3", "crop:2+flip", "shift:1+rrc:0.5+flip"]


# =========================================================================== references

def ref_translate(x: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """out[..., i, j] = x[..., i - dy, j - dx], 0 outside: a loop over every output position."""
    out = np.zeros_like(x)
    for b in range(len(x)):
        spatial = x.shape[-offsets.shape[1]:]
        for index in np.ndindex(*spatial):
            source = tuple(i - d for i, d in zip(index, offsets[b]))
            if all(0 <= s < n for s, n in zip(source, spatial)):
                out[(b, Ellipsis, *index)] = x[(b, Ellipsis, *source)]
    return out


def reference(spec: str, x: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Each policy from its documented definition, independently of pipeline.augment."""
    from torchvision.transforms.v2 import functional as TF

    at = 0
    for part in spec.split("+"):
        name, _, arg = part.partition(":")
        axes = 2 if x.ndim == 4 else 1
        if name == "shift":
            x = ref_translate(x, params[:, at:at + axes]); at += axes
        elif name == "crop":
            p = int(arg)
            pad = [(0, 0)] * (x.ndim - axes) + [(p, p)] * axes
            padded = np.pad(x, pad)
            o = params[:, at:at + axes]; at += axes
            x = np.stack([padded[(b, Ellipsis, *[slice(o[b, k], o[b, k] + x.shape[x.ndim - axes + k])
                                                  for k in range(axes)])] for b in range(len(x))])
        elif name == "flip":
            x = np.stack([x[b, ..., ::-1] if params[b, at] else x[b] for b in range(len(x))]); at += 1
        elif name == "rrc":
            H, W = x.shape[-2:]
            x = np.stack([TF.resized_crop(torch.from_numpy(x[b].copy()), *map(int, params[b, at:at + 4]),
                                          size=[H, W], antialias=False).numpy() for b in range(len(x))])
            at += 4
    return x


@pytest.mark.parametrize("spec", POLICIES)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 9))
def test_policies_match_their_references(spec, seed, n):
    shapes = [IMAGE] if "flip" in spec or "rrc" in spec else [IMAGE, SIGNAL, FLAT]
    for shape in shapes:
        policy = A.parse(spec, shape)
        x = np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)
        params = policy.sample(keyed_random.KeyedRandom(keyed_random.key(seed, np.arange(n))), n)
        assert params.shape == (n, len(policy.columns))
        got = policy.apply(torch.from_numpy(x), torch.from_numpy(params)).numpy()
        want = reference(spec, x, params)
        if "rrc" in spec:  # both interpolate bilinearly; torchvision may round differently
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_array_equal(got, want)  # translations and flips are exact copies


@pytest.mark.parametrize("spec", POLICIES)
def test_identity_parameters_leave_inputs_unchanged(spec):
    policy = A.parse(spec, IMAGE)
    x = torch.randn(5, *IMAGE)
    assert torch.equal(policy.apply(x, torch.from_numpy(policy.identity(5))), x)


@pytest.mark.parametrize("spec", POLICIES)
def test_parameters_stay_in_range_and_fit_int16(spec):
    policy = A.parse(spec, IMAGE)
    params = policy.sample(np.random.default_rng(0), 4000)
    assert np.abs(params).max() < 2**15
    H, W = IMAGE[1:]
    at = 0
    for part in spec.split("+"):
        name, _, arg = part.partition(":")
        if name == "shift":
            block = params[:, at:at + 2]; at += 2
            assert block.min() == -int(arg) and block.max() == int(arg)  # both ends are reached
        elif name == "crop":
            block = params[:, at:at + 2]; at += 2
            assert block.min() == 0 and block.max() == 2 * int(arg)
        elif name == "flip":
            assert set(params[:, at]) == {0, 1} and 0.45 < params[:, at].mean() < 0.55; at += 1
        elif name == "rrc":
            top, left, h, w = params[:, at:at + 4].T; at += 4
            assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
            assert (h >= 1).all() and (w >= 1).all() and len(set(zip(h, w))) > 3


def test_policies_run_on_the_device_they_are_given():
    policy = A.parse("crop:2+flip", IMAGE)
    x = torch.randn(4, *IMAGE, dtype=torch.float64)
    out = policy.apply(x, torch.from_numpy(policy.sample(np.random.default_rng(1), 4)))
    assert out.dtype == x.dtype and out.device == x.device and out.shape == x.shape


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), ids=st.lists(st.integers(0, 2**62), min_size=1, max_size=40,
                                                    unique=True), view=st.integers(0, 255))
def test_keyed_random_depends_only_on_the_key(seed, ids, view):
    """Any worker draws any row's numbers alone: a subset, in any order, draws the same."""
    ids = np.array(ids, np.int64)
    full = keyed_random.view_random(seed, "train", ids, view)
    a, b = full.random(), full.integers(-3, 4)
    order = np.random.default_rng(seed).permutation(len(ids))
    part = keyed_random.view_random(seed, "train", ids[order], view)
    np.testing.assert_array_equal(part.random(), a[order])
    np.testing.assert_array_equal(part.integers(-3, 4), b[order])
    assert ((0 <= a) & (a < 1)).all() and ((-3 <= b) & (b < 4)).all()
    other = keyed_random.view_random(seed, "train", ids, view + 1).random()
    assert len(ids) < 3 or not np.array_equal(other, a)


def test_keyed_random_is_uniform_enough():
    draws = keyed_random.KeyedRandom(keyed_random.key(7, np.arange(200_000))).integers(0, 10)
    counts = np.bincount(draws, minlength=10)
    assert counts.min() > 19_400 and counts.max() < 20_600  # ±3% of 20,000


@pytest.mark.parametrize("spec, shape, match", [
    ("flip", SIGNAL, "flip applies only to images"), ("rrc:0.5", FLAT, "rrc applies only to images"),
    ("shift:-1", IMAGE, "shift:-1 is malformed"), ("crop:x", IMAGE, "crop:x is malformed"),
    ("rrc:1.5", IMAGE, "rrc:1.5 is malformed"), ("flip:1", IMAGE, "flip:1 is malformed"),
    ("blur", IMAGE, "unknown augmentation policy 'blur'"), ("shift:1+", IMAGE, "is malformed"),
])
def test_bad_policies_are_refused_with_the_key(spec, shape, match):
    from pipeline.errors import KdError

    with pytest.raises(KdError, match=f"^augment={spec.replace('+', '[+]')}: .*{match}"):
        A.parse(spec, shape)


# =========================================================================== caches with views

def build_views(builder, root: Path, spec: str = "crop:1+flip", views: int = 4, **overrides) -> Path:
    """A tiny cache (synthetic 1x8x8, 240 train rows) with ``views`` views, 64 rows per shard."""
    builder(root, views=views, augment=spec, shard_size=64, **overrides)
    return root


@pytest.fixture(scope="module")
def views_cache(tmp_path_factory, builder) -> Path:
    work = tmp_path_factory.mktemp("views")
    return build_views(builder, work / "cache", dtype="float32", threads=1, streams=1)


def test_layout_format_and_manifest(views_cache):
    cache = open_cache(views_cache)
    m = cache.manifest
    assert m["format_version"] == 2 and m["views"] == 4
    assert m["augment"] == {"policy": "crop:1+flip", "params": ["crop_y", "crop_x", "flip"],
                            "seed": 0, "rng": "splitmix64-v1", "dtype": "int16"}
    assert (cache.views("train"), cache.views("val"), cache.views("test")) == (4, 1, 1)
    assert m["shard_size"] == 64 and m["splits"]["train"]["shards"] == 4
    params = cache.augment_params("train")
    assert params.shape == (240, 4, 3) and params.dtype == np.int16
    np.testing.assert_array_equal(params[:, 0], np.tile([[1, 1, 0]], (240, 1)))  # view 0: as is
    assert len({tuple(p) for p in params[:, 1:].reshape(-1, 3)}) > 5
    record = m["shards"]["train"][0]
    assert set(record["sha256"]) == {"train/logits", "train/features/embed", "train/augment"}
    assert not (views_cache / fmt.ARRAYS / "val" / "augment").exists()


def test_a_single_view_cache_is_written_as_format_1(small_cache):
    m = json.loads((small_cache / fmt.MANIFEST).read_text())
    assert m["format_version"] == 1 and m["views"] == 1 and "augment" not in m
    assert all("views" not in s for s in m["splits"].values())


def test_view_0_is_the_single_view_cache(views_cache, small_cache):
    """Same teacher, inputs and batches: view 0 of every row is byte-identical to the cache
    built without views, and val and test are the same arrays."""
    multi, single = open_cache(views_cache), open_cache(small_cache)
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(multi.stored(fmt.logits_key(split), 0, multi.num_rows(split))[:, 0],
                                      single.stored(fmt.logits_key(split), 0, single.num_rows(split))[:, 0])
        assert multi.index(split).equals(single.index(split))


def test_rebuilds_and_resumes_are_byte_identical(views_cache, builder, tmp_path, monkeypatch):
    from test_faults import array_files

    again = build_views(builder, tmp_path / "again", dtype="float32", threads=1, streams=1)
    assert array_files(again) == array_files(views_cache)
    crashed = tmp_path / "crashed"
    monkeypatch.setattr(shard, "compute_shard", FailOnCall(shard.compute_shard, fail_on=3))
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_views(builder, crashed, dtype="float32", threads=1, streams=1)
    monkeypatch.undo()
    assert fmt.read_manifest(crashed)["status"] == "building"
    build_views(builder, crashed, dtype="float32", threads=1, streams=1)
    assert array_files(crashed) == array_files(views_cache)


@pytest.mark.parametrize("spec", POLICIES)
def test_teacher_on_replayed_inputs_gives_the_cached_logits_exactly(spec, builder, tmp_path):
    """For every policy: rebuild each view's inputs from the original inputs and the stored
    parameters, run the teacher on the builder's batches, get the cached logits bit for bit."""
    root = build_views(builder, tmp_path / "cache", spec=spec, views=3, dtype="float32", threads=1,
                       streams=1, infer_batch_size=32)
    cache = open_cache(root)
    dataset = cache.open_dataset()
    policy = A.parse(cache.augment["policy"], dataset.input_shape)
    t = cache.manifest["teacher"]
    model = Tapped(build_teacher(TeacherSpec(t["arch"], tuple(t["input_shape"]), t["num_classes"],
                                             t["ckpt"], t["seed"])), tuple(cache.layers), True).eval()
    params = cache.augment_params("train").astype(np.int64)
    logits = cache.stored(fmt.logits_key("train"), 0, cache.num_rows("train"))
    shard_rows, n = cache.manifest["shard_size"], cache.num_rows("train")
    with runtime.torch_threads(1), torch.inference_mode():
        for start in range(0, n, shard_rows):
            for a in range(start, min(n, start + shard_rows), 32):
                b = min(a + 32, start + shard_rows, n)
                x = torch.from_numpy(dataset.inputs("train", a, b))
                for v in range(3):
                    xv = x if v == 0 else policy.apply(x, torch.from_numpy(params[a:b, v]))
                    assert torch.equal(model(xv)[0], torch.from_numpy(logits[a:b, v])), (a, v)
                    assert v == 0 or not torch.equal(xv, x)  # an augmented view is not the input


def test_students_see_the_input_the_teacher_saw_for_each_logit(views_cache):
    """The training stream pairs each row's drawn view's logits with that view's replayed
    input: the teacher on the yielded input gives the yielded logits (float32 cache)."""
    cache = open_cache(views_cache)
    data = StudentData(cache)
    t = cache.manifest["teacher"]
    model = build_teacher(TeacherSpec(t["arch"], tuple(t["input_shape"]), t["num_classes"], t["ckpt"], t["seed"]))
    batches = data.input_batches(batch_size=50, seed=3, logits=True)
    seen_views = set()
    with torch.inference_mode():
        for epoch in range(2):
            for x, y, targets in batches(epoch):
                np.testing.assert_allclose(model(torch.from_numpy(x)).numpy(), targets["z_t"],
                                           rtol=1e-5, atol=1e-5)
    # and the views drawn per row vary with the epoch, deterministically
    ids = cache.sample_ids("train")
    for epoch in range(3):
        views = data.view_of(3, epoch)(0, len(ids))
        np.testing.assert_array_equal(views, data.view_of(3, epoch)(0, len(ids)))
        seen_views |= set(views.tolist())
    assert seen_views == {0, 1, 2, 3}


@pytest.mark.parametrize("shuffled", [False, True])
def test_stream_joins_rows_by_sample_id_and_view(views_cache, tmp_path, shuffled):
    """Logits, features and augmentation parameters of a streamed row are those of its
    (sample_id, view), also in a cache whose rows were physically permuted."""
    from test_stage_two import shuffle_cache_rows

    root = views_cache
    if shuffled:
        root = tmp_path / "shuffled"
        shutil.copytree(views_cache, root)
        shuffle_cache_rows(root, seed=5)
        import zarr  # the augmentation array moves with its rows too

        group = zarr.open_group(root / fmt.ARRAYS, mode="r+")
        rng = np.random.default_rng(5)
        perm = rng.permutation(240)
        group["train/augment"][:] = group["train/augment"][:][perm]
    cache = open_cache(root)
    ids = cache.sample_ids("train")
    by_row = {v: cache.raw_logits("train", v) for v in range(4)}
    params = cache.augment_params("train")
    data = StudentData(cache)
    view_of = data.view_of(1, 0)
    for b in cache.stream("train", batch_size=40, view_of=view_of, augment=True, layers=("embed",), seed=2):
        rows = positions_of(ids, b.sample_id)
        for i, (row, view) in enumerate(zip(rows, b.view)):
            np.testing.assert_array_equal(b.logits[i], by_row[int(view)][row])
            np.testing.assert_array_equal(b.augment[i], params[row, view])
        np.testing.assert_array_equal(b.view, view_of(0, len(ids))[rows])


def test_verify_replays_views_and_catches_wrong_parameters(views_cache, tmp_path, capsys):
    assert cli(["verify", f"cache={views_cache}", "rows=40", "--json"]) == 0
    checks = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["checks"]
    assert checks["augmentation parameters"] == "ok (240 rows x 4 views)"
    assert "each at a random view" in checks["teacher fidelity"]
    # Parameters written wrong but self-consistent (checksums recomputed): verify says so.
    import hashlib

    import zarr

    bad = tmp_path / "bad"
    shutil.copytree(views_cache, bad)
    arr = zarr.open_group(bad / fmt.ARRAYS, mode="r+")["train/augment"]
    values = arr[:]
    values[:, 1:, 2] = 1 - values[:, 1:, 2]  # every augmented view's flip inverted
    arr[:] = values
    manifest = json.loads((bad / fmt.MANIFEST).read_text())
    for rec in manifest["shards"]["train"]:
        rec["sha256"]["train/augment"] = hashlib.sha256(values[rec["start"]:rec["stop"]].tobytes()).hexdigest()
    fmt.write_manifest(bad, manifest)
    assert cli(["verify", f"cache={bad}", "rows=60", "--json"]) == 1
    checks = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["checks"]
    assert checks["shard checksums"] == "ok"
    assert checks["augmentation parameters"].startswith("FAILED: 240 rows hold parameters other than")
    assert checks["teacher fidelity"].startswith("FAILED")


def test_info_shows_the_views(views_cache, capsys):
    assert cli(["info", f"cache={views_cache}", "--json"]) == 0
    out = capsys.readouterr().out
    assert "views      train 4 (view 0 as is, the rest augment=crop:1+flip, seed 0); val and test 1" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["views"] == {"train": 4, "val": 1, "test": 1} and summary["augment"] == "crop:1+flip"


def test_the_key_covers_views_policy_and_seed(views_cache, builder, tmp_path):
    """A build with other views or another policy is refused (nothing mixed into the cache),
    and the plan's key changes with each of views, policy and the augmentation seed."""
    import dataclasses

    from pipeline.cache.plan import plan
    from pipeline.config import CacheConfig
    from pipeline.settings import resolve
    from pipeline.data import open_dataset
    from pipeline.errors import KdError

    copy = tmp_path / "cache"
    shutil.copytree(views_cache, copy)
    for change in (dict(views=3), dict(spec="shift:1")):
        with pytest.raises(KdError, match="was built from other views"):
            build_views(builder, copy, dtype="float32", **{"views": 4, **change})
    cfg = resolve(CacheConfig, ["dataset=synthetic:300:1x8x8:3", "views=4", "augment=crop:1+flip"])
    dataset = open_dataset(cfg)
    spec = TeacherSpec("cnn_small", (1, 8, 8), 3, "random", fingerprint="f")
    shapes = {"logits": (3,), "embed": (128,)}

    def key(**changes):
        return plan(dataclasses.replace(cfg, **changes), dataset, spec, shapes, 1)["key"]

    keys = {key(), key(views=3), key(augment="shift:1"), key(seed=1), key(views=1, augment="none")}
    assert len(keys) == 5


# =========================================================================== students and views

def run(capsys, cache: Path, tmp: Path, *args: str) -> dict:
    capsys.readouterr()
    rc = cli(["student", f"cache={cache}", f"runs_dir={tmp}/runs", *args, "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_views_1_reads_view_0_only_and_all_draws_every_view(views_cache, tmp_path, capsys, monkeypatch):
    from pipeline.cache import TeacherCache

    calls = []
    original = TeacherCache.stream

    def spy(self, split, *args, **kwargs):
        calls.append(kwargs)
        return original(self, split, *args, **kwargs)

    monkeypatch.setattr(TeacherCache, "stream", spy)
    one = run(capsys, views_cache, tmp_path, "model=mlp", "loss=kd", "views=1", "epochs=2")
    assert one["views"] == 1 and one["augment"] == "none" and one["views_policy"] is None
    assert calls and all(c["view_of"] is None and not c["augment"] for c in calls)
    calls.clear()
    every = run(capsys, views_cache, tmp_path, "model=mlp", "loss=kd", "epochs=2")
    assert every["views"] == 4 and every["views_policy"] == "crop:1+flip" and every["augment"] == "none"
    assert calls and all(c["view_of"] is not None and c["augment"] for c in calls)
    config = json.loads((Path(every["run_dir"]) / "config.json").read_text())["config"]
    assert config["views"] == "4"


def test_feature_students_train_on_every_view(views_cache, tmp_path, capsys):
    data = StudentData(open_cache(views_cache))
    assert data.features("train").shape == (240 * 4, 128) and len(data.labels("train")) == 240 * 4
    np.testing.assert_array_equal(data.features("train")[::4], StudentData(
        open_cache(views_cache), views=1).features("train"))
    assert data.features("val").shape == (30, 128)
    for model in ("linear_svc", "logreg_soft", "sgd"):
        from conftest import declared

        row = run(capsys, views_cache, tmp_path, f"model={model}", *declared(model, epochs=2))
        assert row["views"] == 4 and 0 <= row["test_accuracy"] <= 1


def test_fresh_augmentation_for_label_only_students(views_cache, tmp_path, capsys):
    row = run(capsys, views_cache, tmp_path, "model=mlp", "loss=ce", "augment=crop:1", "epochs=2")
    assert (row["views"], row["augment"], row["loss"]) == (1, "crop:1", "ce")


def test_teacher_augment_auto_keeps_flat_rows_as_they_are():
    from pipeline.config import TeacherConfig
    from pipeline.data import open_dataset
    from pipeline.teacher_training import teacher_policy

    for spec, expected in [("synthetic:300:16:3", None), ("synthetic:300:2x16:3", "shift:1"),
                           ("synthetic:300:1x8x8:3", "shift:1")]:
        policy = teacher_policy(TeacherConfig(dataset=spec), open_dataset(TeacherConfig(dataset=spec)))
        assert (policy.spec if policy else None) == expected
    cfg = TeacherConfig(dataset="synthetic:300:1x8x8:3", teacher_augment="crop:2+flip")
    assert teacher_policy(cfg, open_dataset(cfg)).spec == "crop:2+flip"


def test_the_documented_generator_draws_the_stored_parameters(views_cache):
    """docs/CACHE_FORMAT.md's generator, in plain Python integers, draws exactly the parameters
    the cache stores (crop:1+flip: crop_y, crop_x in [0, 3), then flip in [0, 2))."""
    M = (1 << 64) - 1
    gamma = 0x9E3779B97F4A7C15

    def mix(z):
        z ^= z >> 30
        z = (z * 0xBF58476D1CE4E5B9) & M
        z ^= z >> 27
        z = (z * 0x94D049BB133111EB) & M
        return z ^ (z >> 31)

    cache = open_cache(views_cache)
    params = cache.augment_params("train")
    for row, sample_id in list(enumerate(cache.sample_ids("train")))[:40]:
        for view in range(1, 4):
            key = 0
            for part in (cache.augment["seed"], 0, int(sample_id), view):
                key = mix((key + gamma + part) & M)
            draws = [(mix((key + d * gamma) & M) >> 11) * 2.0 ** -53 for d in (1, 2, 3)]
            expected = [int(draws[0] * 3), int(draws[1] * 3), int(draws[2] * 2)]
            assert params[row, view].tolist() == expected, (row, view)


def test_shards_and_chunks_stay_bounded_whatever_the_views():
    from types import SimpleNamespace

    from pipeline.cache.plan import MAX_CHUNK_BYTES, MAX_SHARD_BYTES, resolve_layout
    from pipeline.config import CacheConfig
    from pipeline.settings import resolve

    dataset = SimpleNamespace(splits={"train": range(100_000), "val": range(10_000), "test": range(10_000)})
    shapes = {"logits": (1000,), "layer4": (2048,)}  # a resnet50 teacher: 6 KB per float16 output
    single = resolve_layout(resolve(CacheConfig, []), dataset, shapes)
    assert (single.chunk_size, single.shard_size) == (256, 4096)  # as without views
    for views in (4, 32, 256):
        cfg = resolve_layout(resolve(CacheConfig, [f"views={views}", "augment=crop:4+flip"]), dataset, shapes)
        row = views * 2 * 3048
        assert cfg.shard_size * row <= MAX_SHARD_BYTES or cfg.shard_size == cfg.chunk_size
        assert cfg.chunk_size * row <= MAX_CHUNK_BYTES or cfg.chunk_size == 1
        assert cfg.shard_size % cfg.chunk_size == 0
    from pipeline.errors import KdError

    explicit = resolve(CacheConfig, ["views=32", "augment=shift:1", "chunk_size=256"])
    with pytest.raises(KdError, match=r"chunk_size=256 with views=32 makes chunks of 47.6 MiB .*chunk_size <= 21"):
        resolve_layout(explicit, dataset, shapes)
