"""finetune: QLoRA fine-tuning on 4-bit bitsandbytes bases with PEFT LoRA adapters."""

__version__ = "0.1.0"


def load_adapter(adapter_or_run_dir, **kwargs):
    """Return (quantized base with the saved adapter, tokenizer, run config); see finetune.adapter."""
    from finetune.adapter import load_adapter as _load

    return _load(adapter_or_run_dir, **kwargs)
