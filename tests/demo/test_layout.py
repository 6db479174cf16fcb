"""The layering: no pipeline module imports mft_pipeline.demo, and cache/ is the format alone (it does not
import stage one's collaborators, the corpus, the teacher and the models, nor the losses).

The package has two layers. The pipeline (PIPELINE, and the modules at the package's top level)
is what a user's own corpus and model go through. The recipes (RECIPES: the quickstart in demo/
and `mft compare`) are products built on it, which may use demo's corpora and model as their
defaults. Every subpackage is in exactly one layer, so a new one has to be placed.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "mft_pipeline"
PIPELINE = ("cache", "data", "teacher", "distill", "train", "eval", "sweep", "integrations")
RECIPES = ("demo", "compare")


def imported_modules(path: Path, root: Path = PACKAGE.parent) -> set[str]:
    """Absolute names of every module ``path`` (under ``root``) imports, anywhere in the file, also inside functions."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def pipeline_files() -> list[Path]:
    files = [f for sub in PIPELINE for f in sorted((PACKAGE / sub).rglob("*.py"))]
    files += [f for f in sorted(PACKAGE.glob("*.py"))]  # config, models, errors, the package itself
    return files


def test_every_subpackage_is_in_one_layer():
    subpackages = {d.name for d in PACKAGE.iterdir() if (d / "__init__.py").is_file()}
    assert subpackages == set(PIPELINE) | set(RECIPES) and not set(PIPELINE) & set(RECIPES)


def test_pipeline_packages_do_not_import_the_demo():
    files = pipeline_files()
    assert len(files) > 20 and all(sub in {f.parent.name for f in files} for sub in PIPELINE)
    offenders = {
        str(f.relative_to(PACKAGE.parent)): sorted(m for m in imported_modules(f) if m == "mft_pipeline.demo" or m.startswith("mft_pipeline.demo."))
        for f in files
    }
    assert {f: m for f, m in offenders.items() if m} == {}


def test_the_cache_package_is_the_format_alone():
    files = sorted((PACKAGE / "cache").glob("*.py"))
    assert len(files) > 4
    outside = ("mft_pipeline.data", "mft_pipeline.teacher", "mft_pipeline.models", "mft_pipeline.stage_one", "mft_pipeline.distill")
    offenders = {
        f.name: sorted(m for m in imported_modules(f) if any(m == o or m.startswith(o + ".") for o in outside)) for f in files
    }
    assert {f: m for f, m in offenders.items() if m} == {}


def test_the_scan_sees_every_import_form(tmp_path):
    # The checker itself: absolute, from-, relative and function-local imports all count.
    pkg = tmp_path / "mft_pipeline"
    (pkg / "train").mkdir(parents=True)
    cases = {
        "a.py": "import mft_pipeline.demo.corpora\n",
        "b.py": "from mft_pipeline.demo import quickstart\n",
        "c.py": "def f():\n    from ..demo.corpora import prepare_corpus\n",
        "d.py": "from .. import demo\n",
        "e.py": "from mft_pipeline.cache import reader\nfrom . import loop\n",
    }
    for name, text in cases.items():
        (pkg / "train" / name).write_text(text)
    demo = {name: any(m.startswith("mft_pipeline.demo") for m in imported_modules(pkg / "train" / name, tmp_path)) for name in cases}
    assert demo == {"a.py": True, "b.py": True, "c.py": True, "d.py": True, "e.py": False}
