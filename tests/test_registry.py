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


@pytest.mark.slow
def test_a_method_file_dropped_into_a_copy_is_discovered_with_no_other_edit(tmp_path):
    """The package copied as it installs (methods/ and datasets/ inside mtlbench/), one new file
    in methods/, and nothing else changed: `mtlbench list` shows it and `mtlbench run` runs it."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    pkg = tmp_path / "mtlbench"
    shutil.copytree(root / "mtlbench", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(root / "methods", pkg / "methods", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(root / "datasets", pkg / "datasets", ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "methods" / "widened.py").write_text(textwrap.dedent('''
        """A method added as one file: hard sharing under another name."""
        from mtlbench.methods.hard import HardSharing
        from mtlbench.registry import register_method


        @register_method("dropped-in", "A method that arrived as one file.")
        class DroppedIn(HardSharing):
            pass
    '''))
    runner = textwrap.dedent(f'''
        import sys
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        sys.path.insert(0, {str(tmp_path)!r})
        import mtlbench.cli
        assert mtlbench.cli.__file__.startswith({str(tmp_path)!r}), mtlbench.cli.__file__
        sys.exit(mtlbench.cli.main(sys.argv[1:]))
    ''')
    (tmp_path / "run.py").write_text(runner)
    listed = subprocess.run([sys.executable, str(tmp_path / "run.py"), "list"], capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert "dropped-in" in listed.stdout and "A method that arrived as one file." in listed.stdout
    from helpers import TINY_ARGS
    ran = subprocess.run([sys.executable, str(tmp_path / "run.py"), "run", "--methods", "dropped-in", "--tasks", "2",
                          "--out", str(tmp_path / "out"), *TINY_ARGS], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert "dropped-in" in ran.stdout
    assert "dropped-in" not in subprocess.run([sys.executable, "-m", "mtlbench.cli", "list"], capture_output=True,
                                              text=True).stdout  # the real tree is untouched
