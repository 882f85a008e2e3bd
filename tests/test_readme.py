"""The README stays true: its first two blocks are the install/run and test commands, and its
recipe reference lists every recipe key."""

from __future__ import annotations

import re
from pathlib import Path

from qlorakit.config import describe_recipe

README = Path(__file__).resolve().parents[1] / "README.md"


def test_first_blocks_are_the_two_commands():
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    assert "qlorakit train" in blocks[0] and "torch==2.13.0" in blocks[0]
    assert "pytest" in blocks[1] and ".[test]" in blocks[1]


def test_recipe_reference_lists_every_key():
    text = README.read_text()
    missing = [k for k, _, _ in describe_recipe() if f"`{k}`" not in text]
    assert not missing, f"README recipe reference lacks {missing}"
