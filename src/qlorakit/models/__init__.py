"""Base models: resolve a name, folder or GGUF file; load with a 4-bit base and the tokenizer."""

from .loader import (
    LoadedModel,
    ModelError,
    cache_dir,
    default_gguf_path,
    load_base_model,
    load_tokenizer,
    pick_compute_dtype,
    pick_device,
    resolve_base,
)

__all__ = [
    "LoadedModel",
    "ModelError",
    "cache_dir",
    "default_gguf_path",
    "load_base_model",
    "load_tokenizer",
    "pick_compute_dtype",
    "pick_device",
    "resolve_base",
]

from .generation import GenerationResult, autocast_for, chat_prompt, generate, generate_stream  # noqa: E402

__all__ += ["GenerationResult", "autocast_for", "chat_prompt", "generate", "generate_stream"]
