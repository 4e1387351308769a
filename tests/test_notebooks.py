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
