"""The plugin registries: strict registration, helpful look-ups, lazy entry-point plugins."""
from __future__ import annotations

import importlib.metadata
import textwrap

import pytest

from mtlbench.cli import main
from mtlbench.errors import MtlbenchError
from mtlbench.registry import BACKBONES, DATASETS, METHODS, Registry


def test_registering_a_name_twice_is_an_error():
    reg = Registry("thing", "mtlbench.errors", "mtlbench.test-none")
    reg.register("a")(object)
    with pytest.raises(MtlbenchError, match="already registered"):
        reg.register("a")(dict)


def test_unknown_name_lists_registered_and_suggests_close_matches():
    with pytest.raises(MtlbenchError) as info:
        METHODS.get("cross_stich")
    msg = str(info.value)
    assert "did you mean 'cross-stitch'" in msg and "tr" in msg and "stl" in msg


def test_wildcard_listing():
    assert METHODS.names("cross*") == ["cross-stitch"]
    assert "convnet" in BACKBONES.names() and "synthetic" in DATASETS.names()


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    (tmp_path / "mtlbench_fake_plugin.py").write_text(textwrap.dedent('''
        from mtlbench.methods.hard import HardSharing

        class MyMethod(HardSharing):
            """A third-party method for the test."""
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = importlib.metadata.EntryPoints([
        importlib.metadata.EntryPoint("my-method", "mtlbench_fake_plugin:MyMethod", "mtlbench.methods"),
        importlib.metadata.EntryPoint("broken", "mtlbench_no_such_module:X", "mtlbench.methods"),
    ])
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None, **kw: eps.select(group=group) if group == "mtlbench.methods" else real(group=group, **kw))
    # The real registry, with its plugins not yet loaded and its tables restored afterwards.
    for attr in ("_entries", "_descriptions", "plugin_errors"):
        monkeypatch.setattr(METHODS, attr, dict(getattr(METHODS, attr)))
    monkeypatch.setattr(METHODS, "_loaded", False)
    return METHODS


def test_entry_point_plugins_load_lazily_and_a_broken_one_only_warns(plugin_module, capsys):
    reg = plugin_module
    assert not reg._loaded
    with pytest.warns(RuntimeWarning, match="broken"):
        names = reg.names()
    assert "my-method" in names and "tr" in names
    assert reg.describe("my-method") == "A third-party method for the test."
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "my-method" in out and "broken" in out and "plugin failed to load" in out
