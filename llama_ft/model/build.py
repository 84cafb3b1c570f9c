"""Build a Llama for ZeRO-3 training: construct partitioned, load the checkpoint, inject LoRA.

No rank ever holds the whole model: modules are created under `deepspeed.zero.Init`, which
partitions each parameter as soon as its module's `__init__` returns, and checkpoint tensors
are then written into those partitions one parameter at a time.

Flow of one weight (the first three of the four files a reader follows):
    shards.py       header/index lookup of `model.layers.0.self_attn.q_proj.weight`
    model/build.py  `load_checkpoint_weights`: read it, write it into its ZeRO-3 partitions
    model/lora.py   `LoRALinear.base_matmul`: the matmul that uses it
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from llama_ft.errors import UserError
from llama_ft.model.loader import LoadReport, peak_rss_bytes, stream_checkpoint_into_partitions
from llama_ft.model.lora import LoraSpec, inject_lora
from llama_ft.model.offload import offload_frozen_partitions
from llama_ft.shards import ST_DTYPES, Checkpoint, open_checkpoint

log = logging.getLogger(__name__)


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


def _zero_init(ds_config: dict, enabled: bool):
    return deepspeed.zero.Init(config_dict_or_path=ds_config) if enabled else contextlib.nullcontext()


def full_shape(p: nn.Parameter) -> tuple[int, ...]:
    """Logical shape of a parameter, partitioned (ZeRO-3) or not."""
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


def check_checkpoint_fits(shapes: dict[str, tuple[int, ...]], ckpt: Checkpoint,
                          fp8_names: set[str] = frozenset()) -> None:
    """Every tensor the model needs is in the checkpoint, with the shape config.json implies.

    `shapes`: parameter name -> logical shape; `fp8_names`: weights stored pre-quantized (F8_E4M3).
    Raises UserError naming the file and tensor.
    """
    index = ckpt.root / "model.safetensors.index.json"
    missing = [n for n in shapes if n not in ckpt.tensors]
    if missing:
        raise UserError(f"{index}: checkpoint lacks tensor {missing[0]!r} the model needs ({len(missing)} missing)")
    for name, shape in shapes.items():
        info = ckpt.tensors[name]
        if tuple(info.shape) != tuple(shape):
            raise UserError(
                f"{ckpt.root / info.shard}: tensor {name!r} has shape {list(info.shape)}, "
                f"config.json implies {list(shape)}"
            )
        if name in fp8_names:
            continue  # dtype and scales checked by quantize.check_prequantized
        if ST_DTYPES.get(info.dtype) not in (torch.bfloat16, torch.float16, torch.float32):
            raise UserError(f"{ckpt.root / info.shard}: tensor {name!r} has dtype {info.dtype}, expected BF16/F16/F32")


def inspect_checkpoint(model_dir: str | Path, spec: LoraSpec,
                       flag: str = "--model_name_or_path") -> tuple[Checkpoint, list[str] | None]:
    """Open and check a checkpoint against its config and the LoRA targets, reading only headers.

    Returns the checkpoint and, for one written by `llama-ft quantize`, its FP8 module names
    (which must be the LoRA targets: each FP8 layer is an FP8LoRALinear).
    """
    from llama_ft.quantize import check_prequantized, is_target, prequantized_targets

    ckpt = open_checkpoint(model_dir, flag)
    pre = prequantized_targets(ckpt, flag)
    if pre is not None:
        check_prequantized(ckpt, pre)
        if sorted(pre) != sorted(spec.target_modules):
            raise UserError(f"--lora_target_modules {sorted(spec.target_modules)}: {model_dir} is quantized for "
                            f"{sorted(pre)}; the LoRA targets must be exactly those layers")
    shapes = expected_shapes(model_dir)
    check_checkpoint_fits(shapes, ckpt, {n for n in shapes if pre and is_target(n, pre)})
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
    """Write every checkpoint tensor into the model's (possibly partitioned) parameters.

    Rank 0 reads each tensor once and ZeRO-3 scatters it into the ranks' partitions
    (`GatheredParameters(modifier_rank=0)`); one parameter is whole at a time. Returns bytes read.
    The caller checks first that the checkpoint fits (`check_checkpoint_fits`).
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    params = dict(model.named_parameters(remove_duplicate=True))

    nbytes = 0
    for shard in ckpt.shards:
        wanted = [n for n in ckpt.names_in(shard) if n in params]
        if not wanted:
            continue
        with safe_open(ckpt.shard_path(shard), framework="pt") as f:
            for name in wanted:
                p = params[name]
                if hasattr(p, "ds_id"):
                    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                        if rank == 0:
                            t = f.get_tensor(name)
                            p.data.copy_(t)
                            nbytes += t.numel() * t.element_size()
                else:
                    t = f.get_tensor(name)
                    p.data.copy_(t)
                    nbytes += t.numel() * t.element_size()
    return nbytes


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
    offload_ratio: float | None = None,
    attn_implementation: str = "sdpa",
    init: str = "checkpoint",
) -> tuple[nn.Module, LoadReport]:
    """LlamaForCausalLM from `model_dir` with LoRA on `spec.target_modules`, partitioned by ZeRO-3.

    `ds_config` is the resolved DeepSpeed config; None builds an ordinary (unpartitioned)
    model, used by single-process tools and tests. Only A and B require grad afterwards.
    With `quantize`, every targeted linear becomes an FP8LoRALinear (e4m3, 128x128 block scales).

    Loaders (ZeRO-3): "stream" (default) fills each rank's partitions from the bytes it owns
    (model/loader.py), quantizing FP8 layers on load; "hf" is the Hugging Face way, rank 0 reads
    every tensor and ZeRO-3 scatters it, kept as a reference and a fallback.

    `offload_ratio` (ZeRO-3 only): keep that fraction of the frozen base-weight bytes in host
    memory, spread evenly through the layers (model/offload.py); None keeps them where ZeRO-3 put them.
    `attn_implementation`: transformers' attention backend (sdpa, eager, flash_attention_2).
    `init="random"` (benchmarks): no checkpoint is read, only config.json; every partition is filled with
    random values where it lives (fill_random_partitions).
    """
    from transformers import AutoModelForCausalLM

    ckpt, prequantized = (None, None) if init == "random" else inspect_checkpoint(model_dir, spec, flag)
    quantize = quantize or prequantized is not None
    offload_param = (ds_config or {}).get("zero_optimization", {}).get("offload_param", {}).get("device", "none")
    # NVMe-offloaded partitions live in swap files, not in ds_tensor: load those the HF way
    nvme = offload_param == "nvme"
    if init == "random" and nvme:
        raise UserError("--init random cannot fill NVMe-offloaded partitions (offload_param.device 'nvme': they "
                        "live in swap files); use ds_configs/zero3.json or zero3_offload.json for benchmarks")
    if prequantized is not None and nvme:
        raise UserError(f"{flag} {model_dir}: a pre-quantized FP8 checkpoint cannot be loaded into NVMe-offloaded "
                        "partitions (offload_param.device 'nvme'); use the bf16 checkpoint with --quantize, or "
                        "offload_param to 'cpu'")
    config = load_llama_config(model_dir)
    zero3 = ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3
    with _zero_init(ds_config, zero3), _skip_init():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation,
                                                 trust_remote_code=False)
    # transformers ties lm_head to the embeddings inside its weight init, which _skip_init skips
    model.tie_weights()
    if not zero3:
        model.to(dtype)
    # a pre-quantized checkpoint is always streamed: its FP8 bytes go straight into the FP8 storage
    streaming = (zero3 and loader == "stream" and not nvme) or prequantized is not None or init == "random"
    if zero3 and loader == "stream" and nvme:
        log.info("offload_param to NVMe: loading through ZeRO-3 gathers instead of streaming into partitions")

    make = None
    if quantize:
        from llama_ft.fp8 import FP8LoRALinear

        def make(lin, spec):
            if streaming:  # storage only: the loader quantizes into the partitions
                return FP8LoRALinear.empty(lin.in_features, lin.out_features, spec, dtype, fp8_compute)
            return FP8LoRALinear.from_linear(lin, spec, fp8_compute)

    if offload_ratio is not None and offload_param not in (None, "none"):
        log.info("offload_param to %s keeps every partition off the GPU: --offload_ratio has no further effect",
                 offload_param)
        offload_ratio = None
    if offload_ratio is not None and not zero3:
        log.info("--offload_ratio: no effect without ZeRO-3 partitions (the model is not partitioned)")
        offload_ratio = None
    offload = {}

    t0 = time.time()
    if streaming:
        with _zero_init(ds_config, zero3):
            wrapped = inject_lora(model, spec, make)
        if offload_ratio is not None:  # before loading: the bytes go straight to host memory
            offload = offload_frozen_partitions(model, offload_ratio)
        if init == "random":
            report = fill_random_partitions(model)
        else:
            report = stream_checkpoint_into_partitions(model, ckpt, prequantized is not None)
    else:
        nbytes = load_checkpoint_weights(model, ckpt)
        with _zero_init(ds_config, zero3):
            wrapped = inject_lora(model, spec, make)
        if offload_ratio is not None:
            offload = offload_frozen_partitions(model, offload_ratio)
        report = LoadReport(rank=dist.get_rank() if dist.is_initialized() else 0,
                            world_size=dist.get_world_size() if dist.is_initialized() else 1,
                            checkpoint_bytes=ckpt.total_bytes(), bytes_read=nbytes, seconds=time.time() - t0,
                            peak_rss_bytes=peak_rss_bytes(), extra={"loader": "hf"})
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
    scale `std`. An FP8 scale partition starts at byte rank * partition_size of the flat fp32 bytes, so
    the bytes of the repeated scale are laid out from that offset. LoRA tensors keep their own init.
    """
    from llama_ft.model.lora import LoRALinear

    t0 = time.time()
    rank = dist.get_rank() if dist.is_initialized() else 0
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    scale_names = {f"{path}.weight_scale" for path, m in model.named_modules() if isinstance(m, LoRALinear)}
    scale_pattern = torch.tensor([std], dtype=torch.float32).view(torch.uint8)
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        t = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
        n = t.numel()
        if name in scale_names:
            start = rank * n if hasattr(p, "ds_tensor") else 0
            values = scale_pattern[(start + torch.arange(n)) % 4]
        elif t.dtype == torch.uint8:
            values = torch.randn(n, generator=g).to(torch.float8_e4m3fn).view(torch.uint8)
        elif name.endswith("norm.weight"):
            values = torch.ones(n)
        else:
            values = torch.randn(n, generator=g) * std
        t.data.view(-1).copy_(values.to(t.dtype))
    return LoadReport(rank=rank, world_size=dist.get_world_size() if dist.is_initialized() else 1, checkpoint_bytes=0,
                      bytes_read=0, seconds=time.time() - t0, peak_rss_bytes=peak_rss_bytes(),
                      extra={"loader": "random init"})


def partition_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of parameter storage this rank holds, by role: frozen linear weights (incl. FP8
    scales), other frozen weights, and LoRA. Under ZeRO-3 these are the rank's partitions."""
    from llama_ft.model.lora import LoRALinear

    linear_ids = {id(p) for m in model.modules() if isinstance(m, LoRALinear)
                  for n, p in m.named_parameters(recurse=False) if not n.startswith("lora_")}
    out = {"frozen_linear": 0, "frozen_other": 0, "lora": 0}
    for _, p in model.named_parameters():
        t = p.ds_tensor if hasattr(p, "ds_tensor") else p
        n = t.numel() * t.element_size()
        key = "lora" if p.requires_grad else "frozen_linear" if id(p) in linear_ids else "frozen_other"
        out[key] += n
    return out
