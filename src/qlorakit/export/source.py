"""The model an export comes from, and its weights in full precision.

The source is the tuned model as qlorakit runs it: the 4-bit NF4 base with the LoRA adapter on top.
Its full-precision form takes each 4-bit weight dequantized (the adapter was trained against those
values, not the original ones) and, for a merge, adds ``scaling * B @ A`` in fp32 -- always on a copy:
the source model is never changed.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Recipe
from ..lora import LoraLinear, attach_lora, lora_state_dict, load_lora_state_dict, read_adapter_config
from ..models import LoadedModel
from ..quant import dequantize, is_linear4bit
from .common import ExportError

__all__ = [
    "Source",
    "fp32_compute",
    "open_source",
    "check_run_dir",
    "full_precision_state",
    "plain_config",
    "plain_config_of",
    "build_model",
    "merged_model",
    "tuned_full_precision",
    "check_finite",
    "end_of_turn_ids",
]


@dataclass
class Source:
    run_dir: Path
    recipe: Recipe
    loaded: LoadedModel  # 4-bit base + LoRA, in eval mode

    @property
    def adapter_dir(self) -> Path:
        return self.run_dir / "adapter"

    @property
    def adapter_config(self) -> dict[str, Any]:
        return read_adapter_config(self.adapter_dir)


def check_run_dir(run_dir: str | Path) -> Path:
    """The run folder, checked for what an export needs before anything heavy is loaded."""
    run = Path(run_dir)
    if not run.exists():
        raise ExportError(f"{run}: no such run folder")
    if not run.is_dir():
        raise ExportError(f"{run}: not a folder; expected a run folder made by 'qlorakit train'")
    if not (run / "recipe.yaml").is_file():
        raise ExportError(f"{run}: no recipe.yaml; expected a run folder made by 'qlorakit train'")
    adapter = run / "adapter"
    missing = [n for n in ("adapter_config.json", "adapter_model.safetensors") if not (adapter / n).is_file()]
    if missing:
        raise ExportError(f"{run}: no trained adapter (missing {', '.join('adapter/' + m for m in missing)}); "
                          f"finish the run first (qlorakit train --resume {run})")
    return run


def open_source(run_dir: str | Path) -> Source:
    """Load the run's 4-bit base with its adapter, as ``qlorakit generate`` and ``serve`` run it."""
    from ..train import load_run

    run = check_run_dir(run_dir)
    loaded, recipe = load_run(run)
    return Source(run, recipe, loaded)


def _linear_weight(module: nn.Module) -> torch.Tensor:
    w = dequantize(module) if is_linear4bit(module) else module.weight.detach()
    return w.to("cpu", torch.float32)


def full_precision_state(model: nn.Module, *, merge: bool = True) -> dict[str, torch.Tensor]:
    """Every parameter of ``model`` in fp32 under the plain model's names (new tensors, a copy).

    4-bit linears are dequantized; a LoRA layer becomes its base weight plus, when ``merge``,
    ``scaling * B @ A`` computed in fp32. With ``merge=False`` this is the base the adapter was
    trained on, in full precision.
    """
    state: dict[str, torch.Tensor] = {}
    done: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(p) for p in done):
            continue
        prefix = f"{name}." if name else ""
        if isinstance(mod, LoraLinear):
            w = _linear_weight(mod.base)  # (out, in)
            if merge:
                a = mod.lora_A.weight.detach().to("cpu", torch.float32)  # (r, in)
                b = mod.lora_B.weight.detach().to("cpu", torch.float32)  # (out, r)
                w = w + (b @ a) * mod.scaling
            state[prefix + "weight"] = w.contiguous()
            if getattr(mod.base, "bias", None) is not None:
                state[prefix + "bias"] = mod.base.bias.detach().to("cpu", torch.float32).clone()
            done.append(prefix)
        elif is_linear4bit(mod):
            state[prefix + "weight"] = _linear_weight(mod).contiguous()
            if mod.bias is not None:
                state[prefix + "bias"] = mod.bias.detach().to("cpu", torch.float32).clone()
            done.append(prefix)
        else:
            for pname, p in mod.named_parameters(recurse=False):
                state[prefix + pname] = p.detach().to("cpu", torch.float32).clone()
    return state


def check_finite(state: dict[str, torch.Tensor], what: str) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ExportError(f"{what}: {len(bad)} tensor(s) hold NaN or infinite values: {', '.join(bad[:5])}")


def plain_config(loaded: LoadedModel) -> Any:
    """The base model's config without the 4-bit quantization settings."""
    return plain_config_of(loaded.model)


def plain_config_of(model: nn.Module) -> Any:
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.use_cache = True
    return cfg


def build_model(config: Any, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain fp32 model of ``config`` holding ``state``; every key must fit."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ExportError(f"full-precision weights do not fit {type(model).__name__}: {len(missing)} missing "
                          f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")
    with torch.no_grad():
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise ExportError(f"full-precision weight {k} has shape {tuple(v.shape)}, expected "
                                  f"{tuple(own[k].shape)}")
            own[k].copy_(v)
    model.eval()
    return model


def merged_model(source: Source) -> nn.Module:
    """The adapter merged into the dequantized base, in fp32 (a new model; the source is untouched)."""
    state = full_precision_state(source.loaded.model, merge=True)
    check_finite(state, "merged weights")
    return build_model(plain_config(source.loaded), state)


def tuned_full_precision(source: Source) -> nn.Module:
    """The tuned model in full precision without merging: dequantized base + LoRA layers in fp32."""
    from ..config import LoraConfig

    state = full_precision_state(source.loaded.model, merge=False)
    model = build_model(plain_config(source.loaded), state)
    conf = source.adapter_config
    targets = conf.get("target_modules") or ["all-linear"]
    attach_lora(model, LoraConfig(r=int(conf["r"]), alpha=float(conf["lora_alpha"]), dropout=0.0,
                                  targets=list(targets) if not isinstance(targets, str) else [targets]))
    load_lora_state_dict(model, lora_state_dict(source.loaded.model), where=str(source.adapter_dir))
    model.eval()
    return model


@contextlib.contextmanager
def fp32_compute(model: nn.Module) -> Iterator[None]:
    """Run the 4-bit linears of ``model`` with fp32 activations (the same 4-bit weights, no bf16 rounding)."""
    mods = [m for m in model.modules() if is_linear4bit(m)]
    before = [(m.compute_dtype, m.compute_type_is_set) for m in mods]
    for m in mods:
        m.compute_dtype = torch.float32
        m.compute_type_is_set = True
    try:
        yield
    finally:
        for m, (dt, is_set) in zip(mods, before):
            m.compute_dtype = dt
            m.compute_type_is_set = is_set


_EOT_TEXTS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>")  # the stop tokens of qlorakit.models.generate


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an answer in training and generation: eos, then known end-of-turn tokens."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    for t in _EOT_TEXTS:
        if t in vocab and vocab[t] not in ids:
            ids.append(vocab[t])
    return ids
