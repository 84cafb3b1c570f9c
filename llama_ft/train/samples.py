"""Sample completions while training (`--generate_every N`): a few fixed prompts, greedy, every N steps.

The prompts are the first SAMPLE_PROMPTS held-out examples (the training ones without an eval split), cut
before their first trained token: what the model is asked, with the trained answer as the reference.
Generation is transformers' `generate` on the partitioned model itself: under ZeRO-3 every forward pass
gathers parameters collectively, so EVERY rank generates the same prompts, with `synced_gpus` so that a
rank that is done keeps stepping until all are. The LM head, swapped for HiddenStatesHead while training
(train/loss.py), is put back for the duration. Rank 0 prints them and appends them to samples.jsonl.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llama_ft.data import IGNORE_INDEX
from llama_ft.generate import generation_kwargs
from llama_ft.train.evaluate import real_lm_head

log = logging.getLogger("llama_ft")
SAMPLE_PROMPTS = 3


def sample_prompts(examples: Sequence[dict], k: int = SAMPLE_PROMPTS) -> list[dict[str, Any]]:
    """{"index", "prompt" ids, "reference" ids} of the first k examples: the ids before the first trained
    label, and the trained ones (with --train_on_source every label is trained: then the first half)."""
    out = []
    for i in range(min(k, len(examples))):
        ids, labels = list(examples[i]["input_ids"]), list(examples[i]["labels"])
        cut = next((t for t, y in enumerate(labels) if y != IGNORE_INDEX), len(ids))
        cut = cut if 0 < cut < len(ids) else max(1, len(ids) // 2)
        out.append({"index": i, "prompt": ids[:cut], "reference": ids[cut:]})
    return out


@torch.no_grad()
def generate_samples(model: nn.Module, tokenizer: Any, prompts: list[dict[str, Any]], max_new_tokens: int,
                     device: torch.device) -> list[dict[str, Any]]:
    """Greedy completions of `prompts` (collective under ZeRO-3: call on every rank). Returns, per prompt,
    the decoded prompt, completion and reference."""
    synced = dist.is_initialized() and dist.get_world_size() > 1
    kw = generation_kwargs(tokenizer, max_new_tokens, 0.0, 1.0)
    out = []
    with real_lm_head(model):
        for p in prompts:
            ids = torch.tensor([p["prompt"]], device=device)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), synced_gpus=synced, **kw)
            out.append({"example": p["index"], "prompt": tokenizer.decode(p["prompt"]),
                        "completion": tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True),
                        "reference": tokenizer.decode(p["reference"], skip_special_tokens=True)})
    return out


def write_samples(path: Path, step: int, samples: list[dict[str, Any]]) -> None:
    """Append one line per sample to samples.jsonl and log them (rank 0)."""
    with open(path, "a") as f:
        for s in samples:
            f.write(json.dumps({"step": step, **s}) + "\n")
            log.info("step %d sample %d: %r -> %r", step, s["example"], s["prompt"][-60:], s["completion"])
        f.flush()
