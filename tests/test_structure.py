"""The shape of the package: short functions, no branches on registered names, no tracker tags."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "unlearn"
MAX_FUNCTION_LINES = 80


def _functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(ROOT), node


def test_no_function_in_the_package_is_over_80_lines():
    long = [f"{p}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)" for p, n in _functions()
            if n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


def _registered_names() -> set[str]:
    """Every model family, formulation and method name the configs can select."""
    from unlearn.families import FAMILIES, family_class

    family_class("gmm")  # imports the built-in families
    names = set(FAMILIES)
    for group in ("formulation", "method", "model"):
        names |= {p.stem for p in (ROOT / "configs" / group).glob("*.yaml")}
    return names


def _literals(node) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for e in node.elts for s in _literals(e)]
    return []


# literals that happen to equal a registered name but mean something else
ALLOWED = {("unlearn/samplers.py", "ddpm")}  # the DDPM sampler (model.sampler.kind), not the pixel-DDPM family


def test_no_comparison_with_a_family_formulation_or_method_name():
    """A family, formulation or method is a class chosen by the config, never an ``if name == ...``."""
    names = _registered_names()
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                rel = str(path.relative_to(ROOT))
                found = [s for side in [node.left, *node.comparators] for s in _literals(side)
                         if s in names and (rel, s) not in ALLOWED]
                if found:
                    hits.append(f"{path.relative_to(ROOT)}:{node.lineno} compares with {found}")
    assert not hits, hits


TAG = re.compile(r"\b(session|issue)\s+#?\d+", re.IGNORECASE)


def test_no_tracker_tags_in_code_configs_or_docs():
    files = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *ROOT.glob("*.py")]
    for folder in ("unlearn", "configs", "docs", "scripts", "tests"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".yaml", ".md", ".txt")]
    hits = [f"{p.relative_to(ROOT)}: {m.group(0)!r}" for p in files if p.is_file()
            for m in TAG.finditer(p.read_text(errors="ignore"))]
    assert not hits, hits
