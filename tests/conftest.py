"""Shared test settings: no network, deterministic torch, a per-test timeout."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MEDIA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "media")


@pytest.fixture(scope="session")
def media_dir() -> str:
    """../shared/media (real photos and videos; read in place, never copied)."""
    path = os.path.abspath(MEDIA)
    if not os.path.isdir(path):
        pytest.skip("../shared/media is not present")
    return path
