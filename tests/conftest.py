"""Shared fixtures: every scenario from tests/factories.py is built once per session, on demand."""

from __future__ import annotations

import os

# The factories and the merger must never reach the Hub; everything here is built in code.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

ENGINES = ["stream", "peft"]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs that take more than a few seconds")


@pytest.fixture(scope="session")
def scenario_cache(tmp_path_factory):
    """``get(name) -> Scenario``; each scenario's folders are written once for the whole session."""
    import torch

    from .factories import build_scenario

    cache = {}

    def get(name: str):
        if name not in cache:
            # the builders seed the global RNG themselves; leave the session's RNG state as it was
            with torch.random.fork_rng():
                cache[name] = build_scenario(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.fixture
def scenario(request, scenario_cache):
    """Parametrize indirectly with a scenario name: ``@pytest.mark.parametrize("scenario", NAMES, indirect=True)``."""
    return scenario_cache(request.param)


@pytest.fixture(scope="session")
def demo_pair(tmp_path_factory):
    """The demo's base and adapter (merger.demo), built once; tests that change files use ``copies``."""
    from merger.demo import build_demo_pair

    return build_demo_pair(tmp_path_factory.mktemp("demo"))


@pytest.fixture
def copies(demo_pair, tmp_path):
    """A private copy of the demo pair, for tests that break or rearrange its files."""
    import shutil

    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(demo_pair[0], base)
    shutil.copytree(demo_pair[1], adapter)
    return base, adapter
