"""Fixtures for the server tests: two run folders over one tiny base, and a live server.

The run folders are made directly (recipe.yaml + a PEFT adapter with random, non-zero LoRA
weights), so each adapter visibly changes the base's answers and the fixtures take seconds. The
server runs in a thread on a free loopback port, with four keys: ``alice`` and ``bob`` (ordinary
limits), ``flood`` (5 requests per minute) and ``frugal`` (120 tokens per minute).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_support import LiveServer, make_run, server_config, start_server


@pytest.fixture(scope="session")
def runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-runs")
    return {"support": make_run(root / "support", tiny_model_dir, r=4, alpha=8.0, seed=1),
            "tone": make_run(root / "tone", tiny_model_dir, r=8, alpha=8.0, seed=2)}


@pytest.fixture(scope="session")
def hub(runs: dict[str, Path]) -> Any:
    from qlorakit.serve import ModelHub

    return ModelHub.load({k: str(v) for k, v in runs.items()}, base_id="base")


@pytest.fixture(scope="session")
def live(runs: dict[str, Path], hub: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    db = tmp_path_factory.mktemp("serve-db") / "audit.db"
    srv = start_server(server_config(runs, db), hub)
    yield srv
    srv.stop()
