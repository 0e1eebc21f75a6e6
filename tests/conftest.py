"""Shared fixtures for the model and training tests, and a loader for the scripts/ tools."""

from __future__ import annotations

import importlib.util
import zlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

import attention_backends

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def restore_default_backend():
    """Put the registry's default backend and strictness back after the test."""
    name, strict = attention_backends.get_default_backend(), attention_backends.is_strict()
    yield
    attention_backends.set_default_backend(name, strict=strict)


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """A seed fixed by the test case's id: the same inputs on every run (a failure reproduces), other
    inputs for every case. (hash() of strings changes per process.)"""
    return zlib.crc32(request.node.nodeid.encode()) % 2**31


@pytest.fixture(scope="session")
def load_script() -> Callable[[str], ModuleType]:
    """load_script(name) imports scripts/<name>.py as a module (scripts/ is not a package)."""

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
