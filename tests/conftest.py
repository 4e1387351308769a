"""Shared pytest configuration: `slow` tests run with --runslow (or UNIFIEDEDIT_SLOW=1); `gpu` tests run when CUDA exists."""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--runslow") or os.environ.get("UNIFIEDEDIT_SLOW") == "1"
    has_gpu = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with --runslow or UNIFIEDEDIT_SLOW=1"))
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="gpu: no CUDA device on this machine"))


@pytest.fixture
def one_thread(request):
    """Tiny models and matrices run fastest on one thread (no OpenMP synchronization, no fight with the other
    processes of a shared CPU); tests marked slow keep every thread. The thread count is restored after the test.
    A test module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    if "slow" not in request.keywords:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
