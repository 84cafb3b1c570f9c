"""llama-ft: DeepSpeed ZeRO-3 LoRA fine-tuning for Llama 3.1 with PEFT adapters."""

__version__ = "0.1.0"
