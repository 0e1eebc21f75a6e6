"""Shared fixtures for the model and training tests."""

from __future__ import annotations

import pytest

import attention_backends


@pytest.fixture
def restore_default_backend():
    """Put the registry's default backend and strictness back after the test."""
    name, strict = attention_backends.get_default_backend(), attention_backends.is_strict()
    yield
    attention_backends.set_default_backend(name, strict=strict)
