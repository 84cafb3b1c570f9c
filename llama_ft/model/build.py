"""Build a Llama with LoRA for ZeRO-3 training: meta skeleton, final-format partitions, checkpoint.

No rank ever holds more than its share of the final model: the model is built on the meta device
with LoRA (and FP8) layers already in place, each parameter then gets only this rank's partition in
its final format and place (model/partition.py), and the checkpoint is written into those
partitions (model/loader.py streams each rank's own bytes).

Flow of one weight (the first three of the four files a reader follows):
    shards.py        header/index lookup of `model.layers.0.self_attn.q_proj.weight`
    model/loader.py  `stream_checkpoint_into_partitions`: read this rank's rows into its ZeRO-3 partition
    lora.py          `LoRALinear.forward`: the matmul that uses it
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from safetensors import safe_open
from torch import nn

from llama_ft.errors import UserError
from llama_ft.fp8.checkpoint import check_prequantized, is_target, prequantized_targets
from llama_ft.fp8.format import scales_to_bytes
from llama_ft.fp8.module import FP8LoRALinear, quantize_device, quantize_fp8
from llama_ft.lora import LoRALinear, LoraSpec, inject_lora, lora_modules
from llama_ft.model.loader import LoadReport, stream_checkpoint_into_partitions
from llama_ft.model.meter import BuildMeter
from llama_ft.model.offload import choose_offloaded
from llama_ft.model.partition import DirectPartitioner, materialize_unpartitioned
from llama_ft.nf4 import checkpoint as nf4_checkpoint
from llama_ft.nf4.format import quantize_nf4_reference
from llama_ft.nf4.module import NF4LoRALinear
from llama_ft.quant.module import quant_modules
from llama_ft.shards import ST_DTYPES, Checkpoint, open_checkpoint

log = logging.getLogger(__name__)

RANDOM_FILL_CHUNK = 1 << 26
"""Elements drawn at a time by fill_random_partitions (256 MiB of float32)."""


def _skip_init():
    """Skip transformers' random weight init: every weight is overwritten by the checkpoint."""
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:  # pragma: no cover - transformers 4.x
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def full_shape(p: nn.Parameter) -> tuple[int, ...]:
    """Logical shape of a parameter, partitioned (ZeRO-3) or not."""
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


def check_checkpoint_fits(shapes: dict[str, tuple[int, ...]], ckpt: Checkpoint,
                          quantized_names: set[str] = frozenset()) -> None:
    """Every tensor the model needs is in the checkpoint, with the shape config.json implies.

    `shapes`: parameter name -> logical shape; `quantized_names`: weights stored pre-quantized (FP8 or NF4
    bytes, checked by their format's own check). Raises UserError naming the file and tensor.
    """
    index = ckpt.root / "model.safetensors.index.json"
    missing = [n for n in shapes if n not in ckpt.tensors]
    if missing:
        raise UserError(f"{index}: checkpoint lacks tensor {missing[0]!r} the model needs ({len(missing)} missing)")
    for name, shape in shapes.items():
        if name in quantized_names:
            continue  # dtype, shape and scales checked by the format (fp8/checkpoint.py, nf4/checkpoint.py)
        info = ckpt.tensors[name]
        if tuple(info.shape) != tuple(shape):
            raise UserError(
                f"{ckpt.root / info.shard}: tensor {name!r} has shape {list(info.shape)}, "
                f"config.json implies {list(shape)}"
            )
        if ST_DTYPES.get(info.dtype) not in (torch.bfloat16, torch.float16, torch.float32):
            raise UserError(f"{ckpt.root / info.shard}: tensor {name!r} has dtype {info.dtype}, expected BF16/F16/F32")


@dataclass(frozen=True)
class Prequantized:
    """What a pre-quantized checkpoint holds: its format (bits) and the module names quantized in it."""

    bits: int
    targets: list[str]


def prequantized_layout(ckpt: Checkpoint, flag: str = "--model_name_or_path") -> Prequantized | None:
    """FP8 (`llama-ft quantize`) or NF4 (bitsandbytes' bnb-4bit layout) checkpoint, checked; None for a plain
    one. A bitsandbytes checkpoint in another form (8-bit, fp4) is one UserError (nf4/checkpoint.py)."""
    if nf4_checkpoint.is_bnb(ckpt.config):
        return Prequantized(4, nf4_checkpoint.targets_of(nf4_checkpoint.check_bnb_checkpoint(ckpt)))
    targets = prequantized_targets(ckpt, flag)
    if targets is None:
        return None
    check_prequantized(ckpt, targets)
    return Prequantized(8, targets)


def inspect_checkpoint(model_dir: str | Path, spec: LoraSpec,
                       flag: str = "--model_name_or_path") -> tuple[Checkpoint, Prequantized | None]:
    """Open and check a checkpoint against its config and the LoRA targets, reading only headers.

    Returns the checkpoint and, for a pre-quantized one (FP8 by `llama-ft quantize`, or bitsandbytes' NF4),
    its layout: the quantized module names must be the LoRA targets (each is a QuantLoRALinear).
    """
    ckpt = open_checkpoint(model_dir, flag)
    pre = prequantized_layout(ckpt, flag)
    if pre is not None and sorted(pre.targets) != sorted(spec.target_modules):
        raise UserError(f"--lora_target_modules {sorted(spec.target_modules)}: {model_dir} is quantized for "
                        f"{sorted(pre.targets)}; the LoRA targets must be exactly those layers")
    shapes = expected_shapes(model_dir)
    check_checkpoint_fits(shapes, ckpt, {n for n in shapes if pre and is_target(n, pre.targets)})
    linear_names = {n.rsplit(".", 2)[-2] for n, s in shapes.items() if n.endswith(".weight") and len(s) == 2}
    unknown = sorted(set(spec.target_modules) - linear_names)
    if unknown:
        raise UserError(f"--lora_target_modules: {unknown} match no linear layer of {model_dir} "
                        f"(it has {', '.join(sorted(linear_names - {'embed_tokens', 'lm_head'}))})")
    return ckpt, pre


def expected_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the model config.json describes, from a meta-device build (no memory)."""
    from transformers import AutoModelForCausalLM

    config = load_llama_config(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def load_llama_config(model_dir: str | Path):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"{Path(model_dir) / 'config.json'}: not a usable model config ({e})") from e
    if config.model_type != "llama":
        raise UserError(f"{Path(model_dir) / 'config.json'}: model_type is {config.model_type!r}, expected 'llama'")
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # ours (quantize.py): FP8 layers are built by llama-ft, not transformers
    return config


def load_checkpoint_weights(model: nn.Module, ckpt: Checkpoint) -> int:
    """`--loader hf`: write every checkpoint tensor into the model's (possibly partitioned) parameters.

    Rank 0 reads each tensor once and ZeRO-3 scatters it into the ranks' partitions
    (`GatheredParameters(modifier_rank=0)`); one parameter is whole at a time. A quantized layer's
    bf16 weight is quantized by rank 0 (FP8 on its GPU when it has one) and only the quantized bytes
    and scales are scattered. Returns bytes read. The caller checks first that the checkpoint fits
    (`check_checkpoint_fits`).
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    params = dict(model.named_parameters(remove_duplicate=True))
    quant = quant_modules(model)

    nbytes = 0
    for shard in ckpt.shards:
        wanted = [n for n in ckpt.names_in(shard) if n in params]
        if not wanted:
            continue
        with safe_open(ckpt.shard_path(shard), framework="pt") as f:
            for name in wanted:
                m = quant.get(name)
                targets = list(m.storage()) if m is not None else [params[name]]
                z3 = hasattr(targets[0], "ds_id")
                with deepspeed.zero.GatheredParameters(targets, modifier_rank=0, enabled=z3):
                    if rank == 0 or not z3:
                        t = f.get_tensor(name)
                        nbytes += t.numel() * t.element_size()
                        values = [t] if m is None else quantized_storage(m, t)
                        for param, v in zip(targets, values, strict=True):
                            param.data.copy_(v.reshape(param.data.shape))
    return nbytes


def quantized_storage(m: nn.Module, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The storage tensors (m.STORAGE order) of a whole weight `w` quantized in `m`'s format."""
    if m.FORMAT == "nf4":
        packed, absmax = quantize_nf4_reference(w)
        return packed, absmax.view(torch.uint8)
    q, scales = quantize_fp8(w.to(quantize_device()))
    return q, scales_to_bytes(scales)


def build_skeleton(config, spec: LoraSpec, dtype: torch.dtype, quantize: bool, fp8_compute: bool,
                   attn_implementation: str, bits: int = 8) -> tuple[nn.Module, list[str]]:
    """The model on the meta device (shapes and dtypes, no storage) with its final layer classes: every
    targeted linear is already a LoRALinear or, with `quantize`, a QuantLoRALinear with uint8 storage
    (FP8LoRALinear at 8 bits, NF4LoRALinear at 4)."""
    from transformers import AutoModelForCausalLM

    def make_quantized(lin: nn.Linear, spec: LoraSpec) -> nn.Module:
        if bits == 4:
            return NF4LoRALinear.empty(lin.in_features, lin.out_features, spec, dtype)
        return FP8LoRALinear.empty(lin.in_features, lin.out_features, spec, dtype, fp8_compute)

    with torch.device("meta"), _skip_init():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation,
                                                 trust_remote_code=False)
        model.tie_weights()  # transformers ties lm_head to the embeddings inside its weight init, which is skipped
        wrapped = inject_lora(model, spec, make_quantized if quantize else None)
    return model, wrapped


def _materialize_buffers(model: nn.Module, device: torch.device) -> None:
    """The rotary embedding's inv_freq is computed in its __init__, which ran on the meta device."""
    for path, module in model.named_modules():
        if any(b is not None and b.is_meta for b in module._buffers.values()):
            if "RotaryEmbedding" not in type(module).__name__:
                raise RuntimeError(f"{path}: meta buffers of {type(module).__name__} have no known initialiser")
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    type(module)(config=module.config).to(device))


def build_lora_model(
    model_dir: str | Path,
    spec: LoraSpec,
    ds_config: dict | None,
    dtype: torch.dtype = torch.bfloat16,
    gradient_checkpointing: bool = False,
    flag: str = "--model_name_or_path",
    quantize: bool = False,
    fp8_compute: bool = False,
    loader: str = "stream",
    bits: int = 8,
    offload_ratio: float | None = None,
    attn_implementation: str = "sdpa",
    init: str = "checkpoint",
) -> tuple[nn.Module, LoadReport]:
    """LlamaForCausalLM from `model_dir` with LoRA on `spec.target_modules`, partitioned by ZeRO-3.

    `ds_config` is the resolved DeepSpeed config; None builds an ordinary (unpartitioned)
    model, used by single-process tools and tests. Only A and B require grad afterwards.
    With `quantize`, every targeted linear is a QuantLoRALinear: FP8LoRALinear (e4m3, 128x128 block scales)
    with `bits` 8, NF4LoRALinear (bitsandbytes' NF4, blocks of 64) with `bits` 4. A pre-quantized checkpoint
    sets both (its own format; a `bits` that differs is the caller's to refuse: recipe.check_model_options).

    The build never holds more than the final model: the skeleton is built on the meta device with
    the final layer classes, each parameter then gets only this rank's partition, in its final
    format (FP8 bytes for FP8 layers: no bf16 copy of them ever exists) and place (model/partition.py),
    and the loader writes the checkpoint into those partitions.

    Loaders (ZeRO-3): "stream" (default) fills each rank's partitions from the bytes it owns
    (model/loader.py), quantizing FP8 layers on load; "hf" is the Hugging Face way, rank 0 reads
    every tensor and ZeRO-3 scatters it, kept as a reference and a fallback (and used for NVMe-offloaded
    partitions, which live in swap files).

    `offload_ratio` (ZeRO-3 only): keep that fraction of the frozen base-weight bytes in host
    memory, spread evenly through the layers (model/offload.py); None keeps them where ZeRO-3 puts them.
    `attn_implementation`: transformers' attention backend (sdpa, eager, flash_attention_2).
    `init="random"` (benchmarks): no checkpoint is read, only config.json; every partition is filled with
    random values where it lives (fill_random_partitions).

    The report carries the build's peak memory per phase and the bytes its collectives moved (model/meter.py).
    """
    ckpt, prequantized = (None, None) if init == "random" else inspect_checkpoint(model_dir, spec, flag)
    if prequantized is not None:
        quantize, bits = True, prequantized.bits
    offload_param = (ds_config or {}).get("zero_optimization", {}).get("offload_param", {}).get("device", "none")
    nvme = offload_param == "nvme"  # partitions live in swap files, not in ds_tensor: loaded the HF way
    if nvme and (init == "random" or prequantized is not None or quantize):
        fmt = "NF4" if bits == 4 else "FP8"
        what = ("--init random cannot fill" if init == "random" else
                f"{flag} {model_dir}: a pre-quantized {fmt} checkpoint cannot be loaded into"
                if prequantized is not None else f"--quantize: {fmt} layers cannot live in")
        raise UserError(f"{what} NVMe-offloaded partitions (offload_param.device 'nvme': DeepSpeed's NVMe swapper "
                        "keeps partitions in the training dtype); use ds_configs/zero3.json or zero3_offload.json")
    config = load_llama_config(model_dir)
    zero3 = ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3
    if offload_ratio is not None and offload_param not in (None, "none"):
        log.info("offload_param to %s keeps every partition off the GPU: --offload_ratio has no further effect",
                 offload_param)
        offload_ratio = None
    if offload_ratio is not None and not zero3:
        log.info("--offload_ratio: no effect without ZeRO-3 partitions (the model is not partitioned)")
        offload_ratio = None
    if zero3 and loader == "stream" and nvme:
        log.info("offload_param to NVMe: loading through ZeRO-3 gathers instead of streaming into partitions")
    # a pre-quantized checkpoint is always streamed: its bytes go straight into the quantized storage
    streaming = (loader == "stream" and not nvme) or prequantized is not None

    meter = BuildMeter()
    with meter.measure():
        model, wrapped = build_skeleton(config, spec, dtype, quantize, fp8_compute, attn_implementation, bits)
        meter.phase("skeleton (meta device)")
        device = torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0)))) if zero3 \
            else torch.device("cpu")
        for m in lora_modules(model).values():
            m.init_lora_parameters(device)
        _materialize_buffers(model, device)
        offload = {}
        if zero3:
            world = dist.get_world_size()
            host = set()
            if offload_ratio is not None:
                host, offload = choose_offloaded(model, offload_ratio, world)
            DirectPartitioner(ds_config, host).partition_model(model)
        else:
            materialize_unpartitioned(model)
        meter.phase("partitions (final format, empty)")
        t0 = time.time()
        if init == "random":
            report = fill_random_partitions(model)
        elif streaming:
            report = stream_checkpoint_into_partitions(model, ckpt, prequantized is not None)
        else:
            nbytes = load_checkpoint_weights(model, ckpt)
            report = LoadReport(rank=dist.get_rank() if dist.is_initialized() else 0,
                                world_size=dist.get_world_size() if dist.is_initialized() else 1,
                                checkpoint_bytes=ckpt.total_bytes(), bytes_read=nbytes, seconds=time.time() - t0,
                                peak_rss_bytes=0, quantized_layers=len(quant_modules(model)), extra={"loader": "hf"})
        meter.phase("load" if init == "checkpoint" else "random fill")
    report.set_partition_bytes(model)
    report.build = meter.summary()
    report.peak_rss_bytes = report.build["peak_rss_bytes"]
    if offload:
        report.extra["offload"] = {"ratio": offload_ratio, **offload}
    missing = sorted(set(spec.target_modules) - {n.rsplit(".", 1)[-1] for n in wrapped})
    if missing:
        raise UserError(f"--lora_target_modules: {missing} match no linear layer of {model_dir}")
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model, report


def fill_random_partitions(model: nn.Module, seed: int = 0, std: float = 0.02) -> LoadReport:
    """Random weights written where each rank's partitions live (benchmarks: no checkpoint, no disk).

    Norm weights 1, other bf16/fp32 weights N(0, std^2), FP8 layers e4m3(N(0, 1)) bytes with every block
    scale `std`, NF4 layers random code bytes with every absmax 2 * std (NF4 levels are in [-1, 1]). A scale
    partition starts at byte rank * partition_size of the flat fp32 bytes, so the bytes of the repeated
    scale are laid out from that offset. LoRA tensors keep their own init.

    Values are drawn on the partition's own device (one generator per device), RANDOM_FILL_CHUNK elements
    at a time: drawing a 70B model's 70e9 values on the CPU and copying them over took minutes, and a whole
    embedding drawn at once would be a 4 GiB float32 transient on the GPU.
    """
    t0 = time.time()
    rank = dist.get_rank() if dist.is_initialized() else 0
    generators: dict[torch.device, torch.Generator] = {}

    def generator(device: torch.device) -> torch.Generator:
        if device not in generators:
            generators[device] = torch.Generator(device=device).manual_seed(seed * 1000 + rank)
        return generators[device]

    scale_values = {"fp8": std, "nf4": 2 * std}
    scales = {f"{weight[:-len('weight')]}{m.STORAGE[1]}":
              torch.tensor([scale_values[m.FORMAT]], dtype=torch.float32).view(torch.uint8)
              for weight, m in quant_modules(model).items()}
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        t = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
        flat = t.data.view(-1)
        if name in scales:
            start = rank * flat.numel() if hasattr(p, "ds_tensor") else 0
            flat.copy_(scales[name][(start + torch.arange(flat.numel())) % 4])
            continue
        if name.endswith("norm.weight"):
            flat.fill_(1)
            continue
        for c0 in range(0, flat.numel(), RANDOM_FILL_CHUNK):
            part = flat[c0:c0 + RANDOM_FILL_CHUNK]
            values = torch.randn(part.numel(), generator=generator(part.device), device=part.device)
            if t.dtype == torch.uint8:
                part.copy_(values.to(torch.float8_e4m3fn).view(torch.uint8))
            else:
                part.copy_(values * std)
    return LoadReport(rank=rank, world_size=dist.get_world_size() if dist.is_initialized() else 1, checkpoint_bytes=0,
                      bytes_read=0, seconds=time.time() - t0, peak_rss_bytes=0,
                      quantized_layers=len(quant_modules(model)), extra={"loader": "random init"})


def partition_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of parameter storage this rank holds, by role: frozen linear weights (incl. FP8
    scales), other frozen weights, and LoRA. Under ZeRO-3 these are the rank's partitions."""
    linear_ids = {id(p) for m in model.modules() if isinstance(m, LoRALinear)
                  for n, p in m.named_parameters(recurse=False) if not n.startswith("lora_")}
    out = {"frozen_linear": 0, "frozen_other": 0, "lora": 0}
    for _, p in model.named_parameters():
        t = p.ds_tensor if hasattr(p, "ds_tensor") else p
        n = t.numel() * t.element_size()
        key = "lora" if p.requires_grad else "frozen_linear" if id(p) in linear_ids else "frozen_other"
        out[key] += n
    return out
