"""Imports point down only: the shared blocks (keel.text, keel.vectors) know nothing of the apps above them.

Read from the source (every import statement, lazy and TYPE_CHECKING ones included), not from what Python has
imported: a lazy import inside a function is as much a dependency as one at the top.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import keel

ROOT = Path(keel.__file__).parent

#: package -> the packages it must not import from (any module under them).
ABOVE_BLOCKS = ("keel.rag", "keel.evals", "keel.gateway", "keel.jobs", "keel.server", "keel.cli", "keel.models")
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "keel.text": ("keel.vectors", *ABOVE_BLOCKS),
    "keel.vectors": ABOVE_BLOCKS,
    "keel.evals": ("keel.rag",),
}
#: The evals modules that run a RAG collection as the thing under test (the RAG task adapter), and so may import
#: keel.rag (lazily). Scoring, storage, statistics and reports may not.
RAG_TASK_ADAPTERS = frozenset({"keel.evals.tasks", "keel.evals.runner"})


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    return imported_names(path.read_text(encoding="utf-8"), package)


def imported_names(source: str, package: str) -> set[str]:
    """Every module a source imports, as absolute names (`from keel import rag` counts as keel.rag)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations() -> list[str]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        module = module_name(path)
        for package, forbidden in FORBIDDEN.items():
            if not under(module, package) or module in RAG_TASK_ADAPTERS:
                continue
            for name in sorted(imported(path)):
                if any(under(name, f) for f in forbidden):
                    found.append(f"{module} imports {name}")
    return found


def test_blocks_and_evals_import_only_downwards() -> None:
    assert violations() == []


def test_the_blocks_exist_and_the_scorers_are_checked() -> None:
    """The rules above bite on real modules (a renamed package would make them vacuous)."""
    modules = {module_name(p) for p in ROOT.rglob("*.py")}
    for package in ("keel.text", "keel.vectors", "keel.evals.scorers", *RAG_TASK_ADAPTERS):
        assert package in modules, package


def test_the_moved_blocks_live_in_one_place() -> None:
    """No shim module left behind in rag/ for what moved to keel.text and keel.vectors."""
    modules = {module_name(p) for p in ROOT.rglob("*.py")}
    text = ("documents", "sentences", "chunking", "grounding", "tokenize", "words")
    vectors = ("ann", "keywords", "derived")
    for name in text:
        assert f"keel.text.{name}" in modules and f"keel.rag.{name}" not in modules, name
    for name in vectors:
        assert f"keel.vectors.{name}" in modules and f"keel.rag.index.{name}" not in modules, name


def test_the_checker_sees_lazy_relative_and_from_imports() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from keel.rag.answer import Quote\n"
        "def f():\n    from keel import gateway\n    import keel.server.app\n    from .. import rag\n"
    )
    names = imported_names(source, "keel.evals")
    assert {"keel.rag.answer", "keel.gateway", "keel.server.app", "keel.rag"} <= names


@pytest.mark.parametrize("doc", ["README.md", "docs/architecture.md"])
def test_the_layers_picture_shows_the_blocks_below_the_apps(doc: str) -> None:
    """The picture users read says what the rules above hold: blocks between the gateway and the models."""
    text = (ROOT.parents[1] / doc).read_text(encoding="utf-8")
    picture = next(b for b in re.findall(r"^```[\w-]*\n(.*?)^```", text, re.S | re.M) if b.startswith("cli/"))
    firsts = [line.split()[0] for line in picture.splitlines()]
    assert firsts == ["cli/", "apps:", "jobs/", "gateway/", "blocks:", "models/", "core:"]
    blocks = picture.splitlines()[firsts.index("blocks:")]
    assert "text/" in blocks and "vectors/" in blocks
    apps = picture.splitlines()[firsts.index("apps:")]
    assert "rag/" in apps and "evals/" in apps


def _third_party(package: str) -> set[str]:
    """Top-level names of the non-stdlib modules a package's files import."""
    import sys

    names = set()
    for path in (ROOT / package).rglob("*.py"):
        names |= {n.split(".")[0] for n in imported(path)}
    return {n for n in names if n not in sys.stdlib_module_names and n not in {"keel", "__future__"}}


def test_each_block_installs_on_its_own() -> None:
    """An app that needs only the text blocks (extraction, evals) installs `keel[text]`, not all of RAG."""
    import tomllib

    project = tomllib.loads((ROOT.parents[1] / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=\[; ]", r, maxsplit=1)[0].lower() for r in requirements}

    # import name -> distribution, for those that differ
    dist = {"docx": "python-docx", "markdown_it": "markdown-it-py", "bpe_openai": "bpe-openai"}
    core = names(project["dependencies"])
    for block in ("text", "vectors"):
        needed = {dist.get(n, n).lower() for n in _third_party(block)} - core
        needed.discard("tokenizers")  # WordPiece offsets: only with the local embedder, keel[embed]
        assert needed <= names(extras[block]), (block, needed - names(extras[block]))
    assert "keel[text,vectors]" in extras["rag"]
    assert "keel[text]" in extras["evals"]  # the faithfulness scorer splits sentences


#: Packages whose private names (`_x`) are theirs alone: an app uses their public API, never reaches inside.
SEALED = ("keel.jobs", "keel.trace")


def private_uses(source: str, package: str) -> set[str]:
    """Private names of a sealed package a source uses: imported (`from keel.jobs.engine import _active`) or
    read off an imported module (`worker_module._running`)."""
    found: set[str] = set()
    modules: dict[str, str] = {}  # local name -> the sealed module it is bound to
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                if any(under(base, s) or under(f"{base}.{alias.name}", s) for s in SEALED):
                    if alias.name.startswith("_"):
                        found.add(f"{base}.{alias.name}")
                    else:
                        modules[alias.asname or alias.name] = f"{base}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if any(under(alias.name, s) for s in SEALED):
                    if any(part.startswith("_") for part in alias.name.split(".")):
                        found.add(alias.name)
                    modules[alias.asname or alias.name] = alias.name
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = ast.unparse(node.value)
            if owner in modules:
                found.add(f"{modules[owner]}.{node.attr}")
    return found


def test_no_module_outside_jobs_and_trace_uses_their_private_names() -> None:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        module = module_name(path)
        if any(under(module, s) for s in SEALED):
            continue
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found += [f"{module} uses {name}" for name in sorted(private_uses(path.read_text(encoding="utf-8"), package))]
    assert found == []


def test_the_private_name_checker_sees_imports_and_module_attributes() -> None:
    source = (
        "from keel.trace import Span, _current\n"
        "def f():\n    from keel.jobs.engine import _active\n    from keel.jobs import worker as w\n"
        "    import keel.jobs.runner\n    return w._running, keel.jobs.runner._migrated, w.Worker\n"
    )
    assert private_uses(source, "keel.evals") == {
        "keel.trace._current",
        "keel.jobs.engine._active",
        "keel.jobs.worker._running",
        "keel.jobs.runner._migrated",
    }
