"""One 4-bit base in memory, several LoRA adapters over it, switched per request.

The first run folder is loaded with :func:`qlorakit.train.load_run` (base + LoRA layers); every
other adapter is read from its run folder into memory as plain tensors. Switching copies an
adapter's tensors into the LoRA layers (a few MB for a small model) and sets its scaling; the base
model id runs with every LoRA layer turned off. Adapters of different ranks share the layers: each
is zero-padded to the largest rank, which leaves ``B @ A`` unchanged.

All adapters must have been trained on the same base (same ``model.base``, quantization type and
double quantization in their recipes) and on the same target layers; anything else is a
:class:`ServeError` naming both runs.

Not thread-safe by design: only the scheduler's single worker thread calls :meth:`activate`,
:meth:`generate` and :meth:`stream`.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ServeError

__all__ = ["AdapterInfo", "ModelHub"]

log = logging.getLogger(__name__)


@dataclass
class AdapterInfo:
    name: str
    run_dir: Path
    state: dict[str, torch.Tensor]  # peft key names, padded to the hub's rank
    r: int
    alpha: float
    created: int  # unix time the adapter was written

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def _norm_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
            for k, v in state.items()}


def _base_identity(model_cfg: Any) -> tuple[str, str, bool]:
    """What makes two bases the same: the resolved weights folder and the 4-bit format."""
    from ..models import resolve_base

    folder, _ = resolve_base(model_cfg.base)
    return str(Path(folder).resolve()), model_cfg.quant_type, model_cfg.double_quant


def _read_run_adapter(name: str, run_dir: Path) -> tuple[Any, dict[str, torch.Tensor], dict[str, Any]]:
    from ..config import RecipeError, load_recipe
    from ..lora import AdapterError, read_adapter_config, read_adapter_weights

    rpath = run_dir / "recipe.yaml"
    if not rpath.is_file():
        raise ServeError(f"adapter {name!r}: {run_dir} has no recipe.yaml; expected a run folder made by "
                         "'qlorakit train'")
    try:
        recipe = load_recipe(rpath)
        conf = read_adapter_config(run_dir / "adapter")
    except (RecipeError, AdapterError) as e:
        raise ServeError(f"adapter {name!r}: {e}") from e
    weights = run_dir / "adapter" / "adapter_model.safetensors"
    if not weights.is_file():
        raise ServeError(f"adapter {name!r}: {weights} is missing; the run has not finished")
    try:
        state = read_adapter_weights(weights)
    except AdapterError as e:
        raise ServeError(f"adapter {name!r}: {e}") from e
    return recipe, _norm_keys(state), conf


class ModelHub:
    """The served models: ``base_id`` (the base alone) and one id per adapter."""

    def __init__(self, loaded: Any, adapters: dict[str, AdapterInfo], base_id: str) -> None:
        from ..lora import lora_layers

        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        # a private copy for counting on the server's event loop: a fast tokenizer used from two
        # threads at once can fail ("Already borrowed") while the worker encodes and decodes
        self._counter = copy.deepcopy(loaded.tokenizer)
        self.adapters = adapters
        self.base_id = base_id
        self.created = int(time.time())
        self._layers: dict[str, Any] = dict(lora_layers(self.model))
        self._active: str | None = None
        cfg = getattr(self.model, "config", None)
        self.context_length = int(getattr(cfg, "max_position_embeddings", 0) or 0) or None

    # ---------------------------------------------------------------------------------------
    @classmethod
    def load(cls, adapters: dict[str, str], *, base: str | None = None, base_id: str | None = None) -> ModelHub:
        """Load the base once and every adapter's weights; check that they all fit together."""
        from ..config import ModelConfig
        from ..models import ModelError, load_base_model
        from ..train import RunError, load_run

        runs = {n: Path(d) for n, d in adapters.items()}
        for n, d in runs.items():
            if not d.is_dir():
                raise ServeError(f"adapter {n!r}: {d} is not a folder; expected a run folder (--adapter NAME=RUN_DIR)")
        if base_id is not None and base_id in runs:
            raise ServeError(f"the base model id {base_id!r} is also an adapter name; rename the adapter or "
                             "set base_id")
        # every run folder is read and checked against the first before the base is loaded
        read = {n: _read_run_adapter(n, d) for n, d in runs.items()}
        first_name = ""
        try:
            if read:
                first_name = next(iter(read))
                first_dir, first_recipe = runs[first_name], read[first_name][0]
                identity = _base_identity(first_recipe.model)
                for n, (recipe, _, _) in read.items():
                    if _base_identity(recipe.model) != identity:
                        raise ServeError(
                            f"adapter {n!r} ({runs[n]}) was trained on base {recipe.model.base!r} "
                            f"({recipe.model.quant_type}, double_quant={recipe.model.double_quant}), but adapter "
                            f"{first_name!r} ({first_dir}) on {first_recipe.model.base!r} "
                            f"({first_recipe.model.quant_type}, double_quant={first_recipe.model.double_quant}); "
                            "all adapters must share one base")
                if base is not None:
                    given = ModelConfig(base=base, quant_type=first_recipe.model.quant_type,
                                        double_quant=first_recipe.model.double_quant)
                    if _base_identity(given) != identity:
                        raise ServeError(f"--base {base!r} is not the base of adapter {first_name!r} "
                                         f"({first_recipe.model.base!r} in {first_dir / 'recipe.yaml'})")
                loaded, _ = load_run(first_dir)
            else:
                loaded = load_base_model(ModelConfig(base=base or "default"))
                loaded.model.eval()
        except (RunError, ModelError) as e:
            raise ServeError(str(e)) from e
        hub_layers = cls._layer_shapes(loaded.model)
        for n, (_, state, _) in read.items():
            cls._check_fits(n, runs[n], state, hub_layers, first_name)
        infos: dict[str, AdapterInfo] = {}
        r_max = max((int(c["r"]) for _, _, c in read.values()), default=0)
        if r_max:
            cls._grow_rank(loaded.model, r_max)
        for n, (_, state, conf) in read.items():
            wfile = runs[n] / "adapter" / "adapter_model.safetensors"
            infos[n] = AdapterInfo(n, runs[n], cls._pad(state, r_max), int(conf["r"]), float(conf["lora_alpha"]),
                                   int(wfile.stat().st_mtime))
        bid = base_id or loaded.name
        if bid in infos:
            raise ServeError(f"the base model id {bid!r} is also an adapter name; rename the adapter or set base_id")
        hub = cls(loaded, infos, bid)
        hub.activate(next(iter(infos)) if infos else bid)
        return hub

    @staticmethod
    def _layer_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
        from ..lora import PEFT_PREFIX, lora_layers

        return {f"{PEFT_PREFIX}{n}": (m.in_features, m.out_features) for n, m in lora_layers(model)}

    @staticmethod
    def _check_fits(name: str, run: Path, state: dict[str, torch.Tensor], layers: dict[str, tuple[int, int]],
                    first: str) -> None:
        have = {k.rsplit(".lora_", 1)[0] for k in state}
        missing, extra = sorted(set(layers) - have), sorted(have - set(layers))
        if missing or extra:
            raise ServeError(f"adapter {name!r} ({run}) adapts other layers than adapter {first!r}: "
                             f"{len(missing)} missing {missing[:2]}, {len(extra)} extra {extra[:2]}; adapters served "
                             "together must target the same layers (lora.targets)")
        for layer, (n_in, n_out) in layers.items():
            a, b = state.get(f"{layer}.lora_A.weight"), state.get(f"{layer}.lora_B.weight")
            if a is None or b is None:
                raise ServeError(f"adapter {name!r} ({run}): {layer} lacks lora_A or lora_B weights")
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != n_in or b.shape[0] != n_out or a.shape[0] != b.shape[1]:
                raise ServeError(f"adapter {name!r} ({run}): {layer} has lora_A {tuple(a.shape)} and lora_B "
                                 f"{tuple(b.shape)}, which do not fit a ({n_out} x {n_in}) layer of the base; it "
                                 "was trained on another base model")

    @staticmethod
    def _grow_rank(model: nn.Module, r: int) -> None:
        """Make every LoRA layer rank ``r`` (zero rows/columns added keep its output the same)."""
        from ..lora import lora_layers

        for _, m in lora_layers(model):
            if m.r == r:
                continue
            a, b = m.lora_A.weight.data, m.lora_B.weight.data
            new_a = nn.Linear(m.in_features, r, bias=False, device=a.device, dtype=a.dtype)
            new_b = nn.Linear(r, m.out_features, bias=False, device=b.device, dtype=b.dtype)
            with torch.no_grad():
                new_a.weight.zero_()
                new_b.weight.zero_()
                new_a.weight[: a.shape[0]] = a
                new_b.weight[:, : b.shape[1]] = b
            new_a.requires_grad_(False)
            new_b.requires_grad_(False)
            m.lora_A, m.lora_B, m.r = new_a, new_b, r

    @staticmethod
    def _pad(state: dict[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
        out = {}
        for k, t in state.items():
            t = t.to(torch.float32)
            if ".lora_A." in k and t.shape[0] < r:
                t = torch.cat([t, t.new_zeros(r - t.shape[0], t.shape[1])], 0)
            elif ".lora_B." in k and t.shape[1] < r:
                t = torch.cat([t, t.new_zeros(t.shape[0], r - t.shape[1])], 1)
            out[k] = t.contiguous()
        return out

    # ---------------------------------------------------------------------------------------
    def model_ids(self) -> list[str]:
        return [self.base_id, *self.adapters]

    def has(self, model_id: str) -> bool:
        return model_id == self.base_id or model_id in self.adapters

    def activate(self, model_id: str) -> None:
        """Make ``model_id`` the model that answers (worker thread only)."""
        if model_id == self._active:
            return
        from ..lora import load_lora_state_dict

        if model_id == self.base_id:
            for m in self._layers.values():
                m.enabled = False
        else:
            info = self.adapters[model_id]
            load_lora_state_dict(self.model, info.state, where=f"adapter {model_id!r}")
            for m in self._layers.values():
                m.enabled = True
                m.scaling = info.scaling
        self._active = model_id

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` (event-loop thread only; the worker uses :attr:`tokenizer`)."""
        return len(self._counter(text, add_special_tokens=False)["input_ids"])

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        from ..models import chat_prompt

        return chat_prompt(self.tokenizer, messages)

    def generate(self, model_id: str, prompt: str, **kw: Any) -> Any:
        from ..models import generate

        self.activate(model_id)
        return generate(self.model, self.tokenizer, prompt, **kw)

    def stream(self, model_id: str, prompt: str, **kw: Any) -> Iterator[str]:
        from ..models import generate_stream

        self.activate(model_id)
        return generate_stream(self.model, self.tokenizer, prompt, **kw)
