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
