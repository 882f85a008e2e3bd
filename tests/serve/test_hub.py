"""Adapters served together must share the base and the adapted layers; clear errors otherwise."""

from __future__ import annotations

import shutil

import pytest
from serve_support import make_run

from qlorakit.serve import ModelHub, ServeError


def test_adapters_on_another_base_are_refused(runs, tiny_model_dir, tmp_path):
    other_base = tmp_path / "other-base"
    shutil.copytree(tiny_model_dir, other_base)
    other = make_run(tmp_path / "other", other_base, seed=3)
    with pytest.raises(ServeError) as e:
        ModelHub.load({"support": str(runs["support"]), "other": str(other)})
    msg = str(e.value)
    assert "adapter 'other'" in msg and "all adapters must share one base" in msg and str(other_base) in msg


def test_adapters_on_other_layers_are_refused(runs, tiny_model_dir, tmp_path):
    q_only = make_run(tmp_path / "q-only", tiny_model_dir, seed=4, targets=["q_proj"])
    with pytest.raises(ServeError, match="adapts other layers than adapter 'support'.*lora.targets"):
        ModelHub.load({"support": str(runs["support"]), "q": str(q_only)})


def test_missing_run_and_name_clash(runs, tmp_path):
    with pytest.raises(ServeError, match="is not a folder"):
        ModelHub.load({"x": str(tmp_path / "nope")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ServeError, match="no recipe.yaml"):
        ModelHub.load({"support": str(runs["support"]), "x": str(tmp_path / "empty")})
    with pytest.raises(ServeError, match="also an adapter name"):
        ModelHub.load({"support": str(runs["support"])}, base_id="support")
