"""--precompute_ref_logprobs: DPO's reference log-probs of every pair, computed once before training and cached.

DPO's reference is the frozen base: the same model under lora.lora_disabled (train/objectives.py). It does not
change during a run, so its log-probs can be computed once, in a pass over the data before step 1:

    train_refs, eval_refs = precomputed_references(objective, train_set, eval_set, key, world, rank)

each (n, 2) fp32 = [logp(chosen), logp(rejected)] per pair of that split, in split order (logp: the summed
log-probability of the response's tokens, train/loss.py). Each training step then runs one forward pass less
(the policy's only). The pass is collective under ZeRO-3: pair j of the pass goes to data-parallel rank
j mod W, in padded batches of --per_device_train_batch_size pairs; every rank runs the same number of forward
passes (a rank with nothing left repeats its pair 0, uncounted), then one all-gather gives every rank all of them.

Cache: LLAMA_FT_CACHE (or ~/.cache/llama-ft) / reference / KEY.safetensors, written by each node's local rank 0
(temporary name, fsync, rename). KEY (reference_key) hashes what the numbers depend on: the tokenized examples'
cache key (the rows, the tokenizer and template, the data options), the eval split (size, seed), the model's
identity (its config.json bytes and each weight file's name, size and mtime: hashing the bytes of a 405B
checkpoint would take longer than the pass), and the run options that change the base's numerics (precision,
--quantize, --bits and the targets, --fp8_compute, the attention implementation, --init and --seed). A run resumed with
the same options reads the file instead of recomputing. A step's own reference pass sees the same pairs padded
or packed differently; the sums agree up to float rounding (tests/test_dpo_reference.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from llama_ft.data.collate import collate_pairs
from llama_ft.fsutil import atomic_write
from llama_ft.hostcomm import any_rank
from llama_ft.train.objectives import rank_batches

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".json")


def model_identity(model_dir: str) -> dict[str, Any]:
    """config.json's sha256 and (name, size, mtime_ns) of every weight or index file of a local model directory;
    the name alone for a Hub id (no local files)."""
    root = Path(model_dir)
    if not root.is_dir():
        return {"name": model_dir}
    files = {}
    for f in sorted(root.iterdir()):
        if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES):
            st = f.stat()
            files[f.name] = [st.st_size, st.st_mtime_ns]
    config = root / "config.json"
    return {"config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
            "files": files}


def reference_key(cfg: Any, examples_cache_file: str) -> str:
    """The cache key of a run's reference log-probs (module doc)."""
    blob = {"examples": Path(examples_cache_file).stem, "eval": [cfg.eval_dataset_size, cfg.seed],
            "model": model_identity(cfg.model_name_or_path), "bf16": cfg.bf16, "quantize": cfg.quantize,
            "bits": cfg.bits if cfg.quantize else None, "fp8_compute": cfg.fp8_compute,
            "targets": sorted(cfg.lora_target_modules),
            "attn": cfg.attn_implementation, "init": cfg.init, "seed": cfg.seed if cfg.init != "checkpoint" else None}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:32]


def cache_path(key: str) -> Path:
    from llama_ft.data.cache import default_cache_dir

    return default_cache_dir() / "reference" / f"{key}.safetensors"


def _read(path: Path, sizes: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached (train, eval) tables, or None when the file is missing, unreadable or of other sizes."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tables = load_file(str(path))
        train, evals = tables["train"], tables["eval"]
    except (OSError, KeyError, SafetensorError):
        return None
    if (len(train), len(evals)) != sizes:
        return None
    return train, evals


def _write(path: Path, train: torch.Tensor, evals: torch.Tensor) -> None:
    from safetensors.torch import save

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        f.write(save({"train": train.contiguous(), "eval": evals.contiguous()}))


@torch.no_grad()
def compute_references(objective: Any, pairs: Sequence[Any], world: int, rank: int) -> torch.Tensor:
    """(n, 2) fp32 reference log-prob sums of `pairs` (module doc); collective over the data-parallel ranks."""
    engine, batch = objective.engine, objective.cfg.per_device_train_batch_size
    per_rank = math.ceil(len(pairs) / world)
    local = torch.zeros(per_rank, 2, dtype=torch.float32, device=engine.device)
    was_training = engine.training
    engine.eval()  # no dropout: the reference is the frozen base as it is
    batches = list(rank_batches(len(pairs), world, rank, batch))
    for k, picked in enumerate(tqdm(batches, desc="reference log-probs", disable=rank != 0, dynamic_ncols=True)):
        micro = collate_pairs([pairs[i] for i in picked or [0]], objective.pad_id)
        ref = objective.reference(micro)  # (2P,) = [chosen .., rejected ..]
        if picked:
            p = len(picked)
            local[k * batch:k * batch + p] = torch.stack([ref[:p], ref[p:2 * p]], dim=1).float()
    engine.train(was_training)
    if world > 1:
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local)
    else:
        gathered = [local]
    out = torch.empty(len(pairs), 2, dtype=torch.float32)
    for r, part in enumerate(gathered):  # host sync: once, after the pass
        out[r::world] = part[:len(range(r, len(pairs), world))].cpu()
    return out


def precomputed_references(objective: Any, train_set: Sequence[Any], eval_set: Sequence[Any], key: str,
                           world: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train (n_train, 2), eval (n_eval, 2)) from the cache when every rank has it, else computed (module doc)."""
    path = cache_path(key)
    cached = _read(path, (len(train_set), len(eval_set)))
    if not any_rank(cached is None):  # all ranks agree, or the collective passes below would not match up
        log.info("reference log-probs of %d + %d pairs from the cache (%s)", len(train_set), len(eval_set), path)
        return cached
    log.info("reference log-probs: one pass over %d + %d pairs with the adapters off (cached in %s)",
             len(train_set), len(eval_set), path)
    train = compute_references(objective, train_set, world, rank)
    evals = compute_references(objective, eval_set, world, rank) if len(eval_set) else torch.zeros(0, 2)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        try:
            _write(path, train, evals)
        except OSError as e:  # the run goes on with the values in memory; only the next run's reuse is lost
            log.warning("reference log-probs: could not write the cache %s (%s)", path, e)
    return train, evals
