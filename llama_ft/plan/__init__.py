"""`llama-ft plan`: what a LoRA run needs in GPU and host memory, before a GPU-hour is spent.

    shape.py        a Llama's shape (alias, config.json, LlamaConfig) and the parameters llama-ft builds
    zero.py         ZeRO-3 arithmetic: partitions, persistence, the gathered working set, optimizer states
    activations.py  saved activations of the Llama block, checkpoint boundaries, the chunked loss
    planner.py      the terms per GPU and per host at the peak, the verdict, the smallest offload ratio
    command.py      the command line (text and --json), run-llama.sh's pre-launch check

Importing this package imports no torch, transformers or deepspeed: the training recipe calls
`plan_training` for `--offload_ratio auto`, and run-llama.sh runs the command before every launch.
"""

from llama_ft.plan.planner import DEFAULT_PCIE_GBPS, plan_training
from llama_ft.plan.shape import ALIASES, ModelShape

__all__ = ["ALIASES", "DEFAULT_PCIE_GBPS", "ModelShape", "plan_training"]
