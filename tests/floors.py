"""Print pip requirements that pin pgws's runtime dependencies to their floors (`make test-floors`).

pip has no lowest-version resolution, so each `name[extras]>=X` of [project].dependencies becomes
`name[extras]==X`; a dependency without a `>=` floor is an error, since CI could not test it. The
test tools the smoke run needs follow, with their own (unpinned) requirements from the dev extra.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).parent.parent / "pyproject.toml"
# What the smoke subset imports beyond pgws itself.
TEST_TOOLS = ("pytest", "pytest-asyncio", "hypothesis", "cryptography", "pgserver")
_REQUIREMENT = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)(?P<extras>\[[^\]]*\])?(?P<spec>.*)$")


def pinned_floor(requirement: str) -> str:
    """`psycopg[binary]>=3.3.6` -> `psycopg[binary]==3.3.6` (upper bounds are dropped)."""
    match = _REQUIREMENT.match(requirement.replace(" ", ""))
    floors = re.findall(r">=([^,;]+)", match["spec"]) if match else []
    if match is None or len(floors) != 1:
        raise SystemExit(f"floors.py: {requirement!r} has no single '>=' floor to test")
    return f"{match['name']}{match['extras'] or ''}=={floors[0]}"


def _name(requirement: str) -> str:
    match = _REQUIREMENT.match(requirement.replace(" ", ""))
    return match["name"].lower() if match else ""


def requirements(pyproject: dict[str, object]) -> list[str]:
    project = pyproject["project"]
    assert isinstance(project, dict)
    pins = [pinned_floor(item) for item in project["dependencies"]]
    dev = project["optional-dependencies"]["dev"]
    tools = [item for item in dev if _name(item) in TEST_TOOLS]
    return pins + tools


def main(argv: list[str]) -> None:
    """Runtime floors and test tools; with --build-system, the build backend at its floor."""
    with PYPROJECT.open("rb") as file:
        pyproject = tomllib.load(file)
    if argv == ["--build-system"]:
        lines = [pinned_floor(item) for item in pyproject["build-system"]["requires"]]
    else:
        lines = requirements(pyproject)
    sys.stdout.write("".join(f"{line}\n" for line in lines))


if __name__ == "__main__":
    main(sys.argv[1:])
