"""Open a finished run folder: the recipe, the 4-bit base and the trained adapter."""

from __future__ import annotations

from pathlib import Path

from ..config import Recipe, load_recipe
from ..lora import AdapterError, load_adapter
from ..models import LoadedModel, load_base_model

__all__ = ["RunError", "load_run"]


class RunError(ValueError):
    """A run folder is missing a part that the command needs."""


def load_run(run_dir: str | Path, *, adapter: bool = True) -> tuple[LoadedModel, Recipe]:
    """The run's base model (4-bit) with its adapter attached, ready for inference."""
    run = Path(run_dir)
    if not run.is_dir():
        raise RunError(f"{run}: no such run folder")
    rpath = run / "recipe.yaml"
    if not rpath.is_file():
        raise RunError(f"{run}: no recipe.yaml; expected a run folder made by 'qlorakit train'")
    recipe = load_recipe(rpath)
    apath = run / "adapter"
    if adapter and not (apath / "adapter_model.safetensors").is_file():
        raise RunError(f"{run}: no adapter/adapter_model.safetensors; the run has not finished "
                       f"(continue it with 'qlorakit train --resume {run}')")
    loaded = load_base_model(recipe.model)
    if adapter:
        try:
            load_adapter(loaded.model, apath)
        except AdapterError as e:
            raise RunError(f"{apath}: {e}") from e
    loaded.model.eval()
    return loaded, recipe
