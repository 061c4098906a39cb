"""Config resolution: defaults < config=FILE.yaml < key=value, typed and checked."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.config import (CacheConfig, DataConfig, ExportConfig, InfoConfig, ReportConfig, StudentConfig,
                             SweepConfig, TeacherConfig, VerifyConfig)
from pipeline.errors import KdError
from pipeline.settings import resolve


@pytest.mark.parametrize(
    ("arg", "field", "expected"),
    [
        ("pool=false", "pool", False),
        ("pool=No", "pool", False),
        ("pool=0", "pool", False),
        ("overwrite=true", "overwrite", True),
        ("overwrite=YES", "overwrite", True),
        ("overwrite=on", "overwrite", True),
        ("epochs=7", "epochs", 7),
        ("epochs= 12 ", "epochs", 12),
        ("temperature=2.5", "temperature", 2.5),
        ("temperature=3", "temperature", 3.0),
        ("lr=1e-4", "lr", 1e-4),
        ("dataset=npz:/tmp/a=b.npz", "dataset", "npz:/tmp/a=b.npz"),
        ("layers=embed", "layers", ("embed",)),
        ("layers=block2,embed", "layers", ("block2", "embed")),
        ("layers=", "layers", ()),
    ],
)
def test_key_value_coercion(arg, field, expected):
    cfg = resolve(CacheConfig, [arg])
    value = getattr(cfg, field)
    assert value == expected
    assert type(value) is type(expected)


def test_defaults_without_overrides():
    cfg = resolve(CacheConfig, [])
    assert cfg == dataclasses.replace(CacheConfig(), cache_root=str(Path.cwd() / "data/caches"),
                                      teacher_dir=str(Path.cwd() / "data/teachers"),
                                      data_root=str(Path.cwd() / "data/datasets"))
    assert cfg.dtype == "float16" and cfg.layers == () and cfg.chunk_size == 0  # auto: resolved per dataset


def test_unknown_key_is_named():
    with pytest.raises(KdError, match=r"unknown key 'colour' for `kdcache cache`") as info:
        resolve(CacheConfig, ["colour=red"], verb="cache")
    # the message lists the keys that do exist, so the user can fix a typo
    assert "dataset" in str(info.value) and "shard_size" in str(info.value)


def test_key_of_another_stage_is_unknown():
    # `info` has no teacher-training keys: they must not be silently accepted
    with pytest.raises(KdError, match="unknown key 'epochs'"):
        resolve(InfoConfig, ["epochs=3"], verb="info")


@pytest.mark.parametrize(
    ("arg", "expects"),
    [
        ("epochs=many", "an integer"),
        ("epochs=2.5", "an integer"),
        ("epochs=true", "an integer"),
        ("temperature=hot", "a finite number"),
        ("temperature=nan", "a finite number"),
        ("temperature=inf", "a finite number"),
        ("pool=maybe", "true or false"),
    ],
)
def test_wrong_type_is_an_error(arg, expects):
    key = arg.partition("=")[0]
    with pytest.raises(KdError, match=f"{key}=.* is not valid: {key} expects {expects}"):
        resolve(CacheConfig, [arg])


@pytest.mark.parametrize("arg", ["dataset", "=digits", "--dataset"])
def test_argument_that_is_not_key_value(arg):
    with pytest.raises(KdError, match="is not key=value"):
        resolve(CacheConfig, [arg])


def test_yaml_file_then_overrides_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("dataset: synthetic:100:8:2\ntemperature: 3\nepochs: 5\npool: false\nlayers: [embed, head]\n")
    # key=value arguments win whether they come before or after config=FILE
    for args in (["temperature=2", f"config={path}"], [f"config={path}", "temperature=2"]):
        cfg = resolve(CacheConfig, args)
        assert cfg.temperature == 2.0
        assert cfg.dataset == "synthetic:100:8:2"
        assert cfg.epochs == 5
        assert cfg.pool is False
        assert cfg.layers == ("embed", "head")


def test_yaml_values_are_type_checked(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: [1, 2]\n")
    with pytest.raises(KdError, match="epochs=.* is not valid"):
        resolve(CacheConfig, [f"config={path}"])
    path.write_text("shard_sise: 10\n")
    with pytest.raises(KdError, match="unknown key 'shard_sise'"):
        resolve(CacheConfig, [f"config={path}"])


@pytest.mark.parametrize(
    ("text", "match"),
    [(None, "does not exist"), ("a: [1, 2\n", "not valid YAML"), ("- 1\n- 2\n", "mapping")],
)
def test_bad_config_file(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(KdError, match=match):
        resolve(CacheConfig, [f"config={path}"])


def test_config_is_frozen():
    cfg = resolve(CacheConfig, ["temperature=2"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.temperature = 3.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("cls", "arg", "match"),
    [
        (CacheConfig, "temperature=0", "temperature=0.0 must be > 0"),
        (CacheConfig, "temperature=-1", "must be > 0"),
        (CacheConfig, "chunk_size=256 shard_size=100", "shard_size=100 must be a multiple of chunk_size=256"),
        (CacheConfig, "chunk_size=-1", r"chunk_size=-1 must be >= 0 \(0 = auto\)"),
        (CacheConfig, "dtype=bfloat16", "dtype='bfloat16' is not supported"),
        (CacheConfig, "threads=-1", "threads=-1 must be >= 0"),
        (CacheConfig, "workers=0", "workers=0 must be > 0"),
        (TeacherConfig, "epochs=0", "epochs=0 must be > 0"),
        (TeacherConfig, "weight_decay=-0.1", "weight_decay=-0.1 must be >= 0"),
        (DataConfig, "val_fraction=0", "val_fraction=0.0 must be in"),
        (DataConfig, "val_fraction=0.95", "val_fraction=0.95 must be in"),
        (VerifyConfig, "rows=-1", "rows=-1 must be >= 0"),
        (TeacherConfig, "threads=-1", r"threads=-1 must be >= 0 \(0 = auto\)"),
        (StudentConfig, "threads=-2", r"threads=-2 must be >= 0 \(0 = auto\)"),
        (VerifyConfig, "threads=-1", r"threads=-1 must be >= 0 \(0 = auto\)"),
        (ExportConfig, "run=x threads=-1", r"threads=-1 must be >= 0 \(0 = auto\)"),
    ],
)
def test_check_range_errors(cls, arg, match):
    with pytest.raises(KdError, match=match):
        resolve(cls, arg.split())


@given(chunk=st.integers(1, 64), factor=st.integers(1, 16), extra=st.integers(1, 63))
def test_shard_size_must_be_a_multiple_of_chunk_size(chunk, factor, extra):
    cfg = resolve(CacheConfig, [f"chunk_size={chunk}", f"shard_size={chunk * factor}"])
    assert cfg.shard_size == chunk * factor
    if extra % chunk:
        with pytest.raises(KdError, match="must be a multiple of chunk_size"):
            resolve(CacheConfig, [f"chunk_size={chunk}", f"shard_size={chunk * factor + extra}"])


@given(value=st.integers(-(2**40), 2**40))
def test_integer_round_trip(value):
    assert resolve(CacheConfig, [f"seed={value}"]).seed == value


def test_error_message_is_one_line():
    with pytest.raises(KdError) as info:
        resolve(CacheConfig, ["temperature=not\na\nnumber"])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text", ["none", "None", "", " none "])
def test_optional_fields_take_none(text):
    from pipeline.students import student_config

    assert student_config(["model=mlp", f"temperature={text}"]).param("temperature") is None
    assert student_config(["model=mlp", "temperature=2"]).param("temperature") == 2.0


def test_yaml_null_is_none_only_for_optional_fields(tmp_path):
    from pipeline.students import student_config

    path = tmp_path / "run.yaml"
    path.write_text("model: mlp\ntemperature: null\nloss: null\n")
    cfg = student_config([f"config={path}"])
    assert cfg.param("temperature") is None and cfg.loss == "kd"  # loss: null = the default
    path.write_text("model: mlp\nepochs: null\n")
    with pytest.raises(KdError, match="epochs has no value"):
        student_config([f"config={path}"])


def test_paths_are_stored_absolute(tmp_path, monkeypatch):
    """A config resolved in one directory means the same from any other."""
    from pipeline.config import StudentConfig

    monkeypatch.chdir(tmp_path)
    cfg = resolve(CacheConfig, ["dataset=npz:data/x.npz", "teacher_ckpt=w/t.pt", "cache=c"])
    assert cfg.dataset == f"npz:{tmp_path}/data/x.npz"
    assert cfg.teacher_ckpt == f"{tmp_path}/w/t.pt"
    assert cfg.cache == f"{tmp_path}/c"
    assert resolve(CacheConfig, ["teacher_dir=../teachers"]).teacher_dir == f"{tmp_path.parent}/teachers"
    assert cfg.cache_root == f"{tmp_path}/data/caches" and cfg.data_root == f"{tmp_path}/data/datasets"
    assert resolve(CacheConfig, ["dataset=imagefolder:imgs:64"]).dataset == f"imagefolder:{tmp_path}/imgs:64"
    # keywords, empty values and specs without a path stay as they are
    cfg = resolve(CacheConfig, ["teacher_ckpt=random", "dataset=synthetic:300:8"])
    assert cfg.teacher_ckpt == "random" and cfg.cache == "" and cfg.dataset == "synthetic:300:8"
    assert resolve(StudentConfig, ["runs_dir=runs"]).runs_dir == f"{tmp_path}/runs"


# --------------------------------------------------------------------------- keys that do not apply

def test_a_key_that_does_not_apply_is_refused_only_when_given(tmp_path):
    """dataset= finds the default cache; beside cache= it would be ignored, so it is refused,
    even at its default value, and from a config file too. Not given, it is no error."""
    msg = (r"^dataset=digits3 does not apply: cache=c decides the data; drop dataset= \(or drop "
           r"cache= to use the default cache of dataset/teacher under cache_root\)$")
    with pytest.raises(KdError, match=msg):
        resolve(StudentConfig, ["cache=c", "dataset=digits3"], verb="student")
    with pytest.raises(KdError, match="dataset=digits does not apply"):
        resolve(StudentConfig, ["dataset=digits", "cache=c"], verb="student")
    path = tmp_path / "run.yaml"
    path.write_text("dataset: digits3\n")
    with pytest.raises(KdError, match="dataset=digits3 does not apply"):
        resolve(StudentConfig, [f"config={path}", "cache=c"], verb="student")
    assert resolve(StudentConfig, ["cache=c"]).dataset == "digits"  # the default, unused: fine
    assert resolve(StudentConfig, ["dataset=digits3"]).dataset == "digits3"  # no cache=: it applies


@pytest.mark.parametrize(("cls", "args", "refused"), [
    (StudentConfig, ["cache=c", "teacher=mlp"], "teacher"),
    (SweepConfig, ["cache=c", "cache_root=r"], "cache_root"),
    (InfoConfig, ["cache=c", "teacher=mlp"], "teacher"),
    (VerifyConfig, ["cache=c", "dataset=digits3"], "dataset"),
    (ReportConfig, ["cache=c", "cache_root=r"], "cache_root"),
    (SweepConfig, ["seed=3", "grid.seed=0,1"], "seed"),
    (SweepConfig, ["model=mlp", "grid.model=logreg,mlp"], "model"),
    (SweepConfig, ["loss=kd", "grid.loss=kd,ce"], "loss"),
    (SweepConfig, ["views=2", "grid.views=1,2"], "views"),
    (SweepConfig, ["scheduler=tcp://h:8786", "workers=2"], "workers"),
    (CacheConfig, ["cache=c", "cache_root=r"], "cache_root"),
    (CacheConfig, ["teacher_ckpt=random", "lr=0.1"], "lr"),
    (CacheConfig, ["teacher_ckpt=w.pt", "teacher_dir=t"], "teacher_dir"),
    (CacheConfig, ["scheduler=tcp://h:8786", "streams=2"], "streams"),
    (CacheConfig, ["layers=none", "pool=false"], "pool"),
    (TeacherConfig, ["teacher_ckpt=w.pt"], "teacher_ckpt"),
])
def test_keys_that_do_not_apply(cls, args, refused):
    with pytest.raises(KdError, match=f"^{refused}=.* does not apply: "):
        resolve(cls, args)


@pytest.mark.parametrize(("cls", "args"), [
    (SweepConfig, ["model=mlp", "seed=3"]),  # no grid.model= / grid.seed=: one model, one seed
    (SweepConfig, ["scheduler=local", "workers=2"]),
    (CacheConfig, ["teacher_ckpt=", "epochs=3", "teacher_dir=t"]),  # trains the default teacher
    (CacheConfig, ["workers=2", "streams=2", "cache_root=r", "layers=embed", "pool=false"]),
    (VerifyConfig, ["dataset=digits3", "teacher=cnn_small", "rows=3"]),
])
def test_keys_that_apply_are_taken(cls, args):
    resolve(cls, args)


@pytest.mark.parametrize("cls", [TeacherConfig, CacheConfig, InfoConfig, VerifyConfig, StudentConfig,
                                 SweepConfig, ReportConfig])
def test_moot_names_only_fields(cls):
    """Every key a config can call moot is one of its own (a typo there would refuse nothing)."""
    cfg = cls(**{k: v for k, v in dict(cache="c", teacher_ckpt="w.pt", scheduler="tcp://h:1",
                                       layers=("none",), temperatures=(1.0,)).items()
                 if k in cls.__dataclass_fields__})
    assert set(cfg.moot()) <= set(cls.__dataclass_fields__)
