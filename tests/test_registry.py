"""The registries of datasets and teachers: lookup, listing and duplicate names."""

from __future__ import annotations

import pytest

from pipeline.data import DATASETS
from pipeline.errors import KdError
from pipeline.registry import Registry
from pipeline.teachers import TEACHERS


def test_register_and_get():
    reg = Registry("widget")

    @reg.register("b")
    def b():
        return "b"

    @reg.register("a")
    def a():
        return "a"

    assert reg.get("a") is a and reg.get("b")() == "b"
    assert reg.names() == ["a", "b"] == list(reg)
    assert "a" in reg and "c" not in reg


def test_unknown_name_lists_known_names():
    reg = Registry("widget")
    for name in ("gear", "spring", "lever"):
        reg.register(name)(lambda: None)
    with pytest.raises(KdError, match=r"unknown widget 'cog'; known: gear, lever, spring"):
        reg.get("cog")


@pytest.mark.parametrize("registry", [DATASETS, TEACHERS], ids=["datasets", "teachers"])
def test_unknown_name_in_real_registries(registry):
    with pytest.raises(KdError) as info:
        registry.get("no-such-thing")
    message = str(info.value)
    assert f"unknown {registry.kind} 'no-such-thing'" in message
    for name in registry.names():
        assert name in message


def test_duplicate_registration_raises():
    reg = Registry("widget")
    reg.register("gear")(lambda: 1)
    with pytest.raises(ValueError, match="widget 'gear' is registered twice"):
        reg.register("gear")(lambda: 2)
    assert reg.get("gear")() == 1  # the first entry is kept


@pytest.mark.parametrize("registry", [DATASETS, TEACHERS], ids=["datasets", "teachers"])
def test_builtin_names_cannot_be_shadowed(registry):
    name = registry.names()[0]
    original = registry.get(name)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(name)(lambda *a: None)
    assert registry.get(name) is original
