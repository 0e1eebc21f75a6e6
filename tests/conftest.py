"""Shared fixtures for the model and training tests, and a loader for the scripts/ tools."""

from __future__ import annotations

import importlib.util
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


@pytest.fixture(scope="session")
def load_script() -> Callable[[str], ModuleType]:
    """load_script(name) imports scripts/<name>.py as a module (scripts/ is not a package)."""

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
