"""Every docstring example in the package runs and prints what it shows (the "tiny worked example that runs").

Examples that need a download, a real model or a file are marked `# doctest: +SKIP` in the source; the rest run
here with the tiny test models (`tiny_model`, `tiny_tokenizer`), `ModelAdapter`, `EditRequest`, `torch` and `math` in scope, so a changed signature or result breaks a test, not a reader."""
import doctest
import importlib
import pkgutil

import pytest
import torch

import unifiededit

MODULES = sorted(m.name for m in pkgutil.iter_modules(unifiededit.__path__, "unifiededit.") if not m.name.endswith("_modidx"))


def _globals():
    import math
    from unifiededit.requests import EditRequest
    from unifiededit.models import ModelAdapter
    from unifiededit.tiny import tiny_model, tiny_tokenizer
    return dict(math=math, torch=torch, EditRequest=EditRequest, ModelAdapter=ModelAdapter, tiny_model=tiny_model,
                tiny_tokenizer=tiny_tokenizer)


def _examples(name):
    finder = doctest.DocTestFinder(exclude_empty=True)
    mod = importlib.import_module(name)
    return [t for t in finder.find(mod, name, globs={**_globals(), **vars(mod)}) if t.examples]


WITH_EXAMPLES = [n for n in MODULES if _examples(n)]


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_docstring_examples_run(name):
    tests = _examples(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for t in tests:
            torch.manual_seed(0)
            runner.run(t)
    finally:
        torch.set_num_threads(n)
    res = runner.summarize(verbose=False)
    assert res.failed == 0, f"{res.failed} of {res.attempted} docstring examples of {name} failed (output above)"


def test_the_package_has_docstring_examples():
    "The examples above are not vacuous: most modules carry at least one runnable example."
    runnable = [n for n in WITH_EXAMPLES
                if any(not all(e.options.get(doctest.SKIP) for e in t.examples) for t in _examples(n))]
    assert len(runnable) >= len(MODULES) // 2, runnable
