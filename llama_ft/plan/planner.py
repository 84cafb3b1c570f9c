"""The plan: every term per GPU (or per CPU rank) and per host, the verdict, and the smallest offload ratio.

Memory of one rank at its peak = what lives for the whole run + the largest of three moments:

    resident   base partitions on the device, small parameters ZeRO-3 keeps whole (persistent), the
               LoRA partitions, the optimizer buffers on the device, the reduce bucket
    moments    loss      (end of forward): saved activations (or checkpoint boundaries), the final norm's,
                         the chunked loss's temporaries, the parameters gathered then
               backward  (the last layer's backward): saved activations or boundaries + one recomputed
                         layer, its backward gradients, the most parameters gathered at any point of
                         the backward (zero.py `simulate_gathered`: the prefetch gathers the embeddings
                         again once the last layer's first modules are released)
               step      the optimizer step's temporary fp32 copy
               reference (--objective dpo only) the reference pass, which runs first on the same rows of a
                         micro-batch (P pairs: 2P padded rows, or with --packing rows of whole pairs up to
                         2 x --max_seq_len): its forward's working set with the most parameters gathered while
                         its layers run, or its loss (sequence_logprobs without gradients) with what is
                         gathered then, whichever is larger (activations.py, "DPO"); it keeps nothing for
                         backward, so the policy's moments are those of SFT on the same rows. With
                         --precompute_ref_logprobs it runs once, before training, on padded batches of P
                         pairs (train/reference.py), a forward alone, and the steps run the policy only
    + the fragmentation margin on the moment's bytes (CPU: malloc's heap retention, CPU_HEAP_RETENTION),
    + the CUDA context (GPU) or the process baseline (CPU)

Offload (--offload --offload_ratio R, llama_ft/model/offload.py) moves the partitions of about R (by
bytes) of the LoRA layers' frozen base weights to pinned host memory, chosen by error diffusion over
the model order (`spread_evenly`, the same function). Each offloaded partition crosses PCIe every
time ZeRO-3 gathers it (zero.py `simulate_gathered`): once in forward, once more in backward (with
gradient checkpointing the recompute's gather also serves the backward as long as
stage3_max_reuse_distance covers a layer), and only once for what stays gathered from forward into
backward (what the reuse distance keeps, and the up to stage3_max_live_parameters elements the prefetch
holds). The lower bound on
step time is those bytes over the per-GPU PCIe bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from llama_ft.errors import UserError
from llama_ft.flags import check_objective_choice
from llama_ft.plan import activations as act
from llama_ft.plan.shape import BITS, ModelShape, Param, base_bits, check_targets, model_params, shape_from_config
from llama_ft.plan.zero import (
    Trace,
    ZeroSettings,
    build_trace,
    forward_trace,
    is_persistent,
    modules_in_order,
    optimizer_bytes,
    part,
    partition_bytes,
    pinned,
    simulate_gathered,
    zero_settings,
)
from llama_ft.train.sp_layout import check_long_context_flags, check_sequence_parallel, mlp_tiles

GiB = 2**30

CUDA_CONTEXT_BYTES = int(1.5 * GiB)
"""Per GPU, outside PyTorch's allocator: the CUDA context with the kernels loaded lazily (CUDA 12:
~0.5 GiB on an H100 after the first matmul), cuBLAS/cuBLASLt workspaces (~0.1 GiB), and NCCL's
communicator buffers (0.3-1 GiB with 8 GPUs; NVLS on H100/H200 takes the upper end). An estimate from
those published figures, not measured by this project: no GPU was available when it was written."""

FRAGMENTATION = 0.10
"""Margin on the bytes allocated and freed within a step (activations, gathered parameters, loss
temporaries, optimizer temporaries): PyTorch's caching allocator keeps freed blocks in 2 MiB-rounded
segments that later requests of other sizes cannot always reuse; reserved exceeds allocated by 5-15%
in LLM training, and ZeRO-3's gathers of differently sized parameters are on the high side."""

CPU_HEAP_RETENTION = 0.05
"""The CPU ranks' counterpart of FRAGMENTATION, on the same bytes: memory glibc's malloc keeps after it is
freed. CPU ranks fix glibc's mmap threshold at 1 MiB (llama_ft/train/cpu_heap.py), so every freed block of
1 MiB or more goes back to the system at once and only smaller chunks are kept. Measured on the
Llama-3.2-1B shape, 2 CPU ranks, gradient checkpointing (BENCHMARKS.md, "The planner against measured CPU
runs"): peak RSS over the plan's terms without a margin was 0.02 (bf16) and 0.03 (FP8) of the transient
terms at the peak moment; 0.05 rounds that up. With glibc's default, adjusting threshold (up to 32 MiB,
MALLOC_MMAP_THRESHOLD_ unset and not fixed) the freed heap grew to 0.23 (bf16) and 0.7 (FP8) of them."""

CPU_RANK_BASELINE_BYTES = int(0.68 * GiB)
"""Peak RSS of a CPU rank besides the planned terms: torch, transformers, datasets and deepspeed imported
(0.24 GiB), the gloo process group and a ZeRO-3 engine step (0.45 GiB), and the rest of a real run: data
pipeline, tokenizer, checkpoint save, the loss plot on rank 0. Measured with `python
benchmarks/plan_vs_measured.py --baseline` on the development machine (2 cores, torch 2.13 CPU, deepspeed
0.19.8, transformers 5.24): the embedded tiny model's run on 2 ranks peaked at 0.675 GiB (rank 0), less the
plan's 0.014 GiB of model terms: 0.66 GiB; an earlier 3-step run of it peaked at 0.70 GiB. The mean, 0.68."""

GPU_RANK_HOST_BASELINE_BYTES = int(3.0 * GiB)
"""Host RSS of a GPU rank besides its offloaded buffers: the CPU baseline plus the CUDA libraries the
process maps and touches (libtorch_cuda, cuBLAS, cuDNN, NCCL: ~1.5-2 GiB resident). An estimate."""

DEFAULT_PCIE_GBPS = 25.0
"""Effective host-to-device GB/s per GPU while all GPUs of a node copy at once: PCIe Gen5 x16 is 64 GB/s
raw per direction and ~50 GB/s for one pinned copy on an idle link, but 8 GPUs share the CPUs' memory
bandwidth and PCIe switches (often two GPUs behind one switch), so about half of that each."""

RATIO_STEP = 0.01
"""Resolution of the smallest offload ratio (what a user types as --offload_ratio)."""


class TrainOptions(Protocol):
    """The TrainConfig fields the plan reads (a TrainConfig, or the planner's own parsed flags)."""

    quantize: bool
    bits: int | None
    lora_r: int
    lora_target_modules: list[str]
    max_seq_len: int | None
    source_max_len: int
    target_max_len: int
    per_device_train_batch_size: int
    gradient_checkpointing: bool
    packing: bool
    loss_chunk_size: int


@dataclass(frozen=True)
class Options:
    """The training options as the plan uses them (validated)."""

    quantize: bool
    lora_r: int
    targets: tuple[str, ...]
    lora_dropout: float
    seq_len: int
    seq_note: str
    rows: int
    grad_accum: int
    checkpointing: bool
    packing: bool
    loss_chunk_size: int
    dtype_bytes: int
    offload_ratio: float | str | None  # None: no offload; "auto": the smallest that fits
    attn_implementation: str = "sdpa"
    sp: int = 1  # --sequence_parallel_size
    tiled_mlp: bool = False
    activation_offload: bool = False
    objective: str = "sft"  # "dpo": rows = 2 x pairs, and the reference pass (module doc)
    precompute_ref: bool = False  # --precompute_ref_logprobs: the reference pass runs once, before training
    bits: int = 8  # the quantized format with `quantize`: 8 FP8, 4 NF4

    @property
    def dpo(self) -> bool:
        return self.objective == "dpo"

    @property
    def base_bits(self) -> int:
        """Bits a frozen target weight is stored in: 4, 8, or the training dtype's (16, 32)."""
        return base_bits(self.quantize, self.bits, self.dtype_bytes)

    @property
    def base_format(self) -> str:
        return {4: "nf4", 8: "fp8"}.get(self.base_bits, "bf16" if self.dtype_bytes == 2 else "fp32")


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"--{name} {value}: expected an integer > 0")
    return value


def sequence_length(cfg: Any, shape: ModelShape) -> tuple[int, str]:
    """The longest row a micro-batch can have, and how it follows from the flags."""
    max_seq = getattr(cfg, "max_seq_len", None)
    if max_seq is not None:
        _positive("max_seq_len", max_seq)
        if max_seq > shape.max_position_embeddings:
            raise UserError(f"--max_seq_len {max_seq}: above the model's max_position_embeddings "
                            f"{shape.max_position_embeddings}")
    if getattr(cfg, "packing", False):
        if max_seq is None:
            raise UserError("--packing needs --max_seq_len N: the length of a packed row")
        if getattr(cfg, "objective", "sft") == "dpo":  # --max_seq_len bounds each side (data/batches.py)
            return 2 * max_seq, f"packed rows of whole pairs, 2 x --max_seq_len {max_seq}"
        return max_seq, f"packed rows of --max_seq_len {max_seq}"
    if getattr(cfg, "dataset_format", "alpaca") == "chat" or getattr(cfg, "objective", "sft") == "dpo":
        if max_seq is None:  # (pairs are chat rows, data/pairs.py, whatever --dataset_format says)
            longest = shape.max_position_embeddings
            return longest, f"chat data without --max_seq_len: max_position_embeddings {longest}, the longest possible"
        return max_seq, f"--max_seq_len {max_seq}"
    src, tgt = _positive("source_max_len", cfg.source_max_len), _positive("target_max_len", cfg.target_max_len)
    if max_seq is not None and max_seq < src + tgt:
        return max_seq, f"--max_seq_len {max_seq}"
    return src + tgt, f"--source_max_len {src} + --target_max_len {tgt}"


FP8_COMPUTE_WITH_4_BITS = ("--fp8_compute with --bits 4: FP8 compute multiplies FP8-stored weights; NF4 weights are "
                            "decoded to the training dtype (drop --fp8_compute, or use --bits 8)")
"""llama_ft/config.py's line for it, word for word (a test keeps them equal): importing config.py imports torch."""
FP8_COMPUTE_NEEDS_QUANTIZE = ("--fp8_compute needs --quantize, or a pre-quantized FP8 checkpoint as "
                              "--model_name_or_path (FP8 compute multiplies FP8-stored weights)")
"""Training's line (train/recipe.py check_model_options) and the plan's: only the checkpoint tells whether its
weights are FP8 already, so it is not refused when the flags are parsed."""


def quantized_bits(cfg: Any, checkpoint_bits: int | None, name: str = "") -> tuple[bool, int]:
    """(--quantize, --bits) settled against the checkpoint `name` (None: not pre-quantized), for the plan and for
    training (train/recipe.py check_model_options): --bits None (not given), 4 or 8, else config.py's line;
    --bits 4 implies --quantize and refuses --fp8_compute; a pre-quantized checkpoint implies --quantize at its
    own bits, and a --bits given against it is one line; --fp8_compute needs FP8 weights one way or the other."""
    bits = getattr(cfg, "bits", None)
    if bits not in (None, *BITS):
        raise UserError(f"--bits {bits}: expected 8 (FP8 e4m3 base weights) or 4 (NF4, as QLoRA)")
    if bits == 4 and getattr(cfg, "fp8_compute", False):
        raise UserError(FP8_COMPUTE_WITH_4_BITS)
    quantize = bool(cfg.quantize) or bits == 4
    pre = checkpoint_bits
    if pre is not None:
        if bits not in (None, pre):
            kind = "NF4 (bitsandbytes bnb-4bit)" if pre == 4 else "FP8 (llama-ft quantize)"
            raise UserError(f"--bits {bits}: {name or 'the model'} is a pre-quantized {kind} checkpoint, "
                            f"{pre}-bit; drop --bits (or pass --bits {pre}), or give the bf16 checkpoint to quantize "
                            "it on load")
        quantize, bits = True, pre
        if bits == 4 and getattr(cfg, "fp8_compute", False):
            raise UserError(f"--fp8_compute: {name or 'the model'} holds NF4 weights (4-bit); FP8 compute "
                            "multiplies FP8-stored weights (drop --fp8_compute)")
    if getattr(cfg, "fp8_compute", False) and not quantize:
        raise UserError(FP8_COMPUTE_NEEDS_QUANTIZE)
    return quantize, 8 if bits is None else bits


def options_from(cfg: TrainOptions, shape: ModelShape) -> Options:
    """Validate and normalize the training options (UserError naming the flag)."""
    ratio: Any = getattr(cfg, "offload_ratio", None)
    if ratio is None and getattr(cfg, "offload", False):
        ratio = 1.0  # --offload alone: the recipe's default ratio
    if isinstance(ratio, str) and ratio != "auto":
        try:
            ratio = float(ratio)
        except ValueError:
            raise UserError(f"--offload_ratio {ratio!r}: expected a fraction in [0, 1] or 'auto'") from None
    if ratio is not None and ratio != "auto" and not 0 <= ratio <= 1:
        raise UserError(f"--offload_ratio {ratio}: expected a fraction in [0, 1] or 'auto'")
    sp = getattr(cfg, "sequence_parallel_size", 1)
    offload_acts = bool(getattr(cfg, "activation_offload", False))
    check_long_context_flags(sp, offload_acts, bool(cfg.gradient_checkpointing))
    objective = getattr(cfg, "objective", "sft")
    check_objective_choice(objective)
    precompute = bool(getattr(cfg, "precompute_ref_logprobs", False))
    if precompute and objective != "dpo":
        raise UserError(f"--precompute_ref_logprobs applies to --objective dpo (this run: {objective})")
    if objective == "dpo":
        # what training refuses with DPO (config.py check_objective) has no plan either
        for flag, on in (("--sequence_parallel_size > 1", sp > 1),
                         ("--tiled_mlp", bool(getattr(cfg, "tiled_mlp", False)))):
            if on:
                raise UserError(f"{flag} with --objective dpo: not planned (training does not run it with DPO yet: "
                                "DPO scores whole sequences on each rank)")
    chunk = _positive("loss_chunk_size", cfg.loss_chunk_size)
    dropout = float(getattr(cfg, "lora_dropout", 0.05))
    if not 0 <= dropout < 1:
        raise UserError(f"--lora_dropout {dropout}: expected a value in [0, 1)")
    seq, note = sequence_length(cfg, shape)
    attn = getattr(cfg, "attn_implementation", "sdpa")
    if attn not in ("sdpa", "eager", "flash_attention_2"):
        raise UserError(f"--attn_implementation {attn!r}: expected one of sdpa, eager, flash_attention_2")
    quantize, bits = quantized_bits(cfg, shape.checkpoint_bits, shape.name)
    return Options(quantize=quantize, lora_r=_positive("lora_r", cfg.lora_r),
                   targets=check_targets(cfg.lora_target_modules), lora_dropout=dropout, seq_len=seq,
                   seq_note=note, rows=_positive("per_device_train_batch_size", cfg.per_device_train_batch_size),
                   grad_accum=_positive("gradient_accumulation_steps", getattr(cfg, "gradient_accumulation_steps", 1)),
                   checkpointing=bool(cfg.gradient_checkpointing), packing=bool(cfg.packing), loss_chunk_size=chunk,
                   dtype_bytes=2 if getattr(cfg, "bf16", True) else 4, offload_ratio=ratio, attn_implementation=attn,
                   sp=sp, tiled_mlp=bool(getattr(cfg, "tiled_mlp", False)), activation_offload=offload_acts,
                   objective=objective, precompute_ref=precompute, bits=bits)


@dataclass(frozen=True)
class Machine:
    nodes: int
    gpus_per_node: int
    gpu_memory_bytes: int | None
    host_memory_bytes: int | None
    device: str = "cuda"
    pcie_gbps: float = DEFAULT_PCIE_GBPS

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


def check_machine(m: Machine) -> None:
    for name, value in (("nodes", m.nodes), ("gpus_per_node", m.gpus_per_node)):
        _positive(name, value)
    if m.device not in ("cuda", "cpu"):
        raise UserError(f"--device {m.device!r}: expected cuda or cpu")
    for flag, value in (("--gpu_memory_gb", m.gpu_memory_bytes), ("--host_memory_gb", m.host_memory_bytes)):
        if value is not None and value <= 0:
            raise UserError(f"{flag} {value / GiB:g}: expected a size > 0 (GiB)")
    if m.device == "cuda" and m.gpu_memory_bytes is None:
        raise UserError("--gpu_memory_gb: needed to plan for GPUs (the memory of one GPU in GiB, e.g. 79.6 for an "
                        "H100 80GB as nvidia-smi reports it), or --device cpu for CPU ranks")
    if m.device == "cpu" and m.host_memory_bytes is None:
        raise UserError("--host_memory_gb: needed with --device cpu (the host's memory in GiB)")
    if not m.pcie_gbps > 0:
        raise UserError(f"--pcie_gbps {m.pcie_gbps}: expected a bandwidth > 0 (GB/s)")


def spread_evenly(sizes: list[int], ratio: float) -> list[bool]:
    """Pick items so their total size is about `ratio` of the whole, spread evenly in order: which frozen
    base tensors --offload_ratio keeps in host memory (llama_ft/model/offload.py uses this one).

    Error diffusion: item i is picked when that brings the picked total closer to ratio x (size of
    items 0..i). The picked total ends within half an item of ratio x total.
    """
    picked, seen, chosen = 0, 0, []
    for s in sizes:
        seen += s
        take = abs(picked + s - ratio * seen) <= abs(picked - ratio * seen)
        chosen.append(take)
        picked += s if take else 0
    return chosen


@dataclass
class Model:
    """Everything about the model and run that does not depend on the offload ratio."""

    shape: ModelShape
    opts: Options
    zero: ZeroSettings
    machine: Machine
    params: list[Param]
    moments: dict[str, dict[str, int]] = field(default_factory=dict)
    gathers: dict[str, int] = field(default_factory=dict)


def build_model(shape: ModelShape, opts: Options, zero: ZeroSettings, machine: Machine) -> Model:
    params = model_params(shape, opts.targets, opts.lora_r, opts.quantize, opts.dtype_bytes, opts.bits)
    model = Model(shape, opts, zero, machine, params)
    modules = modules_in_order(params, zero)
    in_step = opts.dpo and not opts.precompute_ref  # DPO: the reference forward runs first in each micro-batch
    trace = build_trace(modules, shape.num_hidden_layers, opts.checkpointing, reference_pass=in_step)
    model.moments = micro_batch_moments(model, trace)
    if opts.dpo:
        model.moments["reference pass"] = reference_moment(
            model, trace if in_step else forward_trace(modules, shape.num_hidden_layers))
    return model


def micro_batch_moments(model: Model, trace: Trace) -> dict[str, dict[str, int]]:
    """The transient terms at the loss, at the last layer's backward and at the optimizer step."""
    shape, o = model.shape, model.opts
    mb = micro_batch(model)
    layers = shape.num_hidden_layers
    layer = sum(act.layer_saved(shape, mb).values())
    kept_for_backward = layers * (act.checkpoint_boundary(shape, mb) if o.checkpointing else layer)
    if o.activation_offload and model.machine.device == "cuda":  # in host memory but the one being recomputed
        kept_for_backward = act.checkpoint_boundary(shape, mb)
    shared = act.shared_inputs(shape, mb)
    recompute = layer if o.checkpointing else 0
    opt = optimizer_bytes([p for p in model.params if p.kind == "lora"], model.machine.world, o.dtype_bytes,
                          model.zero, pin=model.machine.device == "cuda")
    held = simulate_gathered(trace, model.zero, model.gathers)  # gathered bytes while each position runs
    return {
        "loss": {"activations": kept_for_backward + shared + act.final_norm(shape, mb),
                 "gathered": held[trace.forward_end],
                 "loss": sum(act.loss_temporaries(shape, mb, o.loss_chunk_size).values())},
        "backward": {"activations": kept_for_backward + shared + recompute + act.layer_backward_transient(shape, mb),
                     "gathered": max(held[trace.forward_end + 1:])},
        "optimizer step": {"optimizer step": opt.step_transient_device},
    }


def reference_moment(model: Model, trace: Trace) -> dict[str, int]:
    """The DPO reference pass at its peak (no grad, adapters off, on reference_micro_batch's rows): a layer's
    working set with the RoPE tables and mask and the most parameters gathered while its layers run, or its
    sequence_logprobs (final hidden states + chunked head without gradients) with what is gathered then,
    whichever is larger. `trace`: the micro-batch's (the reference forward first), or the forward alone of
    the pass before training (--precompute_ref_logprobs)."""
    shape, end, mb = model.shape, trace.reference_end, reference_micro_batch(model)
    assert end is not None, "a trace with a reference pass"
    held = simulate_gathered(trace, model.zero)  # (no `gathers`: micro_batch_moments counted the step's)
    in_layer = {"activations": act.shared_inputs(shape, mb) + act.reference_forward(shape, mb),
                "gathered": max(held[:end])}
    loss = act.reference_loss(shape, mb, model.opts.loss_chunk_size)
    at_loss = {"activations": loss.pop("final hidden states"), "gathered": held[end], "loss": sum(loss.values())}
    return max(in_layer, at_loss, key=lambda terms: sum(terms.values()))


def micro_batch(model: Model) -> act.MicroBatch:
    """One rank's micro-batch: its 1/sp of the tokens, the tiled MLP's slices as training picks them
    (train/recipe.py: about hidden_size tokens each, from the longest sequence a rank holds)."""
    o, shape = model.opts, model.shape
    joined = o.rows if o.packing and o.attn_implementation == "flash_attention_2" else 1
    tiles = mlp_tiles(o.seq_len, joined, o.sp, shape.hidden_size) if o.tiled_mlp else 1
    # DPO: --per_device_train_batch_size counts pairs, each 2 rows (packed: rows of whole pairs, seq_len 2 x a side)
    rows = 2 * o.rows if o.dpo and not o.packing else o.rows
    return act.MicroBatch(rows, o.seq_len, o.dtype_bytes, o.lora_r, o.targets, o.lora_dropout, o.packing,
                          o.attn_implementation, model.machine.device, o.sp, tiles)


def reference_micro_batch(model: Model) -> act.MicroBatch:
    """The rows DPO's reference pass runs on: the micro-batch's, or with --precompute_ref_logprobs the pass before
    training's padded batches of P pairs (2P rows of one side's length, data/collate.collate_pairs), packed
    training or not."""
    mb, o = micro_batch(model), model.opts
    if not o.precompute_ref:
        return mb
    return replace(mb, rows=2 * o.rows, seq_len=o.seq_len // 2 if o.packing else o.seq_len, packing=False)


def offloaded_activation_bytes(model: Model) -> int:
    """Checkpoint boundaries one rank keeps in host memory with --activation_offload (GPU ranks)."""
    o = model.opts
    if not o.activation_offload or model.machine.device != "cuda":
        return 0
    return model.shape.num_hidden_layers * act.checkpoint_boundary(model.shape, micro_batch(model))


def _offloaded(model: Model, ratio: float) -> set[str]:
    """Names of the target partitions --offload_ratio moves to host memory (none on CPU ranks or when
    DeepSpeed offloads every parameter anyway)."""
    if model.machine.device == "cpu" or model.zero.offload_param != "none" or ratio <= 0:
        return set()
    targets = [p for p in model.params if p.kind == "target"]
    chosen = spread_evenly([partition_bytes(p, model.machine.world) for p in targets], ratio)
    return {p.name for p, take in zip(targets, chosen, strict=True) if take}


def _on_host(model: Model, p: Param, offloaded: set[str]) -> bool:
    """Whether p's partition lives in host memory on a GPU machine: chosen by --offload_ratio, or any under
    DeepSpeed's offload_param; a persistent parameter's partition stays on the GPU either way
    (model/partition.py, like zero.Init)."""
    return not is_persistent(p, model.zero) and (p.name in offloaded or model.zero.offload_param != "none")


def evaluate(model: Model, ratio: float) -> dict[str, Any]:
    """Per-GPU (per-rank) and per-host bytes, the verdict and the PCIe cost at one offload ratio."""
    m, z, o = model.machine, model.zero, model.opts
    world, cpu = m.world, m.device == "cpu"
    offloaded = _offloaded(model, ratio)
    pin = not cpu
    frozen = [p for p in model.params if p.kind != "lora"]
    lora = [p for p in model.params if p.kind == "lora"]
    opt = optimizer_bytes(lora, world, o.dtype_bytes, z, pin=pin)

    def host_alloc(nbytes: int, pinned_by: bool) -> int:  # pinned allocations take a power of two
        return pinned(nbytes) if pin and pinned_by else nbytes

    dev = {
        "base_partitions_bytes": sum(partition_bytes(p, world) for p in frozen
                                     if cpu or not _on_host(model, p, offloaded)),
        "persistent_bytes": sum(p.nbytes for p in model.params if is_persistent(p, z)),
        "lora_bytes": sum(partition_bytes(p, world) for p in lora if cpu or not _on_host(model, p, offloaded)),
        "optimizer_bytes": sum(opt.device.values()) + (sum(opt.host.values()) if cpu else 0),
        "comm_bytes": z.reduce_bucket_size * (z.comm_bytes or o.dtype_bytes) if z.contiguous_gradients else 0,
    }
    host_base = 0 if cpu else sum(host_alloc(partition_bytes(p, world), p.name in offloaded or z.offload_param_pin)
                                  for p in frozen if _on_host(model, p, offloaded))
    if z.offload_param == "nvme" and not cpu:  # partitions in swap files; pinned swap buffers instead
        host_base = z.nvme_buffer_count * pinned(z.nvme_buffer_size * o.dtype_bytes)
    # offload_param: one flat host buffer holds the LoRA partitions (stage3.py param_groups_fp16_flat_cpu_memory)
    host_lora = 0 if cpu or z.offload_param == "none" else \
        host_alloc(sum(partition_bytes(p, world) for p in lora), z.offload_param_pin)
    peak_name, peak = max(model.moments.items(), key=lambda kv: sum(kv[1].values()))
    transient = {"activations_bytes": peak.get("activations", 0), "gathered_bytes": peak.get("gathered", 0),
                 "loss_bytes": peak.get("loss", 0), "optimizer_step_bytes": peak.get("optimizer step", 0)}
    dev.update(transient)
    dev["fragmentation_bytes"] = int((CPU_HEAP_RETENTION if cpu else FRAGMENTATION) * sum(transient.values()))
    if cpu:
        dev["process_baseline_bytes"] = CPU_RANK_BASELINE_BYTES
    else:
        dev["cuda_context_bytes"] = CUDA_CONTEXT_BYTES
    dev["total_bytes"] = sum(dev.values())
    ranks = m.gpus_per_node
    if cpu:
        host = {"base_partitions_bytes": ranks * dev["base_partitions_bytes"], "lora_bytes": ranks * dev["lora_bytes"],
                "optimizer_bytes": ranks * dev["optimizer_bytes"], "ranks_bytes": ranks * dev["total_bytes"]}
        host["total_bytes"] = host["ranks_bytes"]
    else:
        host = {"base_partitions_bytes": ranks * host_base, "lora_bytes": ranks * host_lora,
                "optimizer_bytes": ranks * sum(opt.host.values()),
                "activations_bytes": ranks * pinned(offloaded_activation_bytes(model)),
                "process_baseline_bytes": ranks * GPU_RANK_HOST_BASELINE_BYTES}
        host["total_bytes"] = sum(host.values())
    h2d = h2d_bytes(model, offloaded)
    return {"offload_ratio": ratio, "peak_at": peak_name, "per_gpu": dev, "per_host": host,
            "offloaded_bytes_per_gpu": sum(partition_bytes(p, world) for p in frozen if _on_host(model, p, offloaded)),
            **h2d, **verdict(model, dev, host)}


def h2d_bytes(model: Model, offloaded: set[str]) -> dict[str, Any]:
    """Bytes each GPU copies from host memory per micro-batch and per optimizer step, and the step time
    that takes at --pcie_gbps at least."""
    m, o = model.machine, model.opts
    if m.device == "cpu":
        per_mb = 0
        opt_h2d = 0
    else:
        per_mb = sum(partition_bytes(p, m.world) * model.gathers.get(p.name, 0) for p in model.params
                     if _on_host(model, p, offloaded)) + offloaded_activation_bytes(model)  # back for the backward
        # offload_optimizer: the updated LoRA partitions come back once per step
        lora_part = sum(part(p.numel, m.world) for p in model.params if p.kind == "lora")
        opt_h2d = lora_part * o.dtype_bytes if model.zero.offload_optimizer != "none" else 0
    per_step = per_mb * o.grad_accum + opt_h2d
    return {"h2d_bytes_per_micro_batch": per_mb, "h2d_bytes_per_step": per_step,
            "step_time_lower_bound_s": per_step / (m.pcie_gbps * 1e9)}


def verdict(model: Model, dev: dict[str, int], host: dict[str, int]) -> dict[str, Any]:
    m = model.machine
    host_fits = None if m.host_memory_bytes is None else host["total_bytes"] <= m.host_memory_bytes
    if m.device == "cpu":
        return {"gpu_fits": None, "host_fits": host_fits, "fits": bool(host_fits)}
    gpu_fits = dev["total_bytes"] <= m.gpu_memory_bytes
    return {"gpu_fits": gpu_fits, "host_fits": host_fits, "fits": gpu_fits and host_fits is not False}


def dominant_term(terms: dict[str, int]) -> str:
    """The largest term of a breakdown (not its total)."""
    return max((k for k in terms if k != "total_bytes"), key=lambda k: terms[k])


def min_offload_ratio(model: Model) -> float | None:
    """The smallest ratio on a RATIO_STEP grid at which the plan fits (None if none does). Offload
    changes nothing on CPU ranks or with DeepSpeed's offload_param: then 0 if it fits."""
    if model.machine.device == "cpu" or model.zero.offload_param != "none":
        return 0.0 if evaluate(model, 0.0)["fits"] else None
    steps = round(1 / RATIO_STEP)
    for k in range(steps + 1):
        if evaluate(model, k / steps)["fits"]:
            return k / steps
    return None


def cannot_fit(model: Model) -> dict[str, Any]:
    """Where a plan that fits at no ratio falls short, at the most offload it can have: the side (per GPU
    or per host), its total and capacity, and its largest term."""
    offload_applies = model.machine.device == "cuda" and model.zero.offload_param == "none"
    most = evaluate(model, 1.0 if offload_applies else 0.0)
    side = "per_host" if most["gpu_fits"] is not False else "per_gpu"
    m = model.machine
    capacity = m.gpu_memory_bytes if side == "per_gpu" else m.host_memory_bytes
    terms = most["per_gpu"] if m.device == "cpu" else most[side]  # CPU ranks: the largest term of one rank
    term = dominant_term(terms)
    return {"offload_ratio": most["offload_ratio"], "offload_applies": offload_applies, "where": side,
            "total_bytes": most[side]["total_bytes"], "capacity_bytes": capacity, "term": term,
            "term_bytes": terms[term]}


def plan(shape: ModelShape, opts: Options, zero: ZeroSettings, machine: Machine) -> dict[str, Any]:
    """The plan object (`llama-ft plan --json`)."""
    check_machine(machine)
    check_sequence_parallel(opts.sp, machine.world, shape.num_attention_heads, shape.num_key_value_heads,
                            opts.attn_implementation, opts.packing, shape.name)
    model = build_model(shape, opts, zero, machine)
    best = min_offload_ratio(model)
    if opts.offload_ratio == "auto":
        ratio = 1.0 if best is None else best
    else:
        ratio = float(opts.offload_ratio or 0.0)
    result = evaluate(model, ratio)
    result["min_offload_ratio"] = best
    short_of_host = machine.device == "cuda" and result["gpu_fits"] and result["host_fits"] is False
    result["dominant_term"] = dominant_term(result["per_host"] if short_of_host else result["per_gpu"])
    if best is None:
        result["cannot_fit"] = cannot_fit(model)
    result["moments"] = model.moments
    result["inputs"] = inputs_echo(model)
    result["constants"] = {"cuda_context_bytes": CUDA_CONTEXT_BYTES, "fragmentation": FRAGMENTATION,
                           "cpu_heap_retention": CPU_HEAP_RETENTION,
                           "cpu_rank_baseline_bytes": CPU_RANK_BASELINE_BYTES,
                           "gpu_rank_host_baseline_bytes": GPU_RANK_HOST_BASELINE_BYTES,
                           "pcie_gbps": machine.pcie_gbps, "ratio_step": RATIO_STEP}
    return result


def inputs_echo(model: Model) -> dict[str, Any]:
    s, o, z, m = model.shape, model.opts, model.zero, model.machine
    lora_numel = sum(p.numel for p in model.params if p.kind == "lora")
    return {"model": {"name": s.name, "hidden_size": s.hidden_size, "intermediate_size": s.intermediate_size,
                      "num_hidden_layers": s.num_hidden_layers, "num_attention_heads": s.num_attention_heads,
                      "num_key_value_heads": s.num_key_value_heads, "head_dim": s.head_dim, "vocab_size": s.vocab_size,
                      "tie_word_embeddings": s.tie_word_embeddings, "parameters": s.parameter_count(),
                      "lora_parameters": lora_numel},
            "training": {"quantize": o.quantize, "bits": o.base_bits, "base_format": o.base_format,
                         "lora_r": o.lora_r, "lora_target_modules": list(o.targets),
                         "lora_dropout": o.lora_dropout, "seq_len": o.seq_len, "seq_len_from": o.seq_note,
                         "per_device_train_batch_size": o.rows, "gradient_accumulation_steps": o.grad_accum,
                         "gradient_checkpointing": o.checkpointing, "packing": o.packing,
                         "loss_chunk_size": o.loss_chunk_size, "dtype": "bf16" if o.dtype_bytes == 2 else "fp32",
                         "attn_implementation": o.attn_implementation,
                         "offload_ratio": o.offload_ratio, "sequence_parallel_size": o.sp,
                         "tokens_per_rank": micro_batch(model).tokens, "tiled_mlp_slices": micro_batch(model).mlp_tiles,
                         "activation_offload": o.activation_offload, "objective": o.objective,
                         "rows_per_micro_batch": micro_batch(model).rows,
                         **({"reference_pass": {"before_training": o.precompute_ref,
                                                "rows": reference_micro_batch(model).rows,
                                                "seq_len": reference_micro_batch(model).seq_len}}
                            if o.dpo else {})},
            "deepspeed": {"reduce_bucket_size": z.reduce_bucket_size, "prefetch_bucket_size": z.prefetch_bucket_size,
                          "param_persistence_threshold": z.param_persistence_threshold,
                          "max_live_parameters": z.max_live_parameters, "max_reuse_distance": z.max_reuse_distance,
                          "sub_group_size": z.sub_group_size, "offload_param": z.offload_param,
                          "offload_optimizer": z.offload_optimizer},
            "machine": {"nodes": m.nodes, "gpus_per_node": m.gpus_per_node, "world_size": m.world, "device": m.device,
                        "gpu_memory_bytes": m.gpu_memory_bytes, "host_memory_bytes": m.host_memory_bytes,
                        "pcie_gbps": m.pcie_gbps}}


def plan_training(cfg: TrainOptions, ds_config: dict, llama_config: Any, nodes: int, gpus_per_node: int,
                  gpu_memory_bytes: int | None, host_memory_bytes: int | None, device: str = "cuda",
                  pcie_gbps: float = DEFAULT_PCIE_GBPS) -> dict[str, Any]:
    """The `llama-ft plan --json` object for a training config.

    cfg: a TrainConfig (or anything with its fields); cfg.offload_ratio None (no offload, unless
    cfg.offload: 1.0), a float, or "auto" (evaluate at the smallest ratio that fits). ds_config: the
    DeepSpeed config (resolved by fill_ds_config, or raw: "auto" bucket sizes are filled the same way).
    llama_config: a transformers LlamaConfig (or a ModelShape). Memory sizes in bytes; gpu_memory_bytes
    is required for device "cuda", host_memory_bytes for "cpu". Raises UserError on bad input.
    """
    shape = shape_from_config(llama_config)
    opts = options_from(cfg, shape)
    zero = zero_settings(ds_config, shape.hidden_size)
    return plan(shape, opts, zero, Machine(nodes, gpus_per_node, gpu_memory_bytes, host_memory_bytes, device,
                                           pcie_gbps))

