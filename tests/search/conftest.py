"""Fixtures of the search tests: a small photo folder and the fake model (tests/search/fake.py)."""

from __future__ import annotations

import pytest

from .fake import FakeModel, draw

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]


@pytest.fixture
def fake_model() -> FakeModel:
    return FakeModel()


@pytest.fixture
def photos(tmp_path):
    """12 photos, two of each colour, some in a sub-folder, in three formats."""
    root = tmp_path / "photos"
    for i in range(12):
        colour = COLOURS[i % len(COLOURS)]
        sub = "trip/" if i % 3 == 0 else ""
        ext = ("jpg", "png", "webp")[i % 3]
        draw(root / f"{sub}{colour}_{i:02d}.{ext}", colour, seed=i)
    return root
