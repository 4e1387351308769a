"""Sphinx configuration for the unifiededit documentation site.

Do not run `sphinx-build` on this folder directly: `python docs/build.py` first stages the sources (README.md as the
index page, the notebooks with nbdev directives stripped, one API page per exported module), then runs Sphinx with
this file as its configuration, passing the values of settings.ini (project name, version, ...) as overrides.
"""
from __future__ import annotations

import re

# -- project (overridden by build.py from settings.ini) ------------------------------------------------------------
project = "unifiededit"
author = "The unifiededit developers"
copyright = "2026 onwards, The unifiededit developers"
version = release = ""

# -- extensions -----------------------------------------------------------------------------------------------------
extensions = [
    "myst_nb",              # notebooks (stored outputs) and Markdown
    "sphinx.ext.autodoc",   # API reference from the modules nbdev exports
    "sphinx.ext.napoleon",  # Google/NumPy-style sections in docstrings
    "sphinx.ext.mathjax",   # math, typeset by ...
    "sphinx-mathjax-offline",  # ... MathJax 3.2.2 from this package, copied to _static/mathjax: no CDN
    "sphinx.ext.viewcode",  # highlighted module source beside the API reference
]
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
root_doc = "index"
smartquotes = False  # the front page is README.md: keep its quotes and dashes exactly as written

# -- notebooks: render what is stored, never execute ----------------------------------------------------------------
nb_execution_mode = "off"
nb_merge_streams = True
nb_output_stderr = "show"
nb_ipywidgets_js = {}          # no widget manager scripts (they come from a CDN); widget outputs are dropped by build.py
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_dmath_double_inline = True  # `$$...$$` inside a paragraph, as Jupyter renders it
myst_heading_anchors = 3         # `[text](#some-heading)` links, as on GitHub and in Jupyter
# `name` in a docstring links to a documented object when it can; an ambiguous short name (`mom2` is an attribute of
# two classes) stays a link to the first match rather than failing the build
suppress_warnings = ["mystnb.unknown_mime_type", "ref.python"]

# -- math: MathJax 3 from _static/mathjax (sphinx-mathjax-offline sets mathjax_path = "mathjax/tex-chtml.js") -------
# TeX packages beyond base/ams (boldsymbol, mathtools, physics, ...) autoload from the vendored copy;
# myst-parser fills options.processHtmlClass so that only Sphinx math nodes are typeset.
mathjax3_config = {"options": {}}

# -- API reference ---------------------------------------------------------------------------------------------------
autodoc_default_options = {
    "members": True,           # automodule honours the module's __all__, i.e. exactly what nbdev exported ...
    "imported-members": True,  # ... including names a module re-exports (only modules with an __all__ are documented)
    "undoc-members": True,
    "show-inheritance": True,
    "member-order": "bysource",
}
autoclass_content = "both"
default_role = "py:obj"  # `name` in a docstring: a link when it names a documented object, code otherwise
autodoc_typehints = "both"
autodoc_typehints_description_target = "all"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = True

# -- HTML -----------------------------------------------------------------------------------------------------------
html_theme = "furo"
html_title = project
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_js_files = ["file-protocol.js"]  # search without result summaries when the site is opened from disk
html_favicon = "_static/favicon.svg"
html_show_sourcelink = False
html_copy_source = False
html_last_updated_fmt = None
html_theme_options = {"navigation_with_keys": True}


# -- nbdev "docments": parameter comments in the signature become parameter descriptions ----------------------------
_PARAM_RE = re.compile(r"^:param\s+(?:[^:]+\s+)?\*{0,2}(\w+):")
_RETURNS_RE = re.compile(r"^:returns?:")


def _same_line(src: str, name: str, comment: str) -> bool:
    "Whether `src` has `name` and `# comment` on one line (nbdev's docments convention)."
    first = comment.split()[0] if comment.split() else ""
    pat = re.compile(rf"(?<![\w.]){re.escape(name)}\b.*#\s*{re.escape(first)}")
    return any(pat.search(line) for line in src.splitlines())


def _docments_lines(obj, lines: list[str]) -> list[str]:
    """`:param name: comment` lines for the nbdev-style comments on `obj`'s parameters not already in `lines`."""
    try:
        import inspect
        from fastcore.docments import docments
        doc = docments(obj, full=True)
        src = inspect.getsource(obj)
    except Exception:  # builtins, C extensions, objects without retrievable source: nothing to add
        return []
    have = {m.group(1) for m in map(_PARAM_RE.match, lines) if m}
    has_returns = any(_RETURNS_RE.match(line) for line in lines)
    out = []
    for name, info in doc.items():
        comment = (info or {}).get("docment")
        if not comment or name in ("self", "cls"):
            continue
        comment = " ".join(str(comment).split())
        if name != "return" and not _same_line(src, name, comment):
            continue  # a comment on the line above (e.g. `# keys` heading a group of dataclass fields) is no docment
        if name == "return":
            if not has_returns:
                out.append(f":returns: {comment}")
        elif name not in have:
            out.append(f":param {name}: {comment}")
    return out


# -- docstrings are Markdown in an nbdev project (`code`, $math$, [links](url)); autodoc parses reStructuredText ----------
_CODE_RE = re.compile(r"(``.+?``|(?<!`)`[^`]+`(?!`))")
_DOLLAR_RE = re.compile(r"(?<![\\$\w])\$([^$\s](?:[^$]*?[^$\s\\])?)\$(?![\w$])")
_STAR_RE = re.compile(r"(?<![\w\\*])(\*{1,2})(?=\S)")  # `*args`, `**kwargs`, `{*,`: literal unless closed later
_MDLINK_RE = re.compile(r"(?<!!)\[([^\]]+)\]\((\S+?)\)")


def _md_inline(line: str) -> str:
    """One Markdown docstring line as reStructuredText: `$x$` -> :math:`x`, `[t](u)` -> `t <u>`__, and code spans
    glued to a word (`x`s) separated with an escaped space so that reST still sees them as inline markup."""
    parts = _CODE_RE.split(line)
    out = []
    for i, p in enumerate(parts):
        if i % 2:
            before = out[-1][-1:] if out else ""
            after = parts[i + 1][:1] if i + 1 < len(parts) else ""
            if before and not before.isspace() and before not in "-:/'\"<([{":
                out[-1] += "\\ "  # reST inline markup must start after whitespace or opening punctuation ...
            if after and not after.isspace() and after not in "-.,:;!?\\/'\")]}>":
                p += "\\ "  # ... and end before whitespace or closing punctuation
            out.append(p)
        else:
            p = _MDLINK_RE.sub(lambda m: f"`{m.group(1)} <{m.group(2)}>`__", p)
            p = _STAR_RE.sub(lambda m: m.group(0) if re.search(r"[\w)]" + re.escape(m.group(1)) + r"(?!\w)",
                                                                  p[m.end():]) else "\\*" * len(m.group(1)), p)
            out.append(_DOLLAR_RE.sub(lambda m: f":math:`{m.group(1)}`", p))
    return "".join(out)


def _md_docstring(lines: list[str]) -> list[str]:
    "Markdown docstring lines -> reST; doctest blocks and fenced code are kept verbatim (fences become code-blocks)."
    out: list[str] = []
    in_doctest = fence = False
    for line in lines:
        s = line.strip()
        if fence:
            if s.startswith("```"):
                fence = False
                out.append("")
            else:
                out.append("   " + line)
            continue
        if s.startswith("```"):
            fence = True
            out += ["", f".. code-block:: {s.strip('`').strip() or 'python'}", ""]
            continue
        if s.startswith(">>>"):
            in_doctest = True
        elif not s:
            in_doctest = False
        out.append(line if in_doctest else _md_inline(line))
    return out


def _is_type_doc(obj, lines: list[str]) -> bool:
    "True when autodoc picked up the docstring of a constant's *type* (tuple, dict, int, ...), not of the constant."
    tdoc = getattr(type(obj), "__doc__", None)
    return bool(tdoc) and " ".join("\n".join(lines).split()) == " ".join(tdoc.split())


def _add_docments(app, what, name, obj, options, lines):
    if what in ("data", "attribute") and _is_type_doc(obj, lines):
        lines[:] = []
        return
    lines[:] = _md_docstring(lines)
    if what not in ("function", "method", "class"):
        return
    extra = [_md_inline(line) for line in _docments_lines(obj, lines)]
    if extra:
        if lines and lines[-1].strip():
            lines.append("")
        lines.extend(extra)


_TITLE_MATH_RE = re.compile(r"\\\((.+?)\\\)|\\\[(.+?)\\\]", re.S)


def _plain_title(app, pagename, templatename, context, doctree):
    "The browser tab cannot typeset math: `<title>` shows a chapter title's TeX without its delimiters."
    if context.get("title"):
        context["title"] = _TITLE_MATH_RE.sub(lambda m: (m.group(1) or m.group(2)).strip(), context["title"])


def setup(app):
    # MathJax on every page, not only those with equations: chapter titles with math appear in every page's sidebar
    app.set_html_assets_policy("always")
    app.connect("html-page-context", _plain_title)
    # after napoleon (priority 500) has turned "Args:" sections into :param: fields, so that no parameter is listed twice
    app.connect("autodoc-process-docstring", _add_docments, priority=600)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
