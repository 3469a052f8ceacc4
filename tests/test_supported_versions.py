"""The admitted release ranges: what `make test-lowest` installs is the floor of pyproject.toml, and what runs is admitted.

CI runs the generation, integration and client tests twice, with the newest releases (`make test`) and with the
floors (`make test-lowest`, pinned by .ci/lowest-constraints.txt). Both halves are only meaningful if the pins are the
floors and the environment under test really holds admitted releases.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PINNED = ("transformers", "accelerate", "peft", "lm_eval")


def requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    return {r.name.lower().replace("-", "_"): r for r in reqs}


def floor(req: Requirement) -> Version:
    lows = [Version(s.version) for s in req.specifier if s.operator == ">="]
    assert len(lows) == 1, f"{req} must state exactly one lower bound"
    return lows[0]


def test_lowest_constraints_pin_exactly_the_floors():
    pins = {}
    for line in (ROOT / ".ci" / "lowest-constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, pinned = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line).groups()
            pins[name.lower().replace("-", "_")] = Version(pinned)
    reqs = requirements()
    assert set(pins) == set(PINNED)
    for name, pinned in pins.items():
        assert pinned == floor(reqs[name]), f"{name}: pinned {pinned}, pyproject floor {floor(reqs[name])}"


@pytest.mark.parametrize("name", ["torch", *PINNED])
def test_installed_release_is_admitted(name):
    req = requirements()[name]
    try:
        installed = version(name)
    except PackageNotFoundError:
        pytest.fail(f"{name} is not installed: run `make setup` (it is in the project's dependencies or dev extra)")
    assert req.specifier.contains(Version(installed).base_version, prereleases=True), f"{name} {installed} vs {req}"
