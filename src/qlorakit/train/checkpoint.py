"""Checkpoints written atomically with everything an exact resume needs.

Layout: ``checkpoints/step-N/`` holds the adapter (PEFT format) and ``state.pt`` (optimizer,
scheduler, step, data position, RNG states, a fingerprint of the data). The folder is written as
``.step-N.tmp``, every file fsynced, then renamed; ``checkpoints/LATEST`` is written last (also by
rename), so a checkpoint named by LATEST is always complete, whatever moment the process dies.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CheckpointError", "save_checkpoint", "latest_checkpoint", "load_checkpoint_state", "rng_state",
           "set_rng_state", "write_atomic", "fsync_dir"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing or does not fit the run."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write a file under a temporary name, fsync, then rename over the target."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(tmp, mode, **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt_root: Path, step: int, write_adapter: Any, state: dict[str, Any], keep: int) -> Path:
    """Write ``step-N`` atomically, point LATEST at it, then prune old checkpoints.

    ``write_adapter(folder)`` writes the adapter files into the given folder.
    """
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f".step-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_adapter(tmp)
    torch.save(state, tmp / "state.pt")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(ckpt_root)
    write_atomic(ckpt_root / "LATEST", f"step-{step}\n")
    done = sorted((p for p in ckpt_root.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    marker = ckpt_root / "LATEST"
    if not marker.is_file():
        return None
    name = marker.read_text(encoding="utf-8").strip()
    path = ckpt_root / name
    if not (path / "state.pt").is_file():
        raise CheckpointError(f"{marker} names {name}, but {path / 'state.pt'} is missing")
    return path


def load_checkpoint_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path / 'state.pt'}: cannot be read ({e})") from e
