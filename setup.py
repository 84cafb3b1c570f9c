"""Packaging for llama-ft.

Version ranges, not pins: the CPU machine installs torch 2.13.0 (its local CPU
build) and the GPU image carries torch 2.11 / transformers 5.17 preinstalled, so
a pin to either would make pip fetch another torch on the other.
"""

from setuptools import find_packages, setup

setup(
    name="llama-ft",
    version="0.1.0",
    description="DeepSpeed ZeRO-3 LoRA fine-tuning for Llama 3.1 (8B-405B) with PEFT adapters and a streaming merge",
    python_requires=">=3.10",
    packages=find_packages(include=["llama_ft", "llama_ft.*"]),
    package_data={"llama_ft": ["assets/*.jsonl", "assets/*.jinja"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.56",
        "peft>=0.13",
        "accelerate>=0.34",
        "safetensors>=0.4",
        "huggingface_hub>=0.25",
        "hf_transfer>=0.1",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy>=1.26",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "tokenizers>=0.20",
        "datasets>=2.20",
    ],
    extras_require={
        "tensorboard": ["tensorboard>=2.14"],  # --report_to tensorboard (torch.utils.tensorboard)
        "wandb": ["wandb>=0.17"],  # --report_to wandb
        "gguf": ["gguf>=0.10"],  # llama-ft convert-gguf
        # both reporters are tested in CI: on top of the rest, tensorboard installs in ~9 s and wandb in ~10 s
        # gguf: the real-checkpoint tests convert SmolLM2's GGUF; lm_eval: they check lm-evaluation-harness reads
        # what we write (about 25 s more to install; tests/test_real_checkpoint.py)
        # trl: tests/test_dpo_vs_trl.py checks our DPO loss, rewards and tokens against TRL's DPOTrainer, and
        # benchmarks/dpo_vs_trl.py (smoke-tested) runs DPOTrainer as the peer. Below 2:
        # TRL 1.x marks APIs "removed in v2.0.0". 1.16.0 installs without moving torch, transformers, peft,
        # datasets or accelerate (checked 2026-12-07)
        # bitsandbytes: the NF4 tests' reference (tests/test_nf4_format.py, tests/test_quantize_nf4.py: its
        # quantize_4bit / dequantize_4bit bytes, and transformers loading the bnb-4bit layout we write); the
        # product implements NF4 itself. Pinned: the tests match its bytes exactly, quirks included
        "test": ["pytest>=8", "ruff>=0.6", "tensorboard>=2.14", "wandb>=0.17", "gguf>=0.10",
                 "lm_eval[hf]>=0.4.13,<0.5", "trl>=1.16,<2", "bitsandbytes==0.50.2"],
    },
    entry_points={"console_scripts": ["llama-ft=llama_ft.cli:main"]},
)
