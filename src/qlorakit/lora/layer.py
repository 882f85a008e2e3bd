"""LoRA on any linear layer, saved and loaded in the PEFT format.

``y = base(x) + (dropout(x) @ A^T @ B^T) * alpha / r`` with A (r, in) Kaiming-uniform and B (out, r)
zero, as peft initialises them, so a fresh adapter leaves the model unchanged.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import LoraConfig
from .dropout import HashDropout

__all__ = [
    "LoraLinear",
    "AdapterError",
    "ALL_LINEAR",
    "attach_lora",
    "lora_layers",
    "lora_parameters",
    "lora_state_dict",
    "load_lora_state_dict",
    "save_adapter",
    "load_adapter",
    "adapters_disabled",
    "PEFT_PREFIX",
    "read_adapter_config",
]

ALL_LINEAR = "all-linear"
PEFT_PREFIX = "base_model.model."
_OUTPUT_HEADS = ("lm_head", "embed_out", "output")


class AdapterError(ValueError):
    """An adapter could not be attached, saved or loaded."""


class LoraLinear(nn.Module):
    """A frozen base linear (4-bit or not) plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r <= 0:
            raise AdapterError(f"lora.r must be positive, got {r}")
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / r
        device = next((p.device for p in base.parameters()), torch.device("cpu"))
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = HashDropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        a = self.lora_A.weight
        b = self.lora_B.weight
        if torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)
        else:
            dt = y.dtype
        h = self.dropout(x).to(dt)
        return y + (h @ a.to(dt).t() @ b.to(dt).t() * self.scaling).to(y.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


def _is_linear(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    from ..quant import is_linear4bit

    return is_linear4bit(m)


def _targets(model: nn.Module, targets: list[str]) -> list[str]:
    names = []
    for name, m in model.named_modules():
        if not _is_linear(m) or isinstance(m, LoraLinear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if ALL_LINEAR in targets:
            if leaf in _OUTPUT_HEADS:
                continue
        elif leaf not in targets and name not in targets:
            continue
        names.append(name)
    return names


def attach_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Wrap the target linears of ``model`` in :class:`LoraLinear`; freeze everything else."""
    model.requires_grad_(False)
    names = _targets(model, list(cfg.targets))
    if not names:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})
        raise AdapterError(f"lora.targets: {cfg.targets} matched no linear layer; the model has {leaves}")
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, LoraLinear(getattr(parent, leaf), cfg.r, cfg.alpha, cfg.dropout))
    return names


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear):
            yield name, m


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, m in lora_layers(model) for p in (m.lora_A.weight, m.lora_B.weight)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights under peft's key names (``base_model.model.<path>.lora_A.weight``)."""
    out = {}
    for name, m in lora_layers(model):
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().to("cpu", torch.float32).contiguous()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().to("cpu", torch.float32).contiguous()
    return out


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], where: str = "adapter") -> None:
    """Copy adapter weights in; any missing or unexpected key is an error."""
    own = dict(lora_layers(model))
    expected = {f"{PEFT_PREFIX}{n}.lora_{ab}.weight" for n in own for ab in "AB"}
    # peft may write the adapter name into keys (".lora_A.default.weight"); accept both
    norm = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v for k, v in state.items()}
    missing = sorted(expected - norm.keys())
    unexpected = sorted(norm.keys() - expected)
    if missing or unexpected:
        raise AdapterError(
            f"{where}: adapter does not fit the model: {len(missing)} missing key(s) {missing[:3]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:3]}"
        )
    with torch.no_grad():
        for name, m in own.items():
            for ab in "AB":
                t = norm[f"{PEFT_PREFIX}{name}.lora_{ab}.weight"]
                p = getattr(m, f"lora_{ab}").weight
                if t.shape != p.shape:
                    raise AdapterError(f"{where}: {name}.lora_{ab} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
                p.copy_(t.to(p.dtype))


def _leaf_targets(model: nn.Module) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, _ in lora_layers(model)})


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_adapter(model: nn.Module, out_dir: str | Path, cfg: LoraConfig, *, base_name: str,
                 metadata: dict[str, str] | None = None) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` as peft does.

    ``metadata`` (e.g. the data licence terms) goes into the safetensors header.
    """
    import peft
    from safetensors.torch import save

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pcfg = peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=_leaf_targets(model),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_name,
    )
    conf = pcfg.to_dict()
    conf = {k: (sorted(v) if isinstance(v, set) else v) for k, v in conf.items()}
    if metadata:
        conf["qlorakit"] = metadata
    meta = {"format": "pt"} | {str(k): str(v) for k, v in (metadata or {}).items()}
    _write_atomic(out / "adapter_model.safetensors", save(lora_state_dict(model), metadata=meta))
    _write_atomic(out / "adapter_config.json", (json.dumps(conf, indent=2, default=str) + "\n").encode())
    return out


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    p = Path(adapter_dir) / "adapter_config.json"
    if not p.is_file():
        raise AdapterError(f"{adapter_dir}: no adapter_config.json; expected a PEFT adapter folder")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterError(f"{p}:{e.lineno}: malformed JSON ({e.msg})") from e


def read_adapter_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter's safetensors file; a truncated or foreign file is an AdapterError."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors' SafetensorError (not exported under one name), OSError
        raise AdapterError(f"{path}: cannot be read as safetensors ({e}); the file is damaged or not an "
                           "adapter's weights") from e


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> LoraConfig:
    """Attach LoRA layers as an adapter folder describes and load its weights."""
    conf = read_adapter_config(adapter_dir)
    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.is_file():
        raise AdapterError(f"{adapter_dir}: no adapter_model.safetensors")
    targets = conf.get("target_modules") or [ALL_LINEAR]
    if isinstance(targets, str):
        targets = [ALL_LINEAR] if targets == ALL_LINEAR else [targets]
    cfg = LoraConfig(r=int(conf["r"]), alpha=float(conf["lora_alpha"]), dropout=float(conf.get("lora_dropout", 0.0)),
                     targets=list(targets))
    if not any(True for _ in lora_layers(model)):
        attach_lora(model, cfg)
    load_lora_state_dict(model, read_adapter_weights(weights), where=str(weights))
    return cfg


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model alone: every LoRA layer passes its input through the base only."""
    layers = [m for _, m in lora_layers(model)]
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m, e in zip(layers, before):
            m.enabled = e
