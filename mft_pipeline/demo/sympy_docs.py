"""Math for the demos: SymPy's docstrings, from the PyPI package ``sympy`` (BSD-3-Clause).

torch depends on SymPy, so every environment that runs the pipeline has it. Its docstrings are
mathematics written for people: definitions and properties in reStructuredText with LaTeX
(``.. math::``, ``:math:``), references, and doctest examples. They are read with ``ast`` from
the installed package's ``*.py`` files outside ``tests``/``benchmarks`` folders (nothing is
imported). One document per module: its docstrings in source order, each under a line with the
dotted name of what it documents; modules with under 500 characters of docstrings are skipped.
Ids are the modules' paths inside the package, sorted.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path
from typing import Iterator

from mft_pipeline.demo.fetch import pip_package_data

#: A module whose docstrings add up to fewer characters than this is left out.
MIN_CHARS = 500

EXCLUDED_DIRS = frozenset({"tests", "test", "benchmarks", "__pycache__"})

_DEFINITIONS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def sympy_root(install: bool) -> Path:
    """The installed ``sympy`` package folder, pip-installing SymPy when missing."""
    return pip_package_data("sympy", "sympy", ".", "__init__.py", install=install)


def docstrings(source: str) -> Iterator[tuple[str, str]]:
    """``(dotted name, docstring)`` of a module's source in source order: the module itself
    (as ``""``), then each class and function, methods and nested definitions under their parent."""

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, _DEFINITIONS):
                name = f"{prefix}{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    yield name, doc
                yield from walk(child, name + ".")
            elif not isinstance(child, ast.expr):
                yield from walk(child, prefix)  # definitions under if/try blocks

    tree = ast.parse(source)
    doc = ast.get_docstring(tree)
    if doc:
        yield "", doc
    yield from walk(tree, "")


def module_text(module: str, source: str) -> str:
    """The module's docstrings, each under its dotted name (``sympy.core.add.Add.flatten``), blank-line separated."""
    parts = []
    for name, doc in docstrings(source):
        parts.append(f"{module}.{name}\n\n{doc}" if name else f"{module}\n\n{doc}")
    return "\n\n".join(parts)


def sympy_documents(root: str | os.PathLike, *, min_chars: int = MIN_CHARS) -> Iterator[dict]:
    """One document per module under ``root`` (the ``sympy`` folder) with at least ``min_chars`` of docstrings.

    Skips ``tests``/``test``/``benchmarks`` folders and files that are not UTF-8 Python. The id
    is the POSIX path relative to the folder above ``root`` (``sympy/core/add.py``).
    """
    root = Path(root)
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        rels += [(Path(dirpath) / fn).relative_to(root).as_posix() for fn in filenames if fn.endswith(".py")]
    for rel in sorted(rels):
        try:
            source = (root / rel).read_bytes().decode("utf-8")
            module = ".".join([root.name, *rel[: -len(".py")].split("/")]).removesuffix(".__init__")
            text = module_text(module, source)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        if len(text) >= min_chars:
            yield {"id": f"{root.name}/{rel}", "text": text}
