"""LoRA adapters on any linear layer, in the PEFT file format."""

from .layer import (
    ALL_LINEAR,
    PEFT_PREFIX,
    AdapterError,
    LoraLinear,
    adapters_disabled,
    attach_lora,
    load_adapter,
    load_lora_state_dict,
    lora_layers,
    lora_parameters,
    lora_state_dict,
    read_adapter_config,
    read_adapter_weights,
    save_adapter,
)

__all__ = [
    "ALL_LINEAR",
    "PEFT_PREFIX",
    "AdapterError",
    "LoraLinear",
    "adapters_disabled",
    "attach_lora",
    "load_adapter",
    "load_lora_state_dict",
    "lora_layers",
    "lora_parameters",
    "lora_state_dict",
    "read_adapter_config",
    "read_adapter_weights",
    "save_adapter",
]
