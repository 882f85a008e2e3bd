"""Exports that keep their promises: merged safetensors, PEFT adapter, GGUF (model and LoRA), Ollama.

Every export is checked against the tuned model it came from (:mod:`.parity`): golden prompts from
the held-out data through both, greedy; token agreement, the same end-of-turn token and the held-out
loss of both, against thresholds in the recipe's ``export`` section. The run's model card gets the
results and on-device figures (:mod:`.card`, :mod:`.ondevice`).
"""

from .api import DEFAULT_DTYPE, DEFAULT_QUANT, ExportResult, check_export, export_run
from .common import FORMATS, GGUF_QUANTS, LOSSY_GGUF_QUANTS, MERGED_DTYPES, REPORT_NAME, ExportError
from .gguf_file import read_gguf, write_lora_gguf, write_model_gguf
from .ollama import modelfile_text, ollama_chat_for, parse_modelfile, render_go_template, render_ollama
from .parity import ParityReport, golden_set, token_agreement
from .source import Source, full_precision_state, merged_model, open_source, tuned_full_precision

__all__ = [
    "DEFAULT_DTYPE",
    "DEFAULT_QUANT",
    "ExportError",
    "ExportResult",
    "FORMATS",
    "GGUF_QUANTS",
    "LOSSY_GGUF_QUANTS",
    "MERGED_DTYPES",
    "ParityReport",
    "REPORT_NAME",
    "Source",
    "check_export",
    "export_run",
    "full_precision_state",
    "golden_set",
    "merged_model",
    "modelfile_text",
    "ollama_chat_for",
    "open_source",
    "parse_modelfile",
    "read_gguf",
    "render_go_template",
    "render_ollama",
    "token_agreement",
    "tuned_full_precision",
    "write_lora_gguf",
    "write_model_gguf",
]
