"""Dependency floors (pyproject.toml) and the committed constraints file agree with each other and with what is
installed: fresh machines get the pinned versions, and the pins load untrusted files safely."""

from __future__ import annotations

import importlib.metadata
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from testkit.local import REPO

SAFETY_FLOORS = {"torch": "2.6", "timm": "1.0.15", "aiohttp": "3.14.5"}
JUST_BELOW = {"torch": "2.5.1", "timm": "1.0.14", "aiohttp": "3.14.4"}


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    return {canonicalize_name(r.name): r for r in reqs}


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt pins exact versions only: {line!r}"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_pyproject_floors_are_the_safe_versions():
    requirements = _requirements()
    for name, floor in SAFETY_FLOORS.items():
        specifier = requirements[name].specifier
        assert specifier.contains(floor) and not specifier.contains(JUST_BELOW[name]), (name, str(specifier))


def test_constraints_pin_every_dependency_within_its_floor_and_not_the_project():
    pins = _pins()
    assert "cls-workers" not in pins
    for name, requirement in _requirements().items():
        assert name in pins, f"{name} is not pinned in constraints.txt (run `make constraints`)"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, str(pins[name]))


def test_installed_versions_are_the_pinned_ones():
    pins = _pins()
    for name in list(_requirements()) + list(SAFETY_FLOORS):
        installed = Version(importlib.metadata.version(name))
        assert installed.public == pins[canonicalize_name(name)].public, name
        if name in SAFETY_FLOORS:
            assert installed >= Version(SAFETY_FLOORS[name]), name
