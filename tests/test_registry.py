"""The registries: lookup, listing, duplicate names, and the plugin source a registry is given."""

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


class FakePlugins:
    """A plugin source holding one installed plugin, ``ext``, and loading ``pkg.mod:obj``."""

    def __init__(self):
        self.loaded: list[str] = []

    def load(self, name):
        self.loaded.append(name)
        return (lambda: name) if name in ("ext", "pkg.mod:obj") else None

    def names(self):
        return ["ext"]

    def identity(self, name):
        return {"name": name, "import": name, "package": None, "version": "1"}


def test_a_registry_asks_its_plugin_source_for_names_it_does_not_hold():
    plugins = FakePlugins()
    reg = Registry("widget", plugins=plugins)
    reg.register("gear")(lambda: "gear")
    assert reg.names() == ["ext", "gear"]  # installed plugins are listed before their first use
    assert reg.get("pkg.mod:obj")() == "pkg.mod:obj" and plugins.loaded == ["pkg.mod:obj"]
    assert reg.identity("pkg.mod:obj")["version"] == "1"
    assert reg.identity("gear") is None and reg.identity("onnx") is None  # built-in; no entry
    with pytest.raises(KdError, match=r"unknown widget 'cog'.*or a plugin: pkg.module:attr"):
        reg.get("cog")
    reg.forget_plugins()
    assert "pkg.mod:obj" not in reg and "gear" in reg


def test_a_registry_without_a_plugin_source_loads_none():
    reg = Registry("widget")
    reg.register("gear")(lambda: "gear")
    with pytest.raises(KdError) as info:
        reg.get("pkg.mod:obj")
    assert "plugin" not in str(info.value) and reg.identity("pkg.mod:obj") is None
