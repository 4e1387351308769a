"""Every notebook in nbs/ runs as a pytest test through nbdev's own engine (the same one `nbdev_test` uses).

Cells flagged with `tst_flags` from settings.ini (`#| slow`, `#| gpu`) are skipped unless forced:
`--runslow` forces `slow`; `gpu` cells run when CUDA is present.
"""
import configparser
import os
from pathlib import Path

import pytest
import torch

import nbdev.test as nbtest

REPO = Path(__file__).resolve().parents[1]
NBS = sorted(p for p in (REPO / "nbs").glob("*.ipynb") if not p.name.startswith("_"))


def _flags() -> list[str]:
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(REPO / "settings.ini")
    return cfg["DEFAULT"].get("tst_flags", "").split()


@pytest.mark.parametrize("nb", NBS, ids=[p.name for p in NBS])
def test_notebook(nb: Path, request):
    force = []
    if request.config.getoption("--runslow") or os.environ.get("UNIFIEDEDIT_SLOW") == "1":
        force.append("slow")
    if torch.cuda.is_available():
        force.append("gpu")
    ok, secs = nbtest.test_nb(nb, skip_flags=_flags(), force_flags=force, basepath=REPO)
    assert ok, f"{nb.name} failed after {secs:.1f}s (traceback above)"


def test_export_matches_the_module(tmp_path):
    """`nbdev_export` of the notebooks reproduces the committed `unifiededit/` exactly, and twice in a row gives the
    same files (a module some notebook exports into without owning it would grow at every export)."""
    import shutil, subprocess, sys
    for name in ("settings.ini", "setup.py"): shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "nbs", tmp_path / "nbs", ignore=shutil.ignore_patterns("results", ".ipynb_checkpoints"))
    shutil.copytree(REPO / "unifiededit", tmp_path / "unifiededit", ignore=shutil.ignore_patterns("__pycache__"))
    exporter = Path(sys.executable).with_name("nbdev_export")
    for _ in range(2):
        subprocess.run([str(exporter)], cwd=tmp_path, check=True, capture_output=True, timeout=300)
        produced = {p.name: p.read_text() for p in (tmp_path / "unifiededit").glob("*.py")}
        committed = {p.name: p.read_text() for p in (REPO / "unifiededit").glob("*.py")}
        assert sorted(produced) == sorted(committed)
        stale = [n for n in committed if produced[n] != committed[n]]
        assert not stale, f"run nbdev_export and commit: {stale} differ from what the notebooks export"


def _code(nb: Path) -> str:
    import json
    cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def _modules_used(code: str) -> set[str]:
    r"""The `unifiededit` modules that code imports or reaches as attributes (`unifiededit.keys.fill`, `from
    unifiededit.keys import ...`, `from .keys import ...`), read from its syntax tree, so a string such as a file
    format's name ("unifiededit.sweep.batch/1") is not a use.

    >>> sorted(_modules_used("from unifiededit.keys import fill\nimport unifiededit.tiny as t\nx = unifiededit.stats.f"))
    ['keys', 'stats', 'tiny']
    >>> _modules_used('FORMAT = "unifiededit.sweep.batch/1"')
    set()
    """
    import ast
    used = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[0] == "unifiededit" and len(parts) > 1: used.add(parts[1])
            elif node.level == 1: used.add(parts[0])
        elif isinstance(node, ast.Import):
            used |= {a.name.split(".")[1] for a in node.names if a.name.startswith("unifiededit.")}
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id == "unifiededit"):
            used.add(node.attr)
    return used


def _code_without_magics(nb: Path) -> str:
    return "\n".join(l for l in _code(nb).splitlines() if not l.lstrip().startswith(("%", "!")))


def test_no_chapter_uses_a_later_one():
    """The file names give the reading order, and data flows forward: no notebook, in its exported code or in its
    examples, imports a module that a later notebook exports."""
    import re
    owner = {}  # module -> index of the notebook exporting it
    for i, nb in enumerate(NBS):
        m = re.search(r"^#\|\s*default_exp\s+(\S+)", _code(nb), re.M)
        if m: owner[m.group(1)] = i
    assert len(owner) >= 20, owner
    late = []
    for i, nb in enumerate(NBS):
        used = _modules_used(_code_without_magics(nb))
        late += [f"{nb.name} uses {mod} (from {NBS[owner[mod]].name})" for mod in sorted(used) if owner.get(mod, -1) > i]
    assert not late, late


def test_the_module_use_detector():
    "The detector above sees each kind of use (so the ordering test can fail), and a later chapter's use is caught."
    import doctest
    assert doctest.testmod(__import__(__name__), verbose=False).failed == 0
    assert _modules_used("from unifiededit.sweep import run_sweep") == {"sweep"}


def test_the_readme_lists_every_chapter():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    missing = [nb.stem for nb in NBS if f"| `{nb.stem}` |" not in readme]
    assert not missing, f"README's chapter table lacks {missing}"
