"""Training checkpoints for exact resume, pickle-free: safetensors for tensors, JSON for the rest.

    checkpoint-STEP/
      adapter_config.json, adapter_model.safetensors   PEFT adapters (bf16 values the model uses)
      optimizer_rank{R}.safetensors   this rank's ZeRO-3 partition of every LoRA tensor's
                                "<peft key>::fp32" master weight and "::exp_avg", "::exp_avg_sq"
                                Adam moments (DeepSpeed's tensor-fragment API, local variants)
      trainer_state.json        step, data position, optimizer step, LR scheduler state, options
      rng_state_RANK.json       each rank's torch / python / numpy RNG state (dropout draws)
    latest                      the name of the newest complete checkpoint (written after it)

A checkpoint is written as `.checkpoint-STEP.tmp`, fsynced, and renamed when every rank's files are in
(save_checkpoint); so a folder named checkpoint-STEP is always complete (checkpoint/layout.py).

Each rank saves and restores only its own partitions: no rank ever holds all optimizer state
(about 30 GB for 405B at r=64), and nothing depends on sizes dividing the world size. The
data position, RNG streams and partitions all depend on the world size, so resuming needs the
same one, which trainer_state.json records and checks. Exact-resume options (LoRA shape,
batch sizes, seed, ...) are compared with the saved ones before anything collective happens.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.utils import (
    safe_get_local_fp32_param,
    safe_get_local_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_optimizer_state,
)
from safetensors import safe_open
from safetensors.torch import save_file

from llama_ft.adapters import gather_lora_state, lora_named_parameters, write_adapter_files
from llama_ft.checkpoint.layout import LATEST, STATE_FILE, complete_checkpoints
from llama_ft.errors import EXIT_USER_ERROR, StopRun, UserError
from llama_ft.fsutil import (
    atomic_write_json,
    atomic_write_text,
    default_modes,
    disk_full_message,
    fsync_path,
    fsync_tree,
    is_disk_full,
    replace_dir,
)
from llama_ft.hostcomm import any_rank, from_rank0
from llama_ft.lora import LoraSpec

ADAM_KEYS = ("exp_avg", "exp_avg_sq")

# options a resumed run must share with the saved one to continue exactly: the model and its adapters,
# the data stream, and every numeric setting of the update
RESUME_INVARIANTS = ("lora_r", "lora_alpha", "lora_target_modules", "per_device_train_batch_size",
                     "gradient_accumulation_steps", "seed", "quantize", "init",
                     # numerics of each step (max_steps sets the warmup length and the decay horizon)
                     "learning_rate", "lr_scheduler_type", "warmup_ratio", "max_steps", "weight_decay", "max_grad_norm",
                     "ds_config_sha256",
                     "adam_beta1", "adam_beta2", "adam_epsilon", "lora_dropout", "bf16", "fp8_compute",
                     "loss_chunk_size", "attn_implementation", "packing", "sequence_parallel_size", "tiled_mlp",
                     # the examples
                     "data_sha256", "dataset_format", "chat_template_sha256", "tokenizer_sha256", "source_max_len",
                     "target_max_len", "max_seq_len", "train_on_source", "max_train_samples", "eval_dataset_size")
# invariants that are content hashes, not flags: how to name them in the refusal
_HASHED = {"chat_template_sha256": "the chat template (--chat_template or the tokenizer's)",
           "tokenizer_sha256": "the tokenizer (--tokenizer_name_or_path)",
           "data_sha256": "the dataset's content (--dataset)",
           "ds_config_sha256": "the DeepSpeed optimizer, clipping or precision settings (--deepspeed, as filled)"}


def optim_file(rank: int) -> str:
    return f"optimizer_rank{rank}.safetensors"


@dataclass
class Progress:
    """Where training stands: optimizer steps done and the next micro-batch of the data stream."""

    step: int = 0
    epoch: int = 0
    micro_index: int = 0


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _inner_optimizer(engine):
    return engine.optimizer.optimizer


def _optimizer_step(engine) -> int:
    states = [s for s in _inner_optimizer(engine).state.values() if "step" in s]
    return int(states[0]["step"]) if states else 0


def _rng_state() -> dict[str, Any]:
    st: dict[str, Any] = {
        "torch": torch.get_rng_state().tolist(),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np.random.get_state()[0], np.random.get_state()[1].tolist(), *np.random.get_state()[2:]],
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state().tolist()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))
    v, state, gauss = st["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(st["cuda"], dtype=torch.uint8))


def save_checkpoint(
    engine, model, scheduler, spec: LoraSpec, progress: Progress, out_dir: Path, base_model: str,
    options: dict[str, Any], save_total_limit: int | None = None,
) -> None:
    """Write checkpoint-STEP atomically and durably. Collective.

    Every rank writes its files into `.checkpoint-STEP.tmp` and fsyncs them; only when all succeeded does
    rank 0 fsync the folder and put it under its name (an existing copy of that step is exchanged, then
    removed), then write the `latest` marker, then drop all but the newest `save_total_limit` checkpoints.
    A rank that fails (a full disk) says so in one line; the others stop quietly; the temporary folder is
    removed and every earlier checkpoint and `latest` stay as they were.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    failure: BaseException | None = None
    if _rank() == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # a save killed half-way leaves one
            tmp.mkdir(parents=True)
        except OSError as e:
            failure = e
    if from_rank0([int(failure is not None)])[0]:
        _fail_save(failure, tmp)

    lora = gather_lora_state(model)  # collective: every rank takes part, rank 0 keeps the tensors
    has_moments = _optimizer_step(engine) > 0  # Adam creates its moments at the first step
    tensors: dict[str, torch.Tensor] = {}
    for key, p in lora_named_parameters(model):
        tensors[f"{key}::fp32"] = safe_get_local_fp32_param(p).detach().float().cpu().contiguous()
        for k in ADAM_KEYS:
            t = safe_get_local_optimizer_state(p, k) if has_moments else torch.zeros_like(tensors[f"{key}::fp32"])
            tensors[f"{key}::{k}"] = t.detach().float().cpu().contiguous()
    try:
        if _rank() == 0:
            write_adapter_files(lora, tmp, spec, base_model)
            state = {
                "global_step": progress.step,
                "epoch": progress.epoch,
                "micro_index": progress.micro_index,
                "optimizer_step": _optimizer_step(engine),
                "world_size": world,
                "lr_scheduler": scheduler.state_dict(),
                "options": options,
            }
            atomic_write_json(tmp / STATE_FILE, state)
        save_file(tensors, str(tmp / optim_file(_rank())), metadata={"format": "pt"})
        fsync_path(tmp / optim_file(_rank()))
        atomic_write_json(tmp / f"rng_state_{_rank()}.json", _rng_state())
        _test_pause_in_save(tmp)
    except Exception as e:  # reported below, once every rank knows
        failure = e
    if any_rank(failure is not None):
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _fail_save(failure, tmp)
    if _rank() == 0:
        default_modes(tmp)  # safetensors writes 0600; a checkpoint is for whoever may read OUTPUT_DIR
        fsync_tree(tmp)
        replace_dir(tmp, out_dir)
        atomic_write_text(out_dir.parent / LATEST, out_dir.name + "\n")  # last: it names a complete checkpoint
        if save_total_limit:
            for old in complete_checkpoints(out_dir.parent)[:-save_total_limit]:
                if old != out_dir:
                    shutil.rmtree(old, ignore_errors=True)
    any_rank(False)  # a barrier: nobody goes on before the checkpoint is in place


def _fail_save(failure: BaseException | None, tmp: Path) -> None:
    """Stop every rank after a failed save: the rank that failed in one line, the others quietly."""
    if failure is None:
        raise StopRun(EXIT_USER_ERROR)
    final = tmp.with_name(tmp.name[1:-len(".tmp")])
    if is_disk_full(failure):
        raise UserError(f"saving {final}: {disk_full_message(tmp.parent)}; the earlier checkpoints are intact") \
            from None
    if isinstance(failure, OSError):
        raise UserError(f"saving {final}: {failure.strerror or failure} ({failure.filename or tmp}); the earlier "
                        "checkpoints are intact") from None
    raise failure


def _test_pause_in_save(tmp: Path) -> None:
    """Test hook: LLAMA_FT_TEST_PAUSE_IN_SAVE=S sleeps S seconds with the files written but not yet in place
    (tests kill a rank there to show that an interrupted save loses nothing)."""
    pause = float(os.environ.get("LLAMA_FT_TEST_PAUSE_IN_SAVE", "0") or 0)
    if pause > 0:
        (tmp / ".paused").touch()
        time.sleep(pause)
        (tmp / ".paused").unlink(missing_ok=True)


def check_resumable(ckpt_dir: str | os.PathLike, world: int, options: dict[str, Any]) -> dict[str, Any]:
    """trainer_state.json, checked against this run (world size, exact-resume options, files).

    Reads only small files, so train() calls it before any rank starts distributed work;
    every rank reaches the same verdict. Raises UserError naming the flag and the difference.
    """
    ckpt = Path(ckpt_dir)
    flag = f"--resume_from_checkpoint {ckpt}"
    try:
        state = json.loads((ckpt / STATE_FILE).read_text())
        for key in ("global_step", "epoch", "micro_index", "world_size", "optimizer_step", "lr_scheduler", "options"):
            state[key]  # noqa: B018 - presence check
        int(state["global_step"]), int(state["world_size"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{flag}: {STATE_FILE} unreadable or missing fields ({e})") from e
    if int(state["world_size"]) != world:
        raise UserError(f"{flag}: saved with {state['world_size']} ranks, this run has {world} "
                        "(exact resume needs the same)")
    for key in RESUME_INVARIANTS:
        if key in state["options"] and state["options"][key] != options.get(key):
            if key in _HASHED:
                raise UserError(f"{flag}: {_HASHED[key]} differs from the one the checkpoint was trained with "
                                "(exact resume needs the same)")
            raise UserError(f"{flag}: saved with --{key} {state['options'][key]!r}, this run has {options.get(key)!r} "
                            "(exact resume needs the same)")
    missing = [f for r in range(world) for f in (optim_file(r), f"rng_state_{r}.json") if not (ckpt / f).is_file()]
    if missing:
        raise UserError(f"{flag}: incomplete checkpoint (missing {missing[0]})")
    return state


def load_checkpoint(engine, model, scheduler, ckpt_dir: str | os.PathLike, options: dict[str, Any]) -> Progress:
    """Restore fp32 masters, bf16 working copies, Adam moments, step counts, LR schedule, RNG and
    data position, each rank from its own files."""
    ckpt = Path(ckpt_dir)
    world = dist.get_world_size() if dist.is_initialized() else 1
    state = check_resumable(ckpt, world, options)
    path = ckpt / optim_file(_rank())
    try:
        with safe_open(str(path), framework="pt") as f:
            optim = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise UserError(f"{path}: unreadable ({e})") from e
    params = dict(lora_named_parameters(model))
    for key, p in params.items():
        local = safe_get_local_fp32_param(p)
        for k in ("fp32", *ADAM_KEYS):
            t = optim.get(f"{key}::{k}")
            if t is None or t.shape != local.shape:
                raise UserError(f"{path}: no saved state of shape {list(local.shape)} for {key}::{k} "
                                "(checkpoint from another model, LoRA setup or world size?)")

    opt_step = int(state["optimizer_step"])
    inner = _inner_optimizer(engine)
    if opt_step > 0:
        # Adam creates its state lazily at the first step; create it so it can be filled.
        # torch.optim counts steps in a tensor, DeepSpeed's own Adam kernels in a Python int.
        as_tensor = type(inner).__module__.startswith("torch.optim")
        for flat in engine.optimizer.fp32_partitioned_groups_flat:
            st = inner.state[flat]
            st.setdefault("exp_avg", torch.zeros_like(flat))
            st.setdefault("exp_avg_sq", torch.zeros_like(flat))
            st["step"] = torch.tensor(float(opt_step)) if as_tensor else opt_step
    for key, p in params.items():
        fp32 = optim[f"{key}::fp32"]
        safe_set_local_fp32_param(p, fp32.to(p.ds_tensor.device))
        # the working copy is the master rounded to the training dtype, as after every step
        p.ds_tensor.data.copy_(fp32.to(p.ds_tensor.dtype))
        if opt_step > 0:
            for k in ADAM_KEYS:
                safe_set_local_optimizer_state(p, optim[f"{key}::{k}"].to(p.ds_tensor.device), k)
    # small "persistent" parameters stay whole on every rank: refresh them from the partitions,
    # as DeepSpeed does after each step
    persistent = [p for p in params.values() if getattr(p, "ds_persist", False)]
    if persistent:
        persistent[0].all_gather(persistent)

    scheduler.load_state_dict(state["lr_scheduler"])
    for group, lr in zip(engine.optimizer.param_groups, scheduler.get_last_lr(), strict=False):
        group["lr"] = lr
    step = int(state["global_step"])
    engine.global_steps = step
    engine.global_samples = step * engine.train_batch_size()
    _set_rng_state(json.loads((ckpt / f"rng_state_{_rank()}.json").read_text()))
    _barrier()
    return Progress(step=step, epoch=int(state["epoch"]), micro_index=int(state["micro_index"]))


def checkpoint_summary(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """trainer_state.json as a dict (for logs and tests)."""
    return json.loads((Path(ckpt_dir) / STATE_FILE).read_text())

