"""Shared test fixtures: paths to ../shared/fixtures and a GPU skip rule."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "fixtures"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared fixtures not found at {path} (../shared is absent in this checkout)")
    return path


@pytest.fixture(scope="session")
def qupath_fixtures() -> Path:
    """``../shared/fixtures/qupath``: real QuPath projects and GeoJSON exports."""
    return _need(SHARED / "qupath")


@pytest.fixture(scope="session")
def image_fixtures() -> Path:
    """``../shared/fixtures/images``: real slides and images."""
    return _need(SHARED / "images")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``@pytest.mark.gpu`` tests when CUDA is not available."""
    gpu_items = [it for it in items if "gpu" in it.keywords]
    if not gpu_items:
        return
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for it in gpu_items:
            it.add_marker(skip)
