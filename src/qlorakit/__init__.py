"""qlorakit: QLoRA fine-tuning from data to a guarded API."""

__version__ = "0.1.0"
