"""Size limits of the library, so that it cannot silently regrow.

The files are counted as they are: CI's `ruff format --check` guarantees they are formatted. A function or
a class is measured from its first decorator to its last line, without the lines of its docstrings.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_acm"
FILES = sorted(PACKAGE.glob("*.py"))
MAX_PACKAGE_LINES = 4000
MAX_FILE_LINES = {"functional.py": 450}
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 200


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def _docstring_lines(node: ast.AST) -> set[int]:
    body = node.body if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else []
    first = body[0] if body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return set(range(first.lineno, first.end_lineno + 1))  # type: ignore[operator]
    return set()


def _definition_sizes(path: Path) -> list[tuple[str, str, int]]:
    """``(kind, name, lines)`` of every function and class in ``path``, docstrings aside."""
    sizes = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            start = min([node.lineno] + [decorator.lineno for decorator in node.decorator_list])
            docstrings = set().union(*(_docstring_lines(inner) for inner in ast.walk(node)))
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            sizes.append(
                (
                    kind,
                    f"{path.name}:{node.lineno} {node.name}",
                    len(set(range(start, node.end_lineno + 1)) - docstrings),
                )
            )
    return sizes


def test_the_package_size():
    total = sum(_lines(path) for path in FILES)
    assert total <= MAX_PACKAGE_LINES, f"lightning_acm/ has {total} lines; the limit is {MAX_PACKAGE_LINES}."


@pytest.mark.parametrize(("name", "limit"), MAX_FILE_LINES.items())
def test_file_sizes(name, limit):
    assert _lines(PACKAGE / name) <= limit


def test_function_and_class_sizes():
    limits = {"function": MAX_FUNCTION_LINES, "class": MAX_CLASS_LINES}
    too_long = [
        f"{kind} {where}: {size}"
        for path in FILES
        for kind, where, size in _definition_sizes(path)
        if size > limits[kind]
    ]
    assert not too_long, f"over {limits} lines, docstrings aside: {too_long}"


def test_the_measure_counts_code_not_docstrings(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('def f():\n    """Doc\n    string."""\n    return 1\n\n\nclass C:\n    """Doc."""\n\n    x = 1\n')
    assert sorted(size for _, _, size in _definition_sizes(probe)) == [2, 3]
