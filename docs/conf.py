"""Sphinx configuration of the bilevel documentation site.

Build (offline, warnings as errors)::

    pip install -e ".[docs]"
    sphinx-build -W --keep-going -b html docs docs/_build/html

The markdown guides render through MyST as they are; the API reference pages
are written into ``docs/api/generated/`` at build time, one per public module (every
subpackage of ``bilevel.problems`` included); the gallery runs every script in
``examples/`` and fails the build when one raises.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
from pathlib import Path
from typing import Any

import torch
from sphinx.pycode import ModuleAnalyzer

import bilevel
import bilevel.problems

DOCS = Path(__file__).resolve().parent

project = "bilevel"
author = "the bilevel developers"
copyright = "the bilevel developers"
release = version = bilevel.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_gallery.gen_gallery",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "auto_examples/*.ipynb", "auto_examples/*.py",
                    "auto_examples/*.zip", "auto_examples/*.md5", "auto_examples/*.json"]

html_theme = "furo"
html_title = f"bilevel {version}"

myst_heading_anchors = 4
myst_enable_extensions = ["dollarmath"]

autodoc_default_options = {"members": True, "undoc-members": True, "imported-members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(1)  # the examples are small: one thread is fastest, and spares a shared CPU
sphinx_gallery_conf = {
    "examples_dirs": str(DOCS.parent / "examples"),
    "gallery_dirs": str(DOCS / "auto_examples"),
    "filename_pattern": r"\.py$",  # run every example
    "ignore_pattern": r"(^|/)_",
    "only_warn_on_example_error": False,
    "download_all_examples": False,
    "write_computation_times": False,
    "min_reported_time": 1,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
}

API_MODULES = {
    "bilevel": "the core: problems, hypergradients, implicit differentiation, errors",
    "bilevel.solvers": "linear solvers and their results",
    "bilevel.solvers.minimize": "inner solvers (minimizers) and their results",
    "bilevel.testing": "gradient checks of a problem's hypergradient",
    "bilevel.testing.strategies": "hypothesis strategies: random bilevel problems with known answers",
    "bilevel.runner": "the run machinery of the training commands",
    "bilevel.runner.loop": "the one run loop and the protocol an instance implements",
    "bilevel.runner.flags": "the flags every training command shares",
    "bilevel.runner.datadir": "where the real data sets are read from",
    "bilevel.runner.devices": "the ``--device`` setting",
    "bilevel.runner.checkpoint": "checkpoints safe to stop and restart",
}


def public_modules() -> dict[str, str]:
    """The modules with an API page: :data:`API_MODULES` and every subpackage of ``bilevel.problems``."""
    problems = {f"bilevel.problems.{info.name}": "a problem instance"
                for info in pkgutil.iter_modules(bilevel.problems.__path__) if info.ispkg}
    return {**API_MODULES, **dict(sorted(problems.items()))}


def api_page(name: str, summary: str) -> str:
    """The page of module ``name``: its members by ``automodule``, plus its public constants and
    type aliases (which ``automodule`` leaves out when they are imported into it)."""
    module = importlib.import_module(name)
    documented = {attr for _, attr in ModuleAnalyzer.for_module(name).find_attr_docs()}
    text = f"{name}\n{'=' * len(name)}\n\n{summary[0].upper()}{summary[1:]}.\n\n.. automodule:: {name}\n"
    for member in getattr(module, "__all__", ()):
        obj = getattr(module, member)
        if not (inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj) or member in documented):
            text += f"\n.. autodata:: {name}.{member}\n"
    return text


def drop_type_docstrings(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """A constant or type alias without a doc comment shows its value, not the docstring of its type
    (which is what its ``__doc__`` holds)."""
    if what == "data" and "\n".join(lines).strip() == inspect.cleandoc(getattr(obj, "__doc__", None) or "").strip():
        lines.clear()


def setup(app: Any) -> None:
    app.connect("autodoc-process-docstring", drop_type_docstrings, priority=400)  # before napoleon


def write_api_pages() -> None:
    """One page per public module in ``api/generated/`` (rewritten only when its text changes)."""
    folder = DOCS / "api" / "generated"
    folder.mkdir(parents=True, exist_ok=True)
    for name, summary in public_modules().items():
        text = api_page(name, summary)
        page = folder / f"{name}.rst"
        if not page.exists() or page.read_text() != text:
            page.write_text(text)


write_api_pages()
