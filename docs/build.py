"""Build the unifiededit documentation site: `python docs/build.py` writes a static site to `site/`.

1. **Stage** the sources in a temporary folder that mirrors the repository:
   - `index.md` is `README.md` itself (the single source of the front page; only links to files that are not pages
     are re-pointed at the git host, and a hidden table of contents is appended for the navigation),
   - `nbs/NN_name.ipynb`, one page per chapter in file-name order, processed by nbdev's own `NBProcessor` and
     processors (`#| hide`, `#| hide_line`, `#| filter_stream`, ANSI codes), with every `#|` line removed and their
     *stored* outputs kept (nothing is executed),
   - `api/<module>.md`, one page per module in nbdev's index (`unifiededit/_modidx.py`) with a non-empty `__all__`,
     rendered by Sphinx autodoc.
2. **Run Sphinx** (myst-nb, autodoc, furo and the MathJax 3 files of `sphinx-mathjax-offline`; `docs/conf.py`) into
   a fresh folder that then replaces the output folder. Nothing is fetched: no page references another host.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import io
import json
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
# nbdev directives the build knows: what nbdev's processors or this file do with them (see docs/README.md)
DIRECTIVES = {"export", "exports", "exporti", "default_exp", "hide", "hide_line", "filter_stream", "slow", "gpu"}
_DIRECTIVE_LINE_RE = re.compile(r"^\s*#\s*\|.*(?:\n|$)", re.M)
_H1_RE = re.compile(r"^#\s+\S", re.M)
_LINK_RE = re.compile(r"\]\((?![a-zA-Z][\w+.-]*:|#|/)([^()\s]+)\)")  # a relative Markdown link target


def read_settings(repo: Path = REPO):
    "`repo`'s settings.ini as nbdev reads it: lib_name, nbs_path, title, git_url, ..."
    from nbdev.config import get_config
    return get_config(path=Path(repo))


def notebooks(repo: Path = REPO) -> list[Path]:
    "The chapters: `nbs/NN_name.ipynb`, in reading (file-name) order."
    return sorted((Path(repo) / read_settings(repo).nbs_path).glob("[0-9]*.ipynb"))


def cell_directives(cell: dict) -> dict[str, str]:
    """A code cell's directives as nbdev parses them (`nbdev.process.extract_directives`), values joined.

    >>> cell_directives({"cell_type": "code", "source": "#| export\\n#| filter_stream a b\\nx = 1"})
    {'export': '', 'filter_stream': 'a b'}
    """
    from fastcore.basics import AttrDict
    from nbdev.process import extract_directives
    if cell.get("cell_type") != "code":
        return {}
    src = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
    return {k.rstrip(":"): " ".join(v) for k, v in extract_directives(AttrDict(source=src), remove=False).items()}


# ---------------------------------------------------------------------------------------------------------------------
# a notebook -> its page
# ---------------------------------------------------------------------------------------------------------------------
def process_notebook(nb: dict, path: Path, api_link: str | None = None) -> dict:
    """The notebook as it appears on the site (a new dict; `nb` is not modified).

    nbdev's `NBProcessor` runs nbdev's own processors: `#| hide` cells dropped, `#| hide_line` lines removed,
    `#| filter_stream w1 w2` applied, ANSI codes stripped. Then every `#|` line is removed, and a code cell left with
    neither code nor output (`#| default_exp`) disappears. A directive outside `DIRECTIVES` (e.g. Quarto's
    `#| echo: false`, which nbdev leaves to Quarto) or a chapter without a `# Title` is an error, not a silently
    different page. With `api_link`, the page ends with a link to its API reference."""
    from execnb.nbio import dict2nb
    from nbdev.process import NBProcessor
    from nbdev.processors import filter_stream_, hide_, hide_line, strip_ansi
    for i, c in enumerate(nb["cells"]):
        unknown = set(cell_directives(c)) - DIRECTIVES
        if unknown:
            raise ValueError(f"{path.name}, cell {i}: directive(s) {sorted(unknown)} are not handled by docs/build.py "
                             f"(it handles {sorted(DIRECTIVES)})")
    nb = dict2nb(copy.deepcopy(nb))
    for c in nb.cells:  # nbdev's processors read stream text as a list of lines, as Jupyter stores it
        for o in c.get("outputs", []):
            if o.get("output_type") == "stream" and isinstance(o.get("text"), str):
                o["text"] = o["text"].splitlines(True)
    NBProcessor(nb=nb, procs=[hide_, hide_line, filter_stream_, strip_ansi], process=True)
    cells = []
    for c in nb.cells:
        if c.cell_type == "markdown":
            cells.append({"cell_type": "markdown", "id": c.id, "metadata": {}, "source": c.source})
        elif c.cell_type == "code" and "source" in c:  # hide_ deletes the source
            code = _DIRECTIVE_LINE_RE.sub("", c.source).strip("\n")
            outputs = [{**o, "text": "".join(o["text"])} if o.get("output_type") == "stream" else dict(o)
                       for o in c.get("outputs", [])]
            if code.strip() or outputs:
                cells.append({"cell_type": "code", "id": c.id, "execution_count": c.get("execution_count"),
                              "metadata": {} if code.strip() else {"tags": ["remove-input"]},
                              "outputs": outputs, "source": code})
    first = next((c["source"] for c in cells if c["cell_type"] == "markdown"), "")
    if not _H1_RE.search(first):
        raise ValueError(f"{path.name}: the first markdown cell must hold the chapter's `# Title`")
    if api_link:
        cells.append({"cell_type": "markdown", "id": "docs-api-link", "metadata": {},
                      "source": f"---\n\n**API reference** for what this chapter exports: {api_link}"})
    meta = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python", "pygments_lexer": "ipython3"}}
    return {"cells": cells, "metadata": meta, "nbformat": 4, "nbformat_minor": 5}


def repoint_links(md: str, pages: set[str], settings) -> str:
    """Relative link targets that are not pages of the site (`pages`: repository paths) point at the git host.

    >>> class S: git_url, branch = "https://example.org/u/r", "main"
    >>> repoint_links("[a](nbs/00_x.ipynb) [b](benchmarks/README.md#x) [c](https://x.org)", {"nbs/00_x.ipynb"}, S)
    '[a](nbs/00_x.ipynb) [b](https://example.org/u/r/blob/main/benchmarks/README.md#x) [c](https://x.org)'
    """
    def fix(m):
        path, frag = m.group(1).partition("#")[::2]
        if path in pages:
            return m.group(0)
        kind = "tree" if (REPO / path).is_dir() else "blob"
        return f"]({settings.git_url.rstrip('/')}/{kind}/{settings.branch}/{path}{'#' + frag if frag else ''})"
    return _LINK_RE.sub(fix, md)


# ---------------------------------------------------------------------------------------------------------------------
# the API reference
# ---------------------------------------------------------------------------------------------------------------------
def api_modules(repo: Path = REPO) -> list:
    "The modules nbdev indexed (`<lib>/_modidx.py`) whose `__all__` is not empty, imported, in chapter order."
    settings = read_settings(repo)
    index = importlib.import_module(f"{settings.lib_name}._modidx").d["syms"]
    order = {nb.resolve(): i for i, nb in enumerate(notebooks(repo))}
    mods = [m for m in map(importlib.import_module, index) if getattr(m, "__all__", None)]
    return sorted(mods, key=lambda m: (order.get(_chapter_of(m), len(order)), m.__name__))


def _chapter_of(mod) -> Path | None:
    "The notebook a module was exported from (nbdev's 'File to edit' header), if it exists."
    m = re.search(r"^# AUTOGENERATED! DO NOT EDIT! File to edit: (\S+?)\.?\s*$", Path(mod.__file__).read_text(), re.M)
    nb = (Path(mod.__file__).parent / m.group(1)).resolve() if m else None
    return nb if nb is not None and nb.exists() else None


def _undocumented_data(mod) -> list[str]:
    "Exported constants without a `#:` comment: automodule leaves them out, so they get explicit `autodata` lines."
    from sphinx.pycode import ModuleAnalyzer
    documented = {n for (ns, n) in ModuleAnalyzer.for_module(mod.__name__).find_attr_docs() if ns == ""}
    kind = lambda o: inspect.isroutine(o) or inspect.isclass(o) or inspect.ismodule(o)  # noqa: E731
    return [n for n in mod.__all__ if n not in documented and not kind(getattr(mod, n))]


def api_page(mod, chapter: str | None) -> str:
    lines = [f"# `{mod.__name__}`", ""]
    if chapter:
        lines += [f"Exported from the chapter [{Path(chapter).stem}](../{chapter}) (`{chapter}`).", ""]
    lines += ["```{eval-rst}", f".. automodule:: {mod.__name__}", "```", ""]  # autodoc emits reStructuredText
    data = _undocumented_data(mod)
    if data:
        lines += ["## Constants", "", "```{eval-rst}", *[f".. autodata:: {mod.__name__}.{n}" for n in data], "```", ""]
    return "\n".join(lines)


def api_index(mods, chapters: dict, settings) -> str:
    "The API index: what `import unifiededit` gives directly, then one row per module."
    pkg = importlib.import_module(settings.lib_name)
    documented = {m.__name__: set(m.__all__) for m in mods}
    short = [(n, f"{getattr(pkg, n).__module__}.{n}") for n in getattr(pkg, "__all__", [])
             if n in documented.get(getattr(getattr(pkg, n), "__module__", None), ())]
    lines = ["# API reference", "", "Every function, class and constant the notebooks export (`#| export`), generated "
             "from the modules' signatures, docstrings and parameter comments.", ""]
    if short:
        lines += [f"`import {settings.lib_name}` gives direct access to "
                  + ", ".join(f"{{py:obj}}`{n} <{t}>`" for n, t in short) + ".", ""]
    lines += ["| module | chapter | summary |", "|---|---|---|"]
    for m in mods:
        ch = chapters.get(m.__name__)
        summary = " ".join((m.__doc__ or "").strip().split("\n\n")[0].split()).replace("|", r"\|")
        lines.append(f"| [`{m.__name__}`]({m.__name__}.md) | {f'[{Path(ch).stem}](../{ch})' if ch else ''} | {summary} |")
    return "\n".join(lines) + _toctree("Modules", [m.__name__ for m in mods])


# ---------------------------------------------------------------------------------------------------------------------
# staging and building
# ---------------------------------------------------------------------------------------------------------------------
def _toctree(caption: str, entries: list[str]) -> str:
    return "\n\n```{toctree}\n:hidden:\n:caption: " + caption + "\n\n" + "\n".join(entries) + "\n```\n"


def stage(repo: Path, src: Path) -> list[str]:
    "Write the Sphinx sources of `repo` into `src`; return the page names (no suffix) in navigation order."
    settings = read_settings(repo)
    nbs = {p: p.relative_to(repo).as_posix() for p in notebooks(repo)}
    mods = api_modules(repo)
    chapters = {m.__name__: nbs[c] for m in mods if (c := _chapter_of(m)) in nbs}
    for p, rel in nbs.items():
        nb = json.loads(p.read_text(encoding="utf-8"))
        exp = next((d["default_exp"] for c in nb["cells"] if (d := cell_directives(c)).get("default_exp")), None)
        mod = f"{settings.lib_name}.{exp}"
        link = f"[`{mod}`](../api/{mod}.md)" if chapters.get(mod) == rel else None
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(json.dumps(process_notebook(nb, p, link), ensure_ascii=False, indent=1), encoding="utf-8")
    (src / "api").mkdir()
    for m in mods:
        (src / "api" / f"{m.__name__}.md").write_text(api_page(m, chapters.get(m.__name__)), encoding="utf-8")
    (src / "api" / "index.md").write_text(api_index(mods, chapters, settings), encoding="utf-8")
    pages = set(nbs.values()) | {"CONTRIBUTING.md"}
    (src / "CONTRIBUTING.md").write_text(repoint_links((repo / "CONTRIBUTING.md").read_text(encoding="utf-8"), pages,
                                                       settings), encoding="utf-8")
    chapter_pages = [rel[: -len(".ipynb")] for rel in nbs.values()]
    front = repoint_links((repo / "README.md").read_text(encoding="utf-8"), pages, settings)
    nav = _toctree("Chapters", chapter_pages) + _toctree("Reference", ["api/index", "CONTRIBUTING"])
    (src / "index.md").write_text(front.rstrip() + "\n" + nav, encoding="utf-8")
    return ["index", *chapter_pages, "api/index", *[f"api/{m.__name__}" for m in mods], "CONTRIBUTING"]


@dataclass
class BuildResult:
    out: Path
    pages: list[str]
    warnings: list[str]
    seconds: float


class _Tee(io.StringIO):
    "Sphinx's messages, kept for the result and echoed to `echo` (or not)."
    def __init__(self, echo):
        super().__init__()
        self.echo = echo

    def write(self, s):
        if self.echo is not None:
            self.echo.write(s)
        return super().write(s)


def build(repo: Path = REPO, out: Path | None = None, strict: bool = False, verbose: bool = False) -> BuildResult:
    """Build the site into `out` (default `<repo>/site`), aside first, so a failed build leaves the last one intact.

    Raises RuntimeError when a module cannot be imported for the API reference, when Sphinx fails, or (with
    `strict`) when Sphinx reported any warning."""
    from sphinx.application import Sphinx
    from sphinx.util import console
    from sphinx.util.docutils import docutils_namespace, patch_docutils
    t0 = time.perf_counter()
    repo = Path(repo).resolve()
    settings = read_settings(repo)
    out = Path(out).resolve() if out else repo / "site"
    if out.exists() and any(out.iterdir()) and not (out / ".buildinfo").exists():
        raise RuntimeError(f"{out} exists, is not empty and is not a previous build (no .buildinfo): refusing to "
                           "replace it")
    if not sys.stderr.isatty():
        console.nocolor()  # plain warnings in logs and in the test's failure messages
    overrides = {"project": settings.title, "html_title": settings.title, "author": settings.author,
                 "copyright": settings.copyright, "version": settings.version, "release": settings.version}
    with tempfile.TemporaryDirectory(prefix="unifiededit-docs-") as tmp:
        tmp = Path(tmp)
        sys.path.insert(0, str(repo))  # staging and autodoc import the package of this repository
        try:
            (tmp / "src").mkdir()
            pages = stage(repo, tmp / "src")
            warn_stream = _Tee(sys.stderr)
            with patch_docutils(DOCS), docutils_namespace():
                app = Sphinx(str(tmp / "src"), str(DOCS), str(tmp / "html"), str(tmp / "doctrees"), "html",
                             confoverrides=overrides, status=_Tee(sys.stdout if verbose else None),
                             warning=warn_stream, freshenv=True, keep_going=True)
                app.build(force_all=True)
        finally:
            sys.path.remove(str(repo))
        warns = [w for w in warn_stream.getvalue().splitlines() if w.strip()]
        failed_imports = [w for w in warns if "failed to import" in w or "autodoc: failed" in w]
        if app.statuscode or failed_imports or (strict and warns):
            why = ("cannot import module(s) for the API reference" if failed_imports else
                   f"{len(warns)} warning(s) with --strict" if strict and warns else f"sphinx status {app.statuscode}")
            raise RuntimeError(f"documentation build failed: {why}:\n" + "\n".join(failed_imports or warns))
        (tmp / "html" / ".nojekyll").write_text("", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp / "html"), str(out))
    return BuildResult(out, pages, warns, time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: <repo>/site)")
    ap.add_argument("--strict", action="store_true", help="fail on any Sphinx warning")
    ap.add_argument("-v", "--verbose", action="store_true", help="show Sphinx's progress output")
    args = ap.parse_args(argv)
    try:
        res = build(REPO, args.out, strict=args.strict, verbose=args.verbose)
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"built {len(res.pages)} pages ({len(res.warnings)} warning(s)) in {res.seconds:.1f}s: "
          f"{res.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
