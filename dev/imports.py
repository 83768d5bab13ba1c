"""The import graph of the pgws package: who imports whom, line counts, and any cycle.

    python -m dev.imports            # one line per module: lines, then the pgws modules it imports
    python -m dev.imports --check    # exit 1 on a cycle or on psycopg imported outside pgws/db/

Only imports at module level count (an import inside a function is a deliberate late binding).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pgws"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(tree: ast.Module) -> Iterator[str]:
    for node in tree.body:
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            for alias in node.names:  # `from pgws import logs` imports the module pgws.logs
                yield f"{node.module}.{alias.name}"
        elif isinstance(node, ast.If):  # `if TYPE_CHECKING:` imports are not run
            continue


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]], dict[str, int]]:
    """(pgws imports, third-party imports, lines) per module."""
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path): path for path in paths}
    inner: dict[str, set[str]] = {}
    outer: dict[str, set[str]] = {}
    lines: dict[str, int] = {}
    for name, path in modules.items():
        source = path.read_text()
        lines[name] = source.count("\n")
        found = set(top_level_imports(ast.parse(source)))
        inner[name] = {o for o in found if o in modules and o not in (name, "pgws")}
        outer[name] = {other.split(".")[0] for other in found if not other.startswith("pgws")}
    return inner, outer, lines


def cycles(inner: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first walk (each reported once, from its smallest name)."""
    found: set[tuple[str, ...]] = set()

    def walk(node: str, path: list[str]) -> None:
        for nxt in sorted(inner.get(node, ())):
            if nxt in path:
                cycle = path[path.index(nxt) :]
                start = cycle.index(min(cycle))
                found.add(tuple(cycle[start:] + cycle[:start]))
            elif len(path) < 30:
                walk(nxt, [*path, nxt])

    for node in sorted(inner):
        walk(node, [node])
    return [list(cycle) for cycle in sorted(found)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail on cycles or misplaced psycopg")
    args = parser.parse_args()
    inner, outer, lines = graph()
    for name in sorted(inner):
        imports = ", ".join(sorted(other.removeprefix("pgws.") for other in inner[name]))
        print(f"{name:<28} {lines[name]:>4}  -> {imports or '-'}")  # noqa: T201
    problems = [f"cycle: {' -> '.join([*cycle, cycle[0]])}" for cycle in cycles(inner)]
    problems += [
        f"psycopg imported by {name} (only pgws.db.* may)"
        for name in sorted(outer)
        if "psycopg" in outer[name] and not name.startswith("pgws.db")
    ]
    for problem in problems:
        print(problem, file=sys.stderr)  # noqa: T201
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
