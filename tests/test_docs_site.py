"""The documentation site: built from the notebooks by `python docs/build.py`, then checked as a reader sees it.

- static checks on the built HTML: one page per notebook in reading order, no nbdev directive or `#| hide` cell on
  any page, stored outputs (plots) present, an API entry for every exported name, no CDN reference, and a front
  page that says what README.md says;
- a real browser: the site is served on 127.0.0.1 (a port chosen by the OS, for this test only) and every page is
  opened in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright): math typeset by the vendored
  MathJax, every image decoded, no request leaving localhost, no console error, search and navigation working (served
  and from file://). A full-page screenshot of every page goes to screenshots/docs/ (gitignored) for review.

Needs the docs tools (`pip install -e ".[docs]"`) and Debian's `chromium`. Outside CI a missing tool skips with the
reason; in CI (CI=true) it fails, so a broken install step cannot pass silently.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
SCREENSHOTS = REPO / "screenshots" / "docs"
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
BUILD_CPU_LIMIT_S = 60   # the build must take well under a minute of work
PAGE_TIMEOUT_MS = 60_000  # bound for loading one page and typesetting its math (a shared 2-core machine is slow)


def _missing(what: str):
    "Fail in CI, skip elsewhere: the docs tooling is a CI requirement, an optional one for a quick local run."
    msg = f"{what} (CI installs it: see .ci/run and the README's Documentation section)"
    if IN_CI:
        pytest.fail(f"CI=true but {msg}", pytrace=False)
    pytest.skip(msg)


def _require_module(name: str):
    if importlib.util.find_spec(name) is None:
        _missing(f"python package {name!r} is not installed")


def _chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        _missing(f"Chromium not found at {path} (Debian package `chromium`; or set CHROMIUM=/path/to/chromium)")
    return path


def _load_build_module():
    spec = importlib.util.spec_from_file_location("unifiededit_docs_build", DOCS / "build.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def docs_build():
    return _load_build_module()


# ---------------------------------------------------------------------------------------------------------------------
# the notebook -> page transformation, on a notebook made here (no build, no browser)
# ---------------------------------------------------------------------------------------------------------------------
def _code(src, outputs=()):
    return {"cell_type": "code", "execution_count": 1, "metadata": {}, "outputs": list(outputs), "source": src}


def _md(src):
    return {"cell_type": "markdown", "metadata": {}, "source": src}


def _png_output():
    return {"output_type": "display_data", "metadata": {}, "data": {"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"}}


def _stream(text):
    return {"output_type": "stream", "name": "stdout", "text": text}


def test_process_notebook_strips_directives_and_hidden_cells(docs_build):
    nb = {"nbformat": 4, "nbformat_minor": 5, "metadata": {"jupytext": {}}, "cells": [
        _md("# Title\n\nInline $x$."),
        _code("#| default_exp demo"),
        _code("#| export\ndef visible_fn(x):  # keep me\n    return x"),
        _code("#|hide\nsecret_hidden_line = 1"),
        _code("#| slow\n#| gpu\nplot()", [_png_output()]),
        _code("#| filter_stream progress\nrun()", [_stream("progress 10%\nresult 3\n")]),
        _code("x = 1  #| hide_line\ny = 2"),
    ]}
    before = json.dumps(nb)
    out = docs_build.process_notebook(nb, Path("nbs/07_demo.ipynb"), api_link="[`m`](../api/m.md)")
    assert json.dumps(nb) == before, "process_notebook must not modify its input"
    cells = out["cells"]
    sources = "\n".join(c["source"] for c in cells)
    assert "#|" not in sources and "secret_hidden_line" not in sources and "default_exp" not in sources
    code = [c for c in cells if c["cell_type"] == "code"]
    assert [c["source"] for c in code] == ["def visible_fn(x):  # keep me\n    return x", "plot()", "run()", "y = 2"]
    assert code[1]["outputs"][0]["data"]["image/png"] == "iVBORw0KGgo="
    assert code[2]["outputs"][0]["text"] == "result 3\n"
    assert cells[0]["source"] == "# Title\n\nInline $x$." and cells[-1]["source"].endswith("[`m`](../api/m.md)")
    assert len({c["id"] for c in cells}) == len(cells) and out["metadata"]["kernelspec"]["language"] == "python"


@pytest.mark.parametrize("cells, why", [
    ([_md("# T"), _code("#| echo: false\nprint(1)")], "echo"),         # Quarto's option: not silently ignored
    ([_md("## Only a section"), _code("1")], "# Title"),
])
def test_process_notebook_refuses_what_it_cannot_render(docs_build, cells, why):
    with pytest.raises(ValueError, match=re.escape(why)):
        docs_build.process_notebook({"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": cells},
                                    Path("nbs/12_x.ipynb"))


def test_every_chapter_uses_only_directives_the_build_handles(docs_build):
    for nb_path in docs_build.notebooks(REPO):
        nb = json.loads(nb_path.read_text(encoding="utf-8"))
        docs_build.process_notebook(nb, nb_path)  # raises on an unknown directive or a missing title


def test_cell_directives_are_nbdevs(docs_build):
    cell = {"cell_type": "code", "source": "#| export\n#|echo: false\n#| filter_stream a b\n\nx = 1"}
    assert docs_build.cell_directives(cell) == {"export": "", "echo": "false", "filter_stream": "a b"}
    assert docs_build.cell_directives({"cell_type": "markdown", "source": "#| export"}) == {}


def test_build_docstring_examples_run(docs_build):
    import doctest
    res = doctest.testmod(docs_build)
    assert res.attempted >= 3 and res.failed == 0


def test_links_to_files_that_are_not_pages_point_at_the_git_host(docs_build):
    settings = docs_build.read_settings(REPO)
    md = "[c](nbs/00_objective.ipynb) [r](benchmarks/README.md) [d](docs) [a](#x) [u](https://x.org/y)"
    out = docs_build.repoint_links(md, {"nbs/00_objective.ipynb"}, settings)
    base = settings.git_url.rstrip("/")
    assert out == (f"[c](nbs/00_objective.ipynb) [r]({base}/blob/{settings.branch}/benchmarks/README.md) "
                   f"[d]({base}/tree/{settings.branch}/docs) [a](#x) [u](https://x.org/y)")


# ---------------------------------------------------------------------------------------------------------------------
# the built site
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def site(tmp_path_factory, docs_build):
    for name in ("sphinx", "myst_nb", "furo", "bs4"):
        _require_module(name)
    out = tmp_path_factory.mktemp("docs") / "site"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, str(DOCS / "build.py"), "--out", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert res.returncode == 0, f"docs/build.py failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    print(f"\ndocs build: {wall:.1f}s wall, {cpu:.1f}s CPU -> {out}")
    return {"out": out, "stdout": res.stdout, "stderr": res.stderr, "wall": wall, "cpu": cpu,
            "notebooks": docs_build.notebooks(REPO), "modules": docs_build.api_modules(REPO)}


def _soup(path: Path):
    from bs4 import BeautifulSoup
    return BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")


def _page(site, nb: Path) -> Path:
    return site["out"] / nb.relative_to(REPO).with_suffix(".html")


def _norm(s: str) -> str:
    return " ".join(s.split())


def _squash(s: str) -> str:
    "Text without any whitespace: HTML and Markdown lay out spaces around code, links and line breaks differently."
    return "".join(s.split())


def test_build_is_fast_and_clean(site):
    assert site["cpu"] < BUILD_CPU_LIMIT_S, f"docs build used {site['cpu']:.1f}s of CPU (limit {BUILD_CPU_LIMIT_S}s)"
    warnings = [l for l in site["stderr"].splitlines() if re.search(r"\b(WARNING|ERROR|CRITICAL)\b", l)]
    assert not warnings, "the docs build reported problems:\n" + "\n".join(warnings)


def test_one_page_per_notebook_in_reading_order(site):
    nbs = site["notebooks"]
    assert nbs, "no notebooks in nbs/"
    for nb in nbs:
        assert _page(site, nb).is_file(), f"no page for {nb.name}"
    sidebar = _soup(site["out"] / "index.html").select(".sidebar-tree a.reference.internal")
    hrefs = [a["href"].split("#")[0] for a in sidebar]
    chapters = [h for h in hrefs if h.startswith("nbs/")]
    assert chapters == [nb.relative_to(REPO).with_suffix(".html").as_posix() for nb in nbs]


def _cell_directives(docs_build, cell) -> dict:
    return docs_build.cell_directives(cell)


def test_pages_have_no_directives_no_hidden_cells_and_show_exports(site, docs_build):
    for nb_path in site["notebooks"]:
        nb = json.loads(nb_path.read_text(encoding="utf-8"))
        soup = _soup(_page(site, nb_path))
        article = soup.select_one("article")
        text = article.get_text("\n")
        code_blocks = [pre.get_text() for pre in article.select("div.cell_input pre")]
        code_text = _norm("\n".join(code_blocks))
        leaked = [l for block in code_blocks for l in block.splitlines() if re.match(r"\s*#\|", l)]
        assert not leaked, f"{nb_path.name}: nbdev directives leaked into the page: {leaked}"
        visible = "\n".join("".join(c["source"]) for c in nb["cells"]
                            if "hide" not in _cell_directives(docs_build, c))
        for cell in nb["cells"]:
            dirs = _cell_directives(docs_build, cell)
            src = "".join(cell["source"])
            if "hide" in dirs:
                for line in src.splitlines():
                    line = line.strip()
                    if len(line) > 20 and not line.startswith("#") and line not in visible:
                        assert _norm(line) not in _norm(text), f"{nb_path.name}: `#| hide` line on the page: {line}"
            elif "export" in dirs or "exports" in dirs:
                body = [l for l in src.splitlines() if l.strip() and not re.match(r"\s*#\s*\|", l)]
                if body:
                    assert _norm(body[0]) in code_text, f"{nb_path.name}: exported code not shown: {body[0]}"


def test_stored_images_are_on_the_pages(site, docs_build):
    total = 0
    for nb_path in site["notebooks"]:
        nb = json.loads(nb_path.read_text(encoding="utf-8"))
        expected = 0
        for cell in nb["cells"]:
            dirs = _cell_directives(docs_build, cell)
            if cell["cell_type"] != "code" or "hide" in dirs:
                continue
            expected += sum(1 for o in cell.get("outputs", []) if
                            any(k.startswith("image/") for k in o.get("data", {})))
        imgs = _soup(_page(site, nb_path)).select("article div.cell_output img")
        assert len(imgs) == expected, f"{nb_path.name}: {expected} stored images, {len(imgs)} on the page"
        total += expected
    print(f"\n{total} stored images across {len(site['notebooks'])} notebooks")


def test_api_reference_documents_every_export(site, docs_build):
    mods = site["modules"]
    from unifiededit._modidx import d
    # every module nbdev indexed that exports something has a page
    assert {m.__name__ for m in mods} == {n for n in d["syms"] if importlib.import_module(n).__dict__.get("__all__")}
    for m in mods:
        page = site["out"] / "api" / f"{m.__name__}.html"
        assert page.is_file(), f"no API page for {m.__name__}"
        soup = _soup(page)
        ids = {dt.get("id") for dt in soup.select("dl.py dt[id]")}
        missing = [n for n in m.__all__ if f"{m.__name__}.{n}" not in ids]
        assert not missing, f"{m.__name__}: exported but not in the API reference: {missing}"
        for dt in soup.select("dl.py.function > dt[id], dl.py.class > dt[id]"):
            if not dt.select_one(".sig-paren"):  # Sphinx writes no "()" only for a class built without arguments
                obj = getattr(m, dt["id"].rsplit(".", 1)[1])
                assert inspect.isclass(obj) and not inspect.signature(obj).parameters, f"{dt['id']}: no signature"


def test_no_cdn_or_remote_assets(site):
    bad = []
    for page in site["out"].rglob("*.html"):
        soup = _soup(page)
        for tag, attr in (("script", "src"), ("link", "href"), ("img", "src"), ("iframe", "src"),
                          ("source", "src"), ("video", "src"), ("audio", "src")):
            for el in soup.find_all(tag):
                url = el.get(attr)
                if tag == "link" and "stylesheet" not in (el.get("rel") or []) and "icon" not in (el.get("rel") or []) \
                        and "preload" not in (el.get("rel") or []):
                    continue
                if url and re.match(r"^([a-z][a-z0-9+.-]*:)?//", url, re.I):
                    bad.append(f"{page.relative_to(site['out'])}: <{tag} {attr}={url}>")
    assert not bad, "remote assets:\n" + "\n".join(bad)
    assert (site["out"] / "_static" / "mathjax" / "tex-chtml.js").is_file(), "MathJax is not vendored"


def test_front_page_says_what_readme_says(site):
    from markdown_it import MarkdownIt
    readme = REPO / "README.md"
    assert readme.is_file(), "README.md is missing"
    article = _soup(site["out"] / "index.html").select_one("article")
    for el in article.select(".math, script, style"):
        el.decompose()
    page = _squash(article.get_text(""))
    tokens = MarkdownIt("commonmark").enable("table").parse(readme.read_text(encoding="utf-8"))
    checked, missing = 0, []
    for tok in tokens:
        if tok.type == "fence" or tok.type == "code_block":
            if _squash(tok.content) not in _squash(" ".join(pre.get_text() for pre in article.select("pre"))):
                missing.append(tok.content[:80])
            checked += 1
        if tok.type != "inline" or "$" in tok.content:
            continue  # math is typeset on the page, not text
        parts = []
        for child in tok.children or []:
            if child.type in ("text", "code_inline"):
                parts.append(child.content)
            elif child.type in ("softbreak", "hardbreak"):
                parts.append(" ")
        text = _norm("".join(parts))
        if len(text) < 3:
            continue
        checked += 1
        if _squash(text) not in page:
            missing.append(text[:80])
    assert checked > 0
    assert not missing, "README.md text missing from the front page:\n" + "\n".join(missing)


# ---------------------------------------------------------------------------------------------------------------------
# in the browser
# ---------------------------------------------------------------------------------------------------------------------
class _QuietHandler(SimpleHTTPRequestHandler):
    timeout = 30  # seconds a connection may idle

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(site):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(site["out"])))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    _require_module("playwright")
    exe = _chromium()
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        # Playwright gives every launch a fresh temporary --user-data-dir and removes it afterwards
        b = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_FLAGS, timeout=120_000)
        try:
            yield b
        finally:
            b.close()


class _Watch:
    "Everything a page did that it should not: requests off localhost, console errors, failed or 4xx/5xx loads."

    LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}

    def __init__(self, context, allow_file: bool = False):
        self.external, self.errors = [], []
        self.allow_file = allow_file
        context.route("**/*", self._route)

    def _route(self, route):
        url = route.request.url
        u = urlsplit(url)
        local = (u.scheme in ("http", "https") and u.hostname in self.LOCAL_HOSTS) or \
            u.scheme in ("data", "blob", "about") or (self.allow_file and u.scheme == "file")
        if local:
            route.continue_()
        else:
            self.external.append(url)
            route.abort()

    def attach(self, page, label):
        page.on("console", lambda m: m.type == "error" and self.errors.append(f"{label()}: console: {m.text}"))
        page.on("pageerror", lambda e: self.errors.append(f"{label()}: uncaught: {e}"))
        # net::ERR_ABORTED is a load the browser cancelled itself (a navigation started); anything else is a failure
        page.on("requestfailed", lambda r: "ERR_ABORTED" not in (r.failure or "") and
                self.errors.append(f"{label()}: failed: {r.url} {r.failure}"))
        page.on("response", lambda r: r.status >= 400 and self.errors.append(f"{label()}: HTTP {r.status} {r.url}"))


_RAW_MATH_JS = """() => {
  const root = document.body.cloneNode(true);
  root.querySelectorAll('pre, code, script, style, textarea, noscript, mjx-container, .highlight')
      .forEach(e => e.remove());
  return root.textContent;
}"""

_IMAGES_JS = """async () => {
  const imgs = [...document.images];
  imgs.forEach(i => { i.loading = 'eager'; });
  await Promise.all(imgs.map(i => i.complete ? null : new Promise(r => { i.onload = i.onerror = r; })));
  return imgs.map(i => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0}));
}"""

_TYPESET_JS = """async () => {
  if (!document.querySelector('.math')) return {math: 0, typeset: 0, untypeset: 0, errors: 0, mathjax: !!window.MathJax};
  if (!(window.MathJax && MathJax.startup && MathJax.startup.promise)) return {math: -1};
  await MathJax.startup.promise;
  return {math: document.querySelectorAll('.math').length,
          typeset: document.querySelectorAll('mjx-container').length,
          untypeset: document.querySelectorAll('.math:not(:has(mjx-container))').length,
          errors: document.querySelectorAll('mjx-merror, [data-mjx-error]').length,
          mathjax: true};
}"""

_RAW_PATTERNS = [("$$", re.compile(r"\$\$")), ("\\[", re.compile(r"\\\[")), ("\\(", re.compile(r"\\\(")),
                 ("\\begin{", re.compile(r"\\begin\{")),
                 ("$...$", re.compile(r"(?<![\w$\\])\$[^\s$](?:[^$\n]*?[^\s$\\])?\$(?![\w$])"))]


def _site_pages(out: Path) -> list[str]:
    pages = [p.relative_to(out).as_posix() for p in out.rglob("*.html")
             if not p.relative_to(out).parts[0].startswith(("_static", "_sources", "_images"))]
    return sorted(pages, key=lambda p: (p != "index.html", p))


def test_every_page_in_chromium(site, server, browser):
    if SCREENSHOTS.exists():
        shutil.rmtree(SCREENSHOTS)
    SCREENSHOTS.mkdir(parents=True)
    context = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
    watch = _Watch(context)
    current = {"page": ""}
    page = context.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    watch.attach(page, lambda: current["page"])
    problems, typeset_total, images_total = [], 0, 0
    pages = _site_pages(site["out"])
    t0 = time.perf_counter()
    for name in pages:
        current["page"] = name
        page.goto(f"{server}/{name}", wait_until="load")
        m = page.evaluate(_TYPESET_JS)
        if m["math"] == -1:
            problems.append(f"{name}: has math but MathJax is not loaded")
        elif m["math"]:
            typeset_total += m["typeset"]
            if m["untypeset"] or m["typeset"] < m["math"]:
                problems.append(f"{name}: {m['untypeset']} of {m['math']} math elements not typeset")
            if m["errors"]:
                problems.append(f"{name}: {m['errors']} MathJax errors (bad TeX)")
        raw = page.evaluate(_RAW_MATH_JS)
        for label, pat in _RAW_PATTERNS:
            hit = pat.search(raw)
            if hit:
                ctx = raw[max(0, hit.start() - 40): hit.end() + 40].replace("\n", " ")
                problems.append(f"{name}: raw {label} in the rendered text: ...{ctx}...")
        for img in page.evaluate(_IMAGES_JS):
            images_total += 1
            if not img["ok"]:
                problems.append(f"{name}: image did not load: {img['src']}")
        shot = SCREENSHOTS / (name[: -len(".html")].replace("/", "__") + ".png")
        page.screenshot(path=str(shot), full_page=True)
    elapsed = time.perf_counter() - t0
    context.close()
    print(f"\nchecked {len(pages)} pages in Chromium in {elapsed:.1f}s: {typeset_total} equations typeset, "
          f"{images_total} images; screenshots in {SCREENSHOTS}")
    assert not watch.external, "requests left localhost:\n" + "\n".join(watch.external)
    assert not watch.errors, "console errors / failed loads:\n" + "\n".join(watch.errors)
    assert not problems, "\n".join(problems)
    assert typeset_total > 0, "no equation typeset anywhere on the site (the chapters are full of math)"


def _search_term(site) -> tuple[str, str]:
    "A word from the first chapter's title, and that chapter's page."
    nb = site["notebooks"][0]
    title = _soup(_page(site, nb)).select_one("article h1").get_text(" ")
    words = sorted((w for w in re.findall(r"[A-Za-z]{5,}", title)), key=len, reverse=True)
    assert words, f"no searchable word in the title {title!r}"
    return words[0].lower(), nb.relative_to(REPO).with_suffix(".html").as_posix()


@pytest.mark.parametrize("origin", ["server", "file"])
def test_search_and_navigation(site, server, browser, origin):
    base = server if origin == "server" else site["out"].as_uri()
    context = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
    watch = _Watch(context, allow_file=origin == "file")
    page = context.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    watch.attach(page, lambda: f"{origin}:{page.url}")
    nbs = [nb.relative_to(REPO).with_suffix(".html").as_posix() for nb in site["notebooks"]]

    # navigation: sidebar lists the chapters; clicking the first opens it; "next" leads to the second
    page.goto(f"{base}/index.html", wait_until="load")
    links = page.eval_on_selector_all(".sidebar-tree a.reference.internal", "els => els.map(e => e.getAttribute('href'))")
    assert [l for l in links if l.startswith("nbs/")] == nbs
    page.click(f".sidebar-tree a[href='{nbs[0]}']")
    page.wait_for_url(f"**/{nbs[0]}")
    assert page.inner_text("article h1").strip()
    if len(nbs) > 1:
        page.click("a.next-page")
        page.wait_for_url(f"**/{nbs[1]}")

    # search: a word of the first chapter's title finds that chapter
    term, target = _search_term(site)
    page.goto(f"{base}/search.html?q={term}", wait_until="load")
    page.wait_for_selector("ul.search li a")
    hits = page.eval_on_selector_all("ul.search li a", "els => els.map(e => e.getAttribute('href'))")
    assert any(h.split("#")[0].endswith(target) for h in hits), f"search for {term!r} did not find {target}: {hits}"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"search-{origin}.png"))
    context.close()
    assert not watch.external, "requests left localhost:\n" + "\n".join(watch.external)
    assert not watch.errors, "console errors / failed loads:\n" + "\n".join(watch.errors)
