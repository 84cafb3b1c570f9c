"""The training recipe: LoRA on a Llama checkpoint under DeepSpeed ZeRO-3. Reads top to bottom.

Launch with the DeepSpeed launcher (run-llama.sh does), e.g.
    deepspeed --num_gpus 8 -m llama_ft.train --model_name_or_path DIR --dataset data.jsonl ...
Each optimizer step consumes per_device_train_batch_size x gradient_accumulation_steps examples
on every rank; `--max_steps` optimizer steps are run, epochs wrap around as needed. The loss is
nats per trained token over the whole step (train/loss.py); eval loss is the same quantity.

Outputs in --output_dir:
    adapter_config.json, adapter_model.safetensors   final PEFT adapters
    tokenizer files (+ chat_template.jinja)           so the directory serves as is
    checkpoint-STEP/                                  every --save_steps, for --resume_from_checkpoint
    metrics.jsonl, loss.png, train_results.json
    tensorboard/ or wandb/                            with --report_to (llama_ft/reporting.py)
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import json
import logging
import math
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from llama_ft.checkpoint.layout import remove_stale_temporaries, resolve_checkpoint
from llama_ft.checkpoint.resume import Progress, check_resumable, load_checkpoint, save_checkpoint
from llama_ft.config import TrainConfig, fill_ds_config, load_ds_config, parse_train_args
from llama_ft.config_file import write_run_config
from llama_ft.data import (
    CHAT,
    DataOptions,
    MicroBatches,
    load_tokenizer,
    pad_token_id,
    prepare_examples,
    use_chat_template,
)
from llama_ft.data.batches import example_lengths
from llama_ft.data.cache import tokenizer_fingerprint
from llama_ft.data.split import split_examples
from llama_ft.errors import StopRun, UserError, user_errors_exit
from llama_ft.fsutil import atomic_write_json
from llama_ft.gpus import fp8_compute_refusal, fp8_mode
from llama_ft.hostcomm import any_rank, host_group, max_over_ranks
from llama_ft.metrics import plot_loss
from llama_ft.model.meter import peak_rss_bytes
from llama_ft.model.segment_attention import use_segment_attention
from llama_ft.ops import prepare_ops, unlink_shm_buffer
from llama_ft.plan.planner import quantized_bits
from llama_ft.rendezvous import check_master_reachable
from llama_ft.reporting import Reporter
from llama_ft.train.activation_memory import use_tiled_mlp
from llama_ft.train.cpu_heap import fix_mmap_threshold
from llama_ft.train.evaluate import example_answers, greedy_answers
from llama_ft.train.faults import LauncherWatch, PeerWatch, StopSignals, register_ranks
from llama_ft.train.loss import backward_scale, global_count, use_chunked_loss
from llama_ft.train.objectives import make_objective
from llama_ft.train.parallel import register_ulysses, shard_micro_batch
from llama_ft.train.reference import precomputed_references, reference_key
from llama_ft.train.samples import generate_samples, sample_prompts, write_samples
from llama_ft.train.sp_layout import SequenceParallel, check_sequence_parallel, mlp_tiles

log = logging.getLogger("llama_ft")
EXIT_DIVERGED = 3  # --nan_policy stop


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    logging.getLogger("llama_ft.load").setLevel(logging.INFO)  # every rank reports its own load


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_options(cfg: TrainConfig, tokenizer, rows_key: str, ds_config: dict) -> dict[str, Any]:
    """The options a checkpoint records, plus content hashes of what a path alone does not pin down:
    the data rows, the tokenizer, the chat template, and the DeepSpeed settings that change the numbers
    (optimizer, clipping, precision; not offload or logging, which do not)."""
    def sha(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    template = tokenizer.chat_template if cfg.dataset_format == CHAT else None
    return {**cfg.to_json(), "data_sha256": sha(rows_key), "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
            "chat_template_sha256": sha(template) if template else None,
            "ds_config_sha256": sha(json.dumps({k: ds_config.get(k) for k in ("optimizer", "scheduler",
                                                                              "gradient_clipping", "bf16", "fp16")},
                                               sort_keys=True))}


def load_training_data(cfg: TrainConfig):
    """(tokenizer, train examples, eval examples, DataStats): rows -> {"input_ids", "labels"}, tokenized once per node
    and cached (data/pipeline.py), then the seeded eval split. The tokenizer carries the chat template."""
    tok_path = cfg.tokenizer_name_or_path or cfg.model_name_or_path
    tokenizer = load_tokenizer(tok_path)
    if cfg.dataset_format == CHAT:
        use_chat_template(tokenizer, cfg.chat_template, tok_path)  # saved with the tokenizer at the end
    examples, stats = prepare_examples(DataOptions.from_config(cfg), tokenizer)
    log.info("data: %s", stats.line(cfg.max_seq_len))
    # train_index: each training example's index among all examples (a `llama-ft data --dump` line number)
    train_set, eval_set, stats.train_index = split_examples(examples, cfg.eval_dataset_size, cfg.seed)
    return tokenizer, train_set, eval_set, stats


def stopped_line(signum: int, step: int, out: Path) -> str:
    """The one line a preempted run ends with: what stopped it, where the checkpoint is, how to resume."""
    ckpt = resolve_checkpoint("auto", out)
    where = f"checkpoint {ckpt}" if ckpt else "no checkpoint (no step had finished)"
    return (f"stopped by {signal.Signals(signum).name} after step {step}; {where}; to continue, run the same "
            f"command with --resume_from_checkpoint latest (OUTPUT_DIR {out})")


def nonfinite_step(policy: str, step: int, examples: list[int], last_good: str | None) -> None:
    """A step whose gradient norm was NaN or inf (DeepSpeed dropped its update): stop, naming the step and its
    examples (line numbers of `llama-ft data --dump`, from every rank), or count it and go on."""
    everyone: list = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(everyone, examples, group=host_group())
    else:
        everyone = [examples]
    shown = "; ".join(f"rank {r}: {ex}" for r, ex in enumerate(everyone))
    what = (f"step {step}: the loss or gradient norm is NaN or inf (its update was dropped); its examples, by rank: "
            f"{shown}")
    if policy == "skip":
        log.warning("%s; skipped (--nan_policy skip)", what)
        return
    kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was saved before it"
    raise StopRun(EXIT_DIVERGED, f"error: {what}; {kept} (--nan_policy stop)"
                  if not dist.is_initialized() or dist.get_rank() == 0 else None)


def apply_test_hooks(nll: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """Test hook: LLAMA_FT_TEST_NAN_AT_STEP=K turns rank 0's loss of step K into NaN. And
    LLAMA_FT_TEST_STEP_SLEEP=S makes every step take S seconds longer (tests signal a run mid-way)."""
    time.sleep(float(os.environ.get("LLAMA_FT_TEST_STEP_SLEEP", "0") or 0))
    if rank == 0 and os.environ.get("LLAMA_FT_TEST_NAN_AT_STEP") == str(step):
        return nll * float("nan")
    return nll


def stop_self_for_test(rank: int) -> None:
    """Test hook: LLAMA_FT_TEST_STOP_AFTER_LOOP=R makes rank R stop itself (SIGSTOP) once the loop is done, as a
    rank that hangs in the final save would (tests/test_faults.py)."""
    if os.environ.get("LLAMA_FT_TEST_STOP_AFTER_LOOP") == str(rank):
        os.kill(os.getpid(), signal.SIGSTOP)


def check_fp8_mode(cfg: TrainConfig) -> None:
    """--quantize runs on every supported GPU (weight-only below compute capability 8.9: the kernels decode the
    e4m3 bytes themselves); --fp8_compute needs FP8 tensor cores, refused here in one line before any launch."""
    if not (cfg.quantize and cfg.bits in (None, 8) and torch.cuda.is_available()):
        return
    cap, name = tuple(torch.cuda.get_device_capability()), torch.cuda.get_device_name()
    refusal = fp8_compute_refusal(name, cap) if cfg.fp8_compute else None
    if refusal:
        raise UserError(refusal)
    log.info("FP8 on %s (compute capability %d.%d): %s", name, *cap, fp8_mode(cap, cfg.fp8_compute))


def check_model_options(cfg: TrainConfig, world_env: int):
    """The options that need the checkpoint, the GPU or the DeepSpeed config, checked before any distributed
    work: (DeepSpeed config as read, the model's LlamaConfig). A pre-quantized checkpoint turns --quantize on
    and sets --bits (8: ours, FP8; 4: bitsandbytes' NF4); a --bits that differs from it is one line, and so is
    --fp8_compute on weights that are neither quantized on load nor FP8 already."""
    from llama_ft.model.build import inspect_checkpoint, load_llama_config

    prequantized = None
    if cfg.init == "checkpoint":
        _, prequantized = inspect_checkpoint(cfg.model_name_or_path, cfg.lora_spec)
    else:
        log.warning("--init random: random weights, for benchmarks only; the adapters are meaningless")
    # the plan's settling of --quantize / --bits against the checkpoint's format: one implementation, same lines
    quantize, bits = quantized_bits(cfg, prequantized.bits if prequantized else None, cfg.model_name_or_path)
    cfg.quantize, cfg.bits = quantize, (bits if quantize else cfg.bits)
    check_fp8_mode(cfg)
    ds_config = load_ds_config(cfg.deepspeed)
    llama_config = load_llama_config(cfg.model_name_or_path)
    check_sequence_parallel(cfg.sequence_parallel_size, world_env, llama_config.num_attention_heads,
                            llama_config.num_key_value_heads, cfg.attn_implementation, cfg.packing,
                            cfg.model_name_or_path)
    max_positions = llama_config.max_position_embeddings
    if cfg.max_seq_len and cfg.max_seq_len > max_positions:
        raise UserError(f"--max_seq_len {cfg.max_seq_len}: above the model's max_position_embeddings "
                        f"{max_positions} ({cfg.model_name_or_path}/config.json)")
    if cfg.attn_implementation == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not torch.cuda.is_available():
            raise UserError("--attn_implementation flash_attention_2 needs a CUDA GPU; use sdpa on CPU ranks")
        if not is_flash_attn_2_available():
            raise UserError("--attn_implementation flash_attention_2: flash-attn is installed but not usable here "
                            f"(GPU compute capability {torch.cuda.get_device_capability()}, or a broken install); "
                            "use sdpa")
    return ds_config, llama_config


def train(cfg: TrainConfig) -> dict:
    import deepspeed
    from transformers import get_scheduler

    from llama_ft.adapters import save_adapters
    from llama_ft.model.build import build_lora_model, partition_bytes
    from llama_ft.train.memory_plan import resolve_offload_ratio, used_vs_planned

    # --- inputs first: every user mistake surfaces before any rank starts distributed work ---
    rank, world_env = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    setup_logging(rank)
    launcher = LauncherWatch(rank).start()  # run-llama.sh or the per-node launcher killed: this rank stops too
    if not torch.cuda.is_available() and fix_mmap_threshold():  # before the data and the model are built
        log.info("CPU ranks: malloc returns freed blocks of 1 MiB and more to the system (peak RSS as planned; "
                 "MALLOC_MMAP_THRESHOLD_ overrides)")
    ds_config, llama_config = check_model_options(cfg, world_env)
    tokenizer, train_set, eval_set, stats = load_training_data(cfg)  # rows -> examples, once per node
    pad_id = pad_token_id(tokenizer)
    sp = SequenceParallel.of(rank, world_env, cfg.sequence_parallel_size)  # the stream follows the DP rank
    MicroBatches(train_set, sp.dp_world, 0, cfg.per_device_train_batch_size, cfg.seed, pad_id,
                 pack_len=cfg.max_seq_len if cfg.packing else None, shared_prompt=cfg.dpo_shared_prompt)  # enough?
    on_gpu = torch.cuda.is_available()
    ds_config = fill_ds_config(ds_config, cfg, world_env, llama_config.hidden_size, on_gpu)
    offload_ratio = resolve_offload_ratio(cfg, ds_config, llama_config, world_env)  # "auto": llama-ft plan
    options = run_options(cfg, tokenizer, stats.rows_key, ds_config)
    if cfg.resume_from_checkpoint:
        check_resumable(cfg.resume_from_checkpoint, world_env, options)
    log.info("data: %d train / %d eval examples from %s", len(train_set), len(eval_set), cfg.dataset)

    # --- distributed set-up: gloo on CPU ranks, NCCL on GPUs (DeepSpeed picks) ---
    prepare_ops(ds_config, on_gpu)  # DeepSpeed's JIT ops, compiled by one process at a time
    check_master_reachable()  # a wrong MASTER_ADDR fails in seconds with its name, not after torch's 30 min
    deepspeed.init_distributed(timeout=datetime.timedelta(seconds=cfg.dist_timeout))  # a dead peer: no 30-min hang
    rank, world = dist.get_rank(), dist.get_world_size()
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    seed_everything(cfg.seed)  # the same LoRA init everywhere (zero.Init also broadcasts rank 0's)
    out = Path(cfg.output_dir)
    log.info("world size %d, %s", world, "GPU" if on_gpu else "CPU ranks")
    register_ranks(out, rank, world)  # every rank must see one OUTPUT_DIR (checkpoints are written together)
    if not on_gpu:  # register_ranks ended on a host barrier: every local rank has mapped every shm buffer
        unlink_shm_buffer(rank)
    if rank == 0:
        remove_stale_temporaries(out)  # saves killed half-way
        write_run_config(out / "run_config.yaml", cfg.to_json())  # `--config` on it repeats this run
    watch = PeerWatch(out, rank, world).start()  # a local rank that dies ends this one too, with its name

    # --- model: built partitioned under zero.Init, checkpoint streamed in (or --init random), LoRA injected ---
    if world != world_env:
        raise UserError(f"WORLD_SIZE={world_env} but torch.distributed counts {world} ranks")
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    model, report = build_lora_model(cfg.model_name_or_path, cfg.lora_spec, ds_config, dtype,
                                     cfg.gradient_checkpointing, quantize=cfg.quantize, fp8_compute=cfg.fp8_compute,
                                     bits=cfg.bits or 8, loader=cfg.loader, init=cfg.init,
                                     attn_implementation=cfg.attn_implementation, offload_ratio=offload_ratio)
    report.write(out)
    logging.getLogger("llama_ft.load").info(report.line())
    head_weight = use_chunked_loss(model)  # the forward now returns hidden states; the loss applies the head
    pack_len = cfg.max_seq_len if cfg.packing else None
    flash = cfg.attn_implementation == "flash_attention_2"
    rows = 1 if (pack_len and flash) else cfg.per_device_train_batch_size  # flash packing: one (1, B*T) row
    tiles = 1
    if cfg.tiled_mlp:  # fixed for the run: every rank makes the same MLP calls (train/activation_memory.py)
        longest = pack_len or max(example_lengths(train_set) + example_lengths(eval_set))
        joined = cfg.per_device_train_batch_size if rows == 1 and pack_len else 1
        tiles = mlp_tiles(longest, joined, sp.size, llama_config.hidden_size)
        log.info("tiled MLP: %d MLPs in %d slices of the sequence", use_tiled_mlp(model, tiles), tiles)
    prepare = None
    if sp.enabled or cfg.tiled_mlp:  # widths padded to sp.size x tiles; this rank's columns only
        def prepare(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return shard_micro_batch(b, sp, rows, sp.size * tiles, pad_id, cfg.packing, flash)
    if pack_len and cfg.attn_implementation == "sdpa" and not sp.enabled:
        use_segment_attention(model)  # packed rows: each sequence's (or pair's) attention apart, not T x T
        log.info("packed rows: attention per packed sequence (segment_sdpa), not over the whole row")
    mpu = None
    if sp.enabled:  # DeepSpeed's Ulysses attention in place of the core one; creates the SP groups
        mpu = register_ulysses(model, cfg.attn_implementation, sp.size, rows)
        log.info("sequence parallel: %d ranks per sequence, %d data-parallel groups", sp.size, sp.dp_world)
    held = partition_bytes(model)
    log.info("parameter bytes on this rank: frozen linears %.2f MB%s, other frozen %.2f MB, LoRA %.2f MB",
             held["frozen_linear"] / 2**20, {4: " (NF4)", 8: " (FP8)"}.get(cfg.bits, "") if cfg.quantize else "",
             held["frozen_other"] / 2**20, held["lora"] / 2**20)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in trainable)
    log.info("LoRA r=%d alpha=%g on %s: %.2fM trainable parameters", cfg.lora_r, cfg.lora_alpha,
             ",".join(cfg.lora_target_modules), n_trainable / 1e6)

    # --- engine: ZeRO-3 optimizer from the config, warmup + decay schedule from transformers ---
    warmup = math.ceil(cfg.warmup_ratio * cfg.max_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=trainable,
        config=ds_config,
        lr_scheduler=lambda opt: get_scheduler(cfg.lr_scheduler_type, opt, warmup, cfg.max_steps),
        mpu=mpu,
    )
    seed_everything(cfg.seed + rank)  # dropout masks differ per rank
    progress = Progress()
    if cfg.resume_from_checkpoint:
        progress = load_checkpoint(engine, model, scheduler, cfg.resume_from_checkpoint, options)
        log.info("resumed from %s at step %d", cfg.resume_from_checkpoint, progress.step)
    batches = MicroBatches(train_set, sp.dp_world, sp.dp_rank, cfg.per_device_train_batch_size, cfg.seed, pad_id,
                           progress.epoch, progress.micro_index, pack_len, cfg.dpo_shared_prompt)

    # rank 0: metrics.jsonl (+ TensorBoard or W&B, --report_to); every record goes through reporter.log
    reporter = Reporter.open(out, cfg.report_to, options, progress.step if cfg.resume_from_checkpoint else None, rank)
    stop = StopSignals().install()  # SIGTERM/SIGINT: finish the step, save, exit (a second one aborts)
    last_saved = progress.step if cfg.resume_from_checkpoint else None
    watch.last_checkpoint = launcher.last_checkpoint = lambda: resolve_checkpoint("auto", out)
    skipped = engine.skipped_steps  # DeepSpeed drops an update whose gradient norm is not finite

    def save() -> None:  # collective: checkpoint-STEP of the current step, then `latest`
        save_checkpoint(engine, model, scheduler, cfg.lora_spec, progress, out / f"checkpoint-{progress.step}",
                        cfg.model_name_or_path, options, cfg.save_total_limit)

    eval_every = cfg.eval_steps or cfg.save_steps
    prompts = sample_prompts(eval_set if len(eval_set) else train_set) if cfg.generate_every else []
    answers = example_answers(eval_set) if cfg.eval_every else []  # --eval_every: exact match on the eval split
    bar = tqdm(total=cfg.max_steps, initial=progress.step, desc="train", disable=rank != 0, dynamic_ncols=True)
    t_start, last_loss, eval_loss = time.time(), float("nan"), None
    # DeepSpeed averages gradients over every rank that reduces them, sequence-parallel ones included (its
    # reduce-scatter path, which fill_ds_config keeps on under SP); a shard's S is then scaled by W / N too
    reduce_world = engine.seq_dp_world_size
    objective = make_objective(cfg, engine, head_weight, pad_id, sp.dp_world, sp.dp_rank, {
        "batch": cfg.per_device_train_batch_size, "pad_id": pad_id, "world": sp.dp_world, "rank": sp.dp_rank,
        "pack_len": pack_len, "chunk": cfg.loss_chunk_size, "flash": flash, "prepare": prepare})
    if cfg.precompute_ref_logprobs:  # collective: one adapters-off pass over every pair, or the cached result
        objective.train_refs, objective.eval_refs = precomputed_references(
            objective, train_set, eval_set, reference_key(cfg, stats.cache_file), sp.dp_world, sp.dp_rank)

    # --- the loop: one iteration = one optimizer step = gradient_accumulation_steps micro-batches ---
    engine.train()
    # collective_failures: a rank lost mid-collective is one line, not a hang or a traceback; the reporter
    # closes (W&B finishes with the exit code) on every way out of the loop, StopRun included
    with watch.collective_failures(), reporter:
        while progress.step < cfg.max_steps:
            signum = max_over_ranks(stop.requested or 0)  # one host all-reduce per step: a signal on any rank
            if signum:
                if last_saved != progress.step and progress.step > 0:
                    save()
                raise StopRun(128 + signum, stopped_line(signum, progress.step, out) if rank == 0 else None)
            micro, step_examples = [], []  # the step's micro-batches, on the host
            for _ in range(cfg.gradient_accumulation_steps):
                b = objective.attach(next(batches), batches.last_examples)  # DPO: precomputed reference log-probs
                micro.append(b if prepare is None else prepare(b))
                step_examples += [stats.train_index[i] for i in batches.last_examples]  # dump line numbers
            # the step loss is a mean over every trained token (SFT) or pair (DPO) of the step: R / N, one all-reduce
            scale = backward_scale(global_count(sum(objective.count(b) for b in micro), engine.device), reduce_world)
            for b in micro:
                loss = objective.loss(b)  # this micro-batch's sum (train/objectives.py)
                engine.backward(apply_test_hooks(loss, progress.step + 1, rank) * scale, scale_wrt_gas=False)
                engine.step()  # DeepSpeed updates only at the accumulation boundary
            progress.step += 1
            progress.epoch, progress.micro_index = batches.epoch, batches.index
            bar.update(1)
            if engine.skipped_steps > skipped:  # the update was dropped: its gradient norm was NaN or inf
                skipped = engine.skipped_steps
                nonfinite_step(cfg.nan_policy, progress.step, step_examples, resolve_checkpoint("auto", out))

            if progress.step % cfg.logging_steps == 0 or progress.step == cfg.max_steps:
                window, shown = objective.window()  # one all-reduce and one host sync per logging step
                last_loss, lr = window["loss"], scheduler.get_last_lr()[0]
                record = {"step": progress.step, **window, "lr": lr, "epoch": progress.epoch,
                          "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                          "skipped_steps": engine.skipped_steps, "elapsed_s": time.time() - t_start}
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", **shown)
                reporter.log(record)

            if eval_set and (progress.step % eval_every == 0 or progress.step == cfg.max_steps):
                scores = objective.evaluate(eval_set)  # collective: every rank scores its share
                eval_loss = scores["eval_loss"]
                log.info("step %d: %s", progress.step, ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
                reporter.log({"step": progress.step, **scores})
            if answers and (progress.step % cfg.eval_every == 0 or progress.step == cfg.max_steps):
                # collective: each data-parallel rank generates its share, in step with the others (ZeRO-3)
                scored = greedy_answers(engine.module, tokenizer, answers, engine.device, sp.dp_world, sp.dp_rank,
                                        synced=world > 1)
                matches = sum(r["match"] for r in scored)
                log.info("step %d: eval_exact_match %.4f (%d of %d answers)", progress.step,
                         matches / len(scored), matches, len(scored))
                reporter.log({"step": progress.step, "eval_exact_match": matches / len(scored),
                              "eval_answers": len(scored)})
            if prompts and progress.step % cfg.generate_every == 0:  # collective: every rank generates
                engine.eval()
                samples = generate_samples(engine.module, tokenizer, prompts, cfg.generate_max_new_tokens,
                                           engine.device)
                engine.train()
                if rank == 0:
                    write_samples(out / "samples.jsonl", progress.step, samples)
            if progress.step % cfg.save_steps == 0 or progress.step == cfg.max_steps:
                save()
                last_saved = progress.step
    bar.close()
    stop_self_for_test(rank)

    # --- final adapters directly in output_dir, like save_pretrained ---
    # still under collective_failures: a rank hung here (in the final gather, the peak all-reduce or the last
    # barrier) ends the job after --dist_timeout like one hung mid-loop, not 30 s later by the launcher's SIGKILL
    with watch.collective_failures():
        save_adapters(model, out, cfg.lora_spec, cfg.model_name_or_path)
        held_all = [int(v) for v in all_ranks_sum(list(held.values()), engine.device)]
        peak = torch.tensor([torch.cuda.max_memory_allocated() if on_gpu else peak_rss_bytes()], dtype=torch.int64,
                            device=engine.device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)  # host sync: the largest rank's peak, for the memory account
        results = {"global_step": progress.step, "train_loss": last_loss, "eval_loss": eval_loss,
                   "train_runtime_s": time.time() - t_start, "world_size": world,
                   "data": {"rows": stats.rows, "examples": stats.examples, "cut": stats.cut, "dropped": stats.dropped},
                   "partition_bytes_rank0": held, "partition_bytes_all_ranks": dict(zip(held, held_all, strict=True))}
        if rank == 0:
            # the plan for this run, once: only rank 0 writes train_results.json
            results["memory"] = memory = used_vs_planned(cfg, ds_config, llama_config, world_env, int(peak.item()))
            tokenizer.save_pretrained(out)  # with the chat template the adapters were trained with
            atomic_write_json(out / "train_results.json", results)
            try:
                plot_loss(out / "metrics.jsonl", out / "loss.png")
            except (OSError, ValueError) as e:  # the adapters are saved; a missing plot must not hang the other ranks
                log.warning("could not draw loss.png: %s", e)
            if memory.get("planned_bytes"):
                log.info("memory: %s %.2f GiB on the largest rank; llama-ft plan: %.2f GiB (%+.1f%%)",
                         memory["measured"], memory["measured_bytes"] / 2**30, memory["planned_bytes"] / 2**30,
                         memory["error_pct"])
            log.info("done: step %d, train loss %.4f, adapters in %s", progress.step, last_loss, out)
        any_rank(False)  # a barrier on the host group
    watch.stop()  # from here ranks exit one by one; that is not a death
    return results


def all_ranks_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    cfg = parse_train_args(argv)
    try:
        train(cfg)
    finally:
        # On every way out (done, a stop signal, a NaN, a user error). The engine's reference cycles still
        # hold process groups: collect them first, so gloo's workers are joined here, not at interpreter
        # exit (where they can abort the rank; llama_ft/train/process_exit.py ends the process without it).
        if dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
