"""Every code citation in the docs resolves: `package/file.py::Name.attr` names a real module and a
real attribute of it, so a rename in the code breaks this test rather than silently rotting a page."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CITATION = re.compile(r"`([A-Za-z0-9_./-]+\.py)::([A-Za-z_][\w.]*)`")
# An interview page answers with the code: fewer citations than this means it is not doing its job.
MIN_CITATIONS_PER_INTERVIEW_PAGE = 20

PAGES = sorted(DOCS.rglob("*.md"))
INTERVIEW_PAGES = sorted((DOCS / "interview").glob("*.md"))


def citations(page: Path) -> list[str]:
    return [f"{path}::{name}" for path, name in CITATION.findall(page.read_text(encoding="utf-8"))]


def module_name(path: str) -> str:
    parts = list(Path(path).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_instance_attribute(cls: type, name: str) -> bool:
    """A dataclass field without a class-level default, or an attribute that a method of the class
    (or of a base class) assigns as `self.name = ...`."""
    if name in getattr(cls, "__dataclass_fields__", {}):
        return True
    assignment = re.compile(rf"\bself\.{re.escape(name)}\s*(:[^=\n]+)?=[^=]")
    for klass in cls.__mro__:
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):  # builtins and C types have no Python source
            continue
        if assignment.search(source):
            return True
    return False


def resolve(citation: str) -> str | None:
    """None when the citation resolves, else why it does not."""
    path, dotted = citation.split("::")
    if not (ROOT / path).is_file():
        return f"{citation}: no file {path}"
    try:
        obj = importlib.import_module(module_name(path))
    except Exception as e:  # any import failure is a broken citation
        return f"{citation}: cannot import {module_name(path)}: {e!r}"
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if hasattr(obj, part):
            obj = getattr(obj, part)
        elif i == len(parts) - 1 and inspect.isclass(obj) and is_instance_attribute(obj, part):
            return None
        else:
            return f"{citation}: {'.'.join(parts[: i + 1])} does not exist"
    return None


def test_there_are_interview_pages():
    assert INTERVIEW_PAGES, "docs/interview/ has no pages"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_every_citation_resolves(page):
    broken = [err for c in citations(page) if (err := resolve(c)) is not None]
    assert not broken, "unresolved citations:\n" + "\n".join(broken)


@pytest.mark.parametrize("page", INTERVIEW_PAGES, ids=[p.name for p in INTERVIEW_PAGES])
def test_interview_pages_cite_the_code(page):
    found = citations(page)
    assert len(found) >= MIN_CITATIONS_PER_INTERVIEW_PAGE, f"{page.name}: only {len(found)} citations"


@pytest.mark.parametrize(
    "citation",
    [
        "m0_config/config.py::EngineConfig.no_such_method",
        "m0_config/config.py::NoSuchClass",
        "m0_config/no_such_file.py::EngineConfig",
        "m0_config/sequence.py::Sequence.no_such_attribute",
        "m0_config/sequence.py::Sequence.block_table.append.nope",
    ],
)
def test_the_resolver_rejects_broken_citations(citation):
    assert resolve(citation) is not None


@pytest.mark.parametrize(
    "citation",
    [
        "m0_config/config.py::EngineConfig._sync",  # a method
        "m0_config/config.py::resolve_dtype",  # a function
        "m0_config/config.py::ModelConfig.head_dim",  # a property
        "m0_config/sampling_params.py::SamplingParams.sampling_type",  # a dataclass field, no default
        "m0_config/sequence.py::SequenceStatus.WAITING",  # an enum member
        "m0_config/sequence.py::SequenceData.cumulative_logprob",  # a slot
        "m0_config/sequence.py::Sequence.block_table",  # assigned in __init__
        "m0_config/__init__.py::SamplingParams",  # a package re-export
    ],
)
def test_the_resolver_accepts_real_citations(citation):
    assert resolve(citation) is None
