"""Training options (flags named as in Snowflake's run-llama.sh / lora_script.py) and DeepSpeed config filling.

`parse_train_args` validates everything a user can get wrong before any rank starts work,
so bad input costs one line on stderr and exit code 2, never a traceback or a partial run.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
from collections.abc import Collection
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from llama_ft.checkpoint.layout import STATE_FILE, resolve_checkpoint
from llama_ft.config_file import add_config_flag, parse_args
from llama_ft.data import DataOptions
from llama_ft.data.chat import load_chat_template
from llama_ft.errors import UserError
from llama_ft.flags import (
    DPO_LOSSES,
    OBJECTIVE_HELP,
    OBJECTIVES,
    check_objective_choice,
    expand_targets,
    float_or_auto,
    str2bool,
)
from llama_ft.lora import LLAMA_LINEAR_NAMES, LoraSpec
from llama_ft.reporting import check_report_to
from llama_ft.tiny import BUNDLED_CHAT_DATASET, BUNDLED_DATASET
from llama_ft.train.sp_layout import check_long_context_flags

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DS_CONFIG = "ds_configs/zero3.json"


@dataclass
class TrainConfig:
    # model and data
    model_name_or_path: str = ""
    tokenizer_name_or_path: str | None = None
    dataset: str = str(BUNDLED_DATASET)
    dataset_format: str = "alpaca"
    chat_template: str | None = None
    source_max_len: int = 1024
    target_max_len: int = 256
    max_seq_len: int | None = None
    packing: bool = False
    train_on_source: bool = False
    max_train_samples: int | None = None
    eval_dataset_size: float = 0
    # objective
    objective: str = "sft"
    dpo_beta: float = 0.1
    dpo_loss: str = "sigmoid"
    dpo_label_smoothing: float = 0.0
    precompute_ref_logprobs: bool = False
    dpo_shared_prompt: bool = False
    # optimisation
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    bf16: bool = True
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    loss_chunk_size: int = 1024
    seed: int = 42
    # long context (DeepSpeed's ALST pieces)
    sequence_parallel_size: int = 1
    tiled_mlp: bool = False
    activation_offload: bool = False
    # LoRA
    lora_r: int = 64
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: list(LLAMA_LINEAR_NAMES))
    # quantized frozen base weights (Snowflake's --quantize --bits 8; --bits 4: NF4, QLoRA's format)
    quantize: bool = False
    bits: int | None = None  # None: 8, or what a pre-quantized checkpoint holds
    fp8_compute: bool = False
    loader: str = "stream"
    init: str = "checkpoint"
    # partial CPU offload of the frozen base weights (Snowflake's --offload --offload_ratio)
    offload: bool = False
    offload_ratio: float | str | None = None  # a fraction, or "auto": the smallest that fits (llama-ft plan)
    # outputs and schedule of side work
    output_dir: str = "./output"
    overwrite_output_dir: bool = False
    save_steps: int = 250
    save_total_limit: int | None = None
    eval_steps: int | None = None
    eval_every: int = 0
    logging_steps: int = 1
    generate_every: int = 0
    generate_max_new_tokens: int = 64
    report_to: str = "none"
    resume_from_checkpoint: str | None = None
    nan_policy: str = "stop"
    dist_timeout: int = 1800
    deepspeed: str = DEFAULT_DS_CONFIG
    local_rank: int = -1

    @property
    def lora_spec(self) -> LoraSpec:
        return LoraSpec(self.lora_r, self.lora_alpha, self.lora_dropout, tuple(self.lora_target_modules))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_HELP = {
    "model_name_or_path": "Hugging Face model directory (safetensors shards + index + config.json)",
    "tokenizer_name_or_path": "tokenizer directory (default: the model directory)",
    "dataset": ".json/.jsonl/.parquet file, or a Hugging Face dataset name (default: the bundled tiny alpaca set)",
    "dataset_format": "alpaca | input-output | chip2 | self-instruct | hh-rlhf | oasst1 | chat (rows with "
                      "'messages' (OpenAI) or 'conversations' (ShareGPT), rendered with the chat template, "
                      "loss on the assistant turns)",
    "chat_template": "with --dataset_format chat: a Jinja chat template file to use instead of the tokenizer's "
                     "(saved with the tokenizer in --output_dir)",
    "source_max_len": "single-turn formats: keep at most this many prompt tokens",
    "target_max_len": "single-turn formats: keep at most this many response tokens",
    "max_seq_len": "cut every example to at most this many tokens, at the end (every format; default: no cap)",
    "packing": "pack whole examples into rows of --max_seq_len tokens (best-fit decreasing; position_ids restart "
               "per example, no attention across examples); --per_device_train_batch_size then counts rows",
    "attn_implementation": "sdpa | eager | flash_attention_2 (GPUs with flash-attn installed; its varlen path "
                           "when packing)",
    "loss_chunk_size": "trained tokens per chunk of the LM head + cross-entropy: full-vocabulary logits exist for "
                       "this many tokens at a time, never for the whole micro-batch",
    "sequence_parallel_size": "Ulysses sequence parallelism (DeepSpeed ALST): N ranks share each sequence, each "
                              "holding 1/N of its tokens; data-parallel size = ranks / N. Micro-batches are padded "
                              "to a multiple of N tokens",
    "tiled_mlp": "run each MLP over slices of ~hidden_size tokens and recompute them in backward (DeepSpeed "
                 "TiledMLP): one slice's intermediates at a time; needs --lora_dropout 0",
    "activation_offload": "keep the activation checkpoints in host memory until the backward needs them; needs "
                          "--gradient_checkpointing",
    "train_on_source": "train on every token, prompts and user turns included (default: responses only)",
    "max_train_samples": "use only the first N rows of the dataset",
    "eval_dataset_size": "held-out examples for eval loss: a count (>= 1), a fraction in (0, 1), or 0 for none",
    "objective": OBJECTIVE_HELP,
    "dpo_beta": "DPO: beta > 0, how far the policy may move from the reference",
    "dpo_loss": "DPO: sigmoid (the DPO paper) | ipo (squared, on log-probs averaged over the response)",
    "dpo_label_smoothing": "DPO with --dpo_loss sigmoid: eps in [0, 0.5], the assumed chance a preference is flipped",
    "precompute_ref_logprobs": "DPO: compute the reference log-probs of every pair in one pass before training "
                               "(cached like the tokenized data), so each step runs one forward pass less",
    "dpo_shared_prompt": "DPO with --packing: each pair as [prompt | chosen | rejected] in its row, the prompt run "
                         "once for both sides (a 4-D mask keeps the rejected response from seeing the chosen one; "
                         "sdpa or eager)",
    "per_device_train_batch_size": "examples per rank in a micro-batch (with --packing: packed rows; with "
                                   "--objective dpo: pairs)",
    "gradient_accumulation_steps": "micro-batches per optimizer step: a step takes batch x accumulation x ranks / "
                                   "--sequence_parallel_size examples",
    "max_steps": "optimizer steps to train",
    "learning_rate": "AdamW's peak learning rate",
    "lr_scheduler_type": "a transformers schedule that needs no further settings: linear, cosine, "
                         "cosine_with_restarts, polynomial, constant, constant_with_warmup, inverse_sqrt",
    "warmup_ratio": "fraction of --max_steps over which the learning rate warms up",
    "weight_decay": "AdamW weight decay",
    "max_grad_norm": "clip the gradient norm to this (DeepSpeed's gradient_clipping)",
    "adam_beta1": "AdamW beta1",
    "adam_beta2": "AdamW beta2",
    "adam_epsilon": "AdamW epsilon",
    "bf16": "train in bf16 (false: fp32)",
    "gradient_checkpointing": "recompute each decoder layer in the backward instead of keeping its activations",
    "seed": "seed of the LoRA init, the eval split, the data order and packing, and (plus the rank) dropout",
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA alpha: the adapter's output is scaled by alpha / r",
    "lora_dropout": "dropout on the input of the LoRA path",
    "output_dir": "where the adapters, checkpoints, metrics and logs go",
    "overwrite_output_dir": "train into a non-empty --output_dir (refused otherwise, unless resuming)",
    "save_steps": "save a checkpoint every N steps (and at the end)",
    "logging_steps": "log the metrics every N steps",
    "lora_target_modules": "linear layer names to adapt, or a group: all (the seven), attention (q,k,v,o_proj), "
                           "mlp (gate,up,down_proj); comma- or space-separated",
    "deepspeed": "DeepSpeed JSON config; 'auto' fields are filled from these flags",
    "resume_from_checkpoint": "a checkpoint-STEP directory written by an earlier run; 'latest': the newest complete "
                              "checkpoint in --output_dir; 'auto': the same, or a fresh start when there is none",
    "save_total_limit": "keep only the newest N checkpoints (default: all)",
    "nan_policy": "a NaN/inf loss or gradient norm: 'stop' keeps the last good checkpoint and exits naming the "
                  "step and its examples; 'skip' drops that update and counts it",
    "dist_timeout": "seconds a collective may wait before the run is ended (a rank that died or hung)",
    "eval_steps": "evaluate every N steps (default: --save_steps)",
    "eval_every": "every N steps and at the end, greedy exact match of every answer of the eval split (as llama-ft "
                  "eval --metric exact_match computes it), in metrics.jsonl as eval_exact_match (0: never); needs "
                  "--eval_dataset_size",
    "generate_every": "every N steps, greedy completions of 3 fixed held-out prompts, printed and appended to "
                      "OUTPUT_DIR/samples.jsonl (0: never)",
    "generate_max_new_tokens": "tokens generated per sample with --generate_every",
    "report_to": "none | tensorboard | wandb: also send the metrics to TensorBoard (OUTPUT_DIR/tensorboard) or "
                 "Weights & Biases (OUTPUT_DIR/wandb; offline with WANDB_MODE=offline); metrics.jsonl is always "
                 "written",
    "quantize": "store the frozen base of every LoRA-targeted linear quantized: FP8 e4m3 (128x128 block scales) "
                "with --bits 8, NF4 (QLoRA's 4-bit format, bitsandbytes' blocks of 64) with --bits 4",
    "bits": "bits of the quantized base weights: 8 (FP8 e4m3, the default) or 4 (NF4); --bits 4 implies "
            "--quantize; a pre-quantized checkpoint sets it (bitsandbytes' bnb-4bit: 4)",
    "init": "checkpoint: load the weights of --model_name_or_path; random: random weights built straight into "
            "the partitions, for benchmarks only (the directory needs only config.json and a tokenizer)",
    "loader": "stream: each rank reads only its own partition bytes; hf: rank 0 reads all and scatters",
    "offload": "keep --offload_ratio of the frozen base-weight partitions in host memory (spread evenly over layers)",
    "offload_ratio": "with --offload: fraction in [0, 1] of the frozen base-weight bytes kept on the host "
                     "(default 1.0), or auto: the smallest fraction with which the run fits (llama-ft plan)",
    "fp8_compute": "with --quantize (or an FP8 pre-quantized checkpoint): also quantize activations per 1x128 tile "
                   "and multiply on fp8 tensor cores",
}


DATA_FLAGS = ("model_name_or_path", "tokenizer_name_or_path", "dataset", "dataset_format", "chat_template",
              "source_max_len", "target_max_len", "max_seq_len", "train_on_source", "max_train_samples", "packing",
              "seed")
"""The flags `llama-ft data` shares with training: everything that decides the examples."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llama-ft train",
        description="LoRA fine-tuning of a Llama checkpoint under DeepSpeed ZeRO-3.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_flags(p, [f.name for f in fields(TrainConfig)])
    add_config_flag(p)
    return p


def add_config_flags(p: argparse.ArgumentParser, names: list[str] | tuple[str, ...]) -> None:
    """Add `--NAME` for each TrainConfig field in `names`, typed and documented from the dataclass."""
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        if f.name not in names:
            continue
        default = getattr(defaults, f.name)
        kw: dict[str, Any] = {"default": default, "help": _HELP.get(f.name, " ")}
        if f.type in ("bool",):
            kw.update(type=str2bool, nargs="?", const=True, metavar="BOOL")
        elif f.type.startswith("int"):
            kw["type"] = int
        elif f.type.startswith("float | str"):
            kw["type"] = float_or_auto
        elif f.type.startswith("float"):
            kw["type"] = float
        elif f.type.startswith("list"):
            kw["nargs"] = "+"
        if f.name == "local_rank":
            kw["help"] = argparse.SUPPRESS
        p.add_argument(f"--{f.name}", **kw)


def validate(cfg: TrainConfig, world_size: int = 1) -> TrainConfig:
    """Check every option; raise UserError naming the flag and what it expects."""
    if not cfg.model_name_or_path:
        raise UserError("--model_name_or_path is required (a Hugging Face model directory)")
    validate_data_options(cfg)
    positive = ["lora_r", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                "save_steps", "logging_steps"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name} {getattr(cfg, name)}: expected an integer > 0")
    if cfg.eval_steps is not None and cfg.eval_steps <= 0:
        raise UserError(f"--eval_steps {cfg.eval_steps}: expected an integer > 0")
    if cfg.lora_alpha <= 0:
        raise UserError(f"--lora_alpha {cfg.lora_alpha}: expected a number > 0")
    if not 0 <= cfg.lora_dropout < 1:
        raise UserError(f"--lora_dropout {cfg.lora_dropout}: expected a value in [0, 1)")
    if cfg.learning_rate <= 0:
        raise UserError(f"--learning_rate {cfg.learning_rate}: expected a number > 0")
    if not 0 <= cfg.warmup_ratio <= 1:
        raise UserError(f"--warmup_ratio {cfg.warmup_ratio}: expected a value in [0, 1]")
    if cfg.weight_decay < 0 or cfg.max_grad_norm < 0:
        raise UserError("--weight_decay and --max_grad_norm must be >= 0")
    check_objective(cfg)
    if cfg.eval_dataset_size < 0:
        raise UserError(f"--eval_dataset_size {cfg.eval_dataset_size}: expected a count >= 0 or a fraction in (0, 1)")
    if cfg.eval_dataset_size >= 1 and cfg.eval_dataset_size != int(cfg.eval_dataset_size):
        raise UserError(f"--eval_dataset_size {cfg.eval_dataset_size}: expected a whole count or a fraction in (0, 1)")
    if cfg.init not in ("checkpoint", "random"):
        raise UserError(f"--init {cfg.init!r}: expected 'checkpoint' or 'random' (benchmarks only)")
    if cfg.loader not in ("stream", "hf"):
        raise UserError(f"--loader {cfg.loader!r}: expected 'stream' or 'hf'")
    if cfg.bits not in (None, 4, 8):
        raise UserError(f"--bits {cfg.bits}: expected 8 (FP8 e4m3 base weights) or 4 (NF4, as QLoRA)")
    if cfg.bits == 4:
        cfg.quantize = True  # the only thing 4 bits can mean here (--help says so)
        if cfg.fp8_compute:
            raise UserError("--fp8_compute with --bits 4: FP8 compute multiplies FP8-stored weights; NF4 weights are "
                            "decoded to the training dtype (drop --fp8_compute, or use --bits 8)")
    if cfg.offload_ratio is not None:
        if not cfg.offload:
            raise UserError(f"--offload_ratio {cfg.offload_ratio}: needs --offload")
        if cfg.offload_ratio != "auto" and not 0 <= cfg.offload_ratio <= 1:
            raise UserError(f"--offload_ratio {cfg.offload_ratio}: expected a value in [0, 1]")
    check_scheduler(cfg.lr_scheduler_type, cfg.learning_rate, cfg.warmup_ratio, cfg.max_steps)
    if cfg.attn_implementation == "flash_attention_2" and not cfg.bf16:
        raise UserError("--attn_implementation flash_attention_2 runs in bf16 only: drop --bf16 false, or use sdpa")
    check_attn_implementation(cfg.attn_implementation)
    if cfg.generate_every < 0 or cfg.generate_max_new_tokens < 1:
        raise UserError(f"--generate_every {cfg.generate_every} / --generate_max_new_tokens "
                        f"{cfg.generate_max_new_tokens}: expected N >= 0 (0: never) and >= 1 tokens")
    if cfg.eval_every < 0:
        raise UserError(f"--eval_every {cfg.eval_every}: expected N >= 0 steps (0: never)")
    if cfg.eval_every and not cfg.eval_dataset_size:
        raise UserError(f"--eval_every {cfg.eval_every}: needs an eval split; set --eval_dataset_size (a count or a "
                        "fraction of the dataset)")
    if cfg.eval_every and cfg.sequence_parallel_size > 1:
        raise UserError("--eval_every with --sequence_parallel_size > 1: generation runs whole sequences on every "
                        "rank, which Ulysses' sharded attention does not; evaluate the saved adapters with "
                        "llama-ft eval instead")
    if cfg.generate_every and cfg.sequence_parallel_size > 1:
        raise UserError("--generate_every with --sequence_parallel_size > 1: generation runs whole sequences on "
                        "every rank, which Ulysses' sharded attention does not; generate from the saved adapters "
                        "(llama-ft generate) instead")
    check_long_context_flags(cfg.sequence_parallel_size, cfg.activation_offload, cfg.gradient_checkpointing)
    if cfg.tiled_mlp and cfg.lora_dropout > 0:
        raise UserError(f"--tiled_mlp with --lora_dropout {cfg.lora_dropout}: the tiled MLP recomputes its slices in "
                        "backward without replaying dropout masks; set --lora_dropout 0")
    if cfg.loss_chunk_size < 1:
        raise UserError(f"--loss_chunk_size {cfg.loss_chunk_size}: expected an integer >= 1 (tokens per chunk)")
    cfg.lora_target_modules = expand_targets(cfg.lora_target_modules)  # all|attention|mlp -> explicit names
    if cfg.nan_policy not in ("stop", "skip"):
        raise UserError(f"--nan_policy {cfg.nan_policy!r}: expected 'stop' or 'skip'")
    if cfg.save_total_limit is not None and cfg.save_total_limit < 1:
        raise UserError(f"--save_total_limit {cfg.save_total_limit}: expected an integer >= 1 (or leave it out)")
    check_report_to(cfg.report_to)
    if cfg.dist_timeout < 1:
        raise UserError(f"--dist_timeout {cfg.dist_timeout}: expected seconds >= 1")
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out}: exists and is not a directory")
    asked = cfg.resume_from_checkpoint
    cfg.resume_from_checkpoint = resolve_checkpoint(asked, out)
    if cfg.resume_from_checkpoint is not None:
        state = Path(cfg.resume_from_checkpoint) / STATE_FILE
        if not state.is_file():
            raise UserError(f"--resume_from_checkpoint {cfg.resume_from_checkpoint}: no {STATE_FILE} there "
                            "(expected a checkpoint-STEP directory written by llama-ft train)")
    # `auto` with no checkpoint yet starts afresh, in the folder of the run it would have resumed
    fresh_auto = asked == "auto" and (out / ".llama-ft").is_dir()
    if (out.is_dir() and any(out.iterdir()) and not cfg.overwrite_output_dir
            and cfg.resume_from_checkpoint is None and not fresh_auto):
        raise UserError(f"--output_dir {out}: exists and is not empty (pass --overwrite_output_dir, "
                        "or --resume_from_checkpoint to continue a run)")
    return cfg


def check_objective(cfg: TrainConfig) -> None:
    """--objective and the DPO flags; one line for what DPO does not run yet (the data flags: data/pairs.py)."""
    check_objective_choice(cfg.objective)
    if cfg.objective != "dpo":
        for flag in ("precompute_ref_logprobs", "dpo_shared_prompt"):
            if getattr(cfg, flag):
                raise UserError(f"--{flag} applies to --objective dpo (this run: sft)")
        return
    if cfg.dpo_shared_prompt and not cfg.packing:
        raise UserError("--dpo_shared_prompt lays pairs out in packed rows: it needs --packing (and --max_seq_len)")
    if cfg.dpo_shared_prompt and cfg.attn_implementation not in ("sdpa", "eager"):
        raise UserError(f"--dpo_shared_prompt with --attn_implementation {cfg.attn_implementation}: the layout needs "
                        "a 4-D attention mask, which only sdpa and eager take")
    if cfg.dpo_loss not in DPO_LOSSES:
        raise UserError(f"--dpo_loss {cfg.dpo_loss!r}: expected one of {', '.join(DPO_LOSSES)}")
    if cfg.dpo_beta <= 0:
        raise UserError(f"--dpo_beta {cfg.dpo_beta}: expected a number > 0")
    if not 0 <= cfg.dpo_label_smoothing <= 0.5:
        raise UserError(f"--dpo_label_smoothing {cfg.dpo_label_smoothing}: expected a value in [0, 0.5]")
    if cfg.dpo_label_smoothing and cfg.dpo_loss != "sigmoid":
        raise UserError(f"--dpo_label_smoothing applies to --dpo_loss sigmoid only (this run: {cfg.dpo_loss})")
    unsupported = {"--sequence_parallel_size > 1": cfg.sequence_parallel_size > 1, "--tiled_mlp": cfg.tiled_mlp,
                   "--eval_every (exact match)": cfg.eval_every, "--generate_every": cfg.generate_every}
    for flag, on in unsupported.items():
        if on:
            raise UserError(f"{flag} with --objective dpo: not supported yet (DPO scores whole sequences on each "
                            "rank, and evaluates with eval_loss and the rewards on held-out pairs)")


MAX_SEED = 2**31 - 1


def validate_data_options(cfg: Any) -> None:
    """The data flags (shared with `llama-ft data`): format, lengths, the chat template file.
    With `--dataset_format chat` and no `--dataset`, the bundled tiny chat set replaces the alpaca one."""
    if cfg.dataset_format == "chat" and cfg.dataset == str(BUNDLED_DATASET):
        cfg.dataset = str(BUNDLED_CHAT_DATASET)
    DataOptions.from_config(cfg).check()
    # numpy's seed is 32 bits, and each rank seeds with seed + rank: beyond that, a traceback after every rank
    # had started (fuzzer)
    seed = getattr(cfg, "seed", 0)  # llama-ft eval has no --seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed {seed}: expected an integer from 0 to {MAX_SEED}")
    if cfg.max_train_samples is not None and cfg.max_train_samples <= 0:
        raise UserError(f"--max_train_samples {cfg.max_train_samples}: expected an integer > 0")
    if cfg.chat_template:
        load_chat_template(cfg.chat_template)  # missing file or bad Jinja: fail before any work
    if cfg.packing and cfg.max_seq_len is None:
        raise UserError("--packing needs --max_seq_len N: the length of a packed row")


ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def flag_choices(keys: Collection[str] | None = None) -> dict[str, tuple[str, ...]]:
    """The flags whose values are one of a fixed set, checked by validate() on the command line; a --config
    file is checked against the same sets as it is read, so its error names the file, line and key. With `keys`,
    the scheduler names (transformers' SchedulerType: importing transformers pulls in peft, about 3 s) are read
    only when a key asks for them, so that a bad config file is reported at once."""
    from llama_ft.data.formats import DATASET_FORMATS
    from llama_ft.reporting import REPORT_TO

    choices = {"objective": OBJECTIVES, "dpo_loss": DPO_LOSSES, "dataset_format": DATASET_FORMATS,
               "attn_implementation": ATTN_IMPLEMENTATIONS, "init": ("checkpoint", "random"),
               "loader": ("stream", "hf"), "nan_policy": ("stop", "skip"), "report_to": REPORT_TO}
    if keys is None or "lr_scheduler_type" in keys:
        from transformers import SchedulerType

        choices["lr_scheduler_type"] = tuple(s.value for s in SchedulerType)
    return choices


def check_attn_implementation(name: str) -> None:
    if name not in ATTN_IMPLEMENTATIONS:
        raise UserError(f"--attn_implementation {name!r}: expected one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if name == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise UserError("--attn_implementation flash_attention_2: the flash-attn package is not installed "
                            "(pip install flash-attn on a CUDA machine), or use sdpa")


def check_scheduler(name: str, lr: float = 1.0, warmup_ratio: float = 0.0, max_steps: int = 10) -> None:
    """Refuse schedulers llama-ft cannot drive: unknown names, and those needing arguments it does not pass
    (min_lr, decay steps), a metric at each step (plateau-style), or refusing this run's learning rate and
    steps (polynomial's lr_end), found by building one on a dummy optimizer with the run's values."""
    import torch
    from transformers import SchedulerType, get_scheduler

    schedulers = [s.value for s in SchedulerType]
    if name not in schedulers:
        raise UserError(f"--lr_scheduler_type {name!r}: expected one of {', '.join(schedulers)}")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    try:
        sched = get_scheduler(name, opt, num_warmup_steps=math.ceil(warmup_ratio * max_steps),
                              num_training_steps=max_steps)
        opt.step()
        sched.step()
    except (TypeError, ValueError) as e:
        why = " ".join(str(e).split())
        raise UserError(f"--lr_scheduler_type {name}: needs settings llama-ft does not pass ({why}); use one that "
                        "needs none: linear, cosine, cosine_with_restarts, polynomial, constant, "
                        "constant_with_warmup, inverse_sqrt") from None


def parse_train_args(argv: list[str] | None = None) -> TrainConfig:
    ns = parse_args(build_parser(), argv)  # --config FILE: its values are the defaults
    cfg = TrainConfig(**vars(ns))
    return validate(cfg)


# ---------------------------------------------------------------------------------------------
# DeepSpeed config


def resolve_ds_config_path(path: str) -> Path:
    """The --deepspeed path as given, else relative to the source checkout (for the bundled configs)."""
    p = Path(path)
    if p.is_file():
        return p
    alt = REPO_ROOT / path
    if not p.is_absolute() and alt.is_file():
        return alt
    raise UserError(f"--deepspeed {path}: file not found (expected a DeepSpeed JSON config, e.g. {DEFAULT_DS_CONFIG})")


def load_ds_config(path: str) -> dict:
    p = resolve_ds_config_path(path)
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"--deepspeed {p}: not valid JSON (line {e.lineno}: {e.msg})") from e
    if not isinstance(cfg, dict):
        raise UserError(f"--deepspeed {p}: expected a JSON object")
    return cfg


def fill_ds_config(ds: dict, cfg: TrainConfig, world_size: int, hidden_size: int, on_gpu: bool,
                   source: str = "--deepspeed") -> dict:
    """Replace every "auto" in a DeepSpeed config with the value the training flags imply.

    Fields filled (the same set HF Trainer fills): batch sizes, accumulation, clipping, bf16/fp16,
    optimizer lr/betas/eps/weight_decay, and ZeRO-3 bucket sizes from the model's hidden size
    (reduce_bucket_size = h^2, stage3_prefetch_bucket_size = 0.9 h^2,
    stage3_param_persistence_threshold = 10 h). Any other "auto" is an error naming its field.
    """
    ds = copy.deepcopy(ds)
    sp = getattr(cfg, "sequence_parallel_size", 1)
    dp_world = world_size // sp  # a sequence-parallel group shares one micro-batch
    values: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * dp_world,
        "gradient_clipping": cfg.max_grad_norm,
        "bf16.enabled": cfg.bf16,
        "fp16.enabled": False,
        "optimizer.params.lr": cfg.learning_rate,
        "optimizer.params.weight_decay": cfg.weight_decay,
        "optimizer.params.betas": [cfg.adam_beta1, cfg.adam_beta2],
        "optimizer.params.eps": cfg.adam_epsilon,
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
    }

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                sub = f"{path}.{k}" if path else k
                if v == "auto":
                    if sub not in values:
                        raise UserError(f"{source}: field {sub!r} is \"auto\" but llama-ft has no value for it")
                    node[k] = values[sub]
                else:
                    walk(v, sub)

    walk(ds, "")
    opt_type = str(ds.get("optimizer", {}).get("type", "")).lower()
    if opt_type not in ("adam", "adamw"):
        raise UserError(f"{source}: field 'optimizer.type' is {ds.get('optimizer', {}).get('type')!r}, expected "
                        "\"AdamW\" or \"Adam\" (checkpoints save Adam moments for exact resume)")
    zero = ds.get("zero_optimization", {})
    if zero.get("stage") != 3:
        raise UserError(f"{source}: field 'zero_optimization.stage' is {zero.get('stage')!r}, expected 3")
    for key, want in (("train_micro_batch_size_per_gpu", cfg.per_device_train_batch_size),
                      ("gradient_accumulation_steps", cfg.gradient_accumulation_steps)):
        if key in ds and ds[key] != want:
            raise UserError(f"{source}: field {key!r} is {ds[key]} but the flags say {want}; set it to \"auto\"")
    if not on_gpu:
        # Pinned host memory needs an accelerator to pin for.
        for sec in ("offload_param", "offload_optimizer"):
            if isinstance(zero.get(sec), dict) and zero[sec].get("pin_memory"):
                zero[sec]["pin_memory"] = False
    if sp > 1:
        if ds.get("sequence_parallel_size", sp) != sp:
            raise UserError(f"{source}: field 'sequence_parallel_size' is {ds['sequence_parallel_size']} but "
                            f"--sequence_parallel_size is {sp}; leave it out of the config")
        ds["sequence_parallel_size"] = sp
        # DeepSpeed 0.19.8 ZeRO-3 averages a gradient bucket over all ranks (sequence-parallel ones included) on
        # its reduce-scatter path, but over ranks / N on its contiguous all-reduce path (used per bucket when
        # reduce_scatter is off). The loss scale (train/loss.py backward_scale) needs one rule: the first.
        if zero.get("reduce_scatter") is False:
            raise UserError(f"{source}: field 'zero_optimization.reduce_scatter' is false; with "
                            f"--sequence_parallel_size {sp} it must stay true (DeepSpeed's other path averages "
                            "gradients over a different number of ranks); remove it")
        zero["reduce_scatter"] = True
    ds.setdefault("steps_per_print", 10**9)  # our own logging replaces DeepSpeed's
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))
