"""Run under 2 ranks (torchrun): compare our streaming loader's partitions with Hugging Face
`from_pretrained` under ZeRO-3 (bf16), our FP8 quantizer, and bitsandbytes' NF4 (with --nf4: the 4-bit
partitions against bitsandbytes' quantize_4bit of the same weights, and those of a bnb-4bit checkpoint that
transformers wrote against bitsandbytes' own reading of its statistics), and report bytes read. Writes a JSON
verdict."""

from __future__ import annotations

import argparse
import contextlib
import json

import deepspeed
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from llama_ft.fp8 import quantize_fp8_reference, scales_to_bytes
from llama_ft.fp8.module import FP8LoRALinear
from llama_ft.lora import LoraSpec
from llama_ft.model.build import build_lora_model
from llama_ft.model.meter import BuildMeter
from llama_ft.nf4.module import NF4LoRALinear
from llama_ft.ops import prepare_ops

DS = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


class AllocationLog(TorchDispatchMode):
    """Every non-meta tensor an aten op creates during the build, as (phase, dtype, numel); the phase
    index advances each time the build closes a phase (BuildMeter.phase: skeleton, partitions, load)."""

    def __init__(self):
        super().__init__()
        self.phase = 0
        self.events: list[tuple[int, torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and not t.is_meta}
        for t in tree_flatten(out)[0]:  # new storage only: a view of an input allocates nothing
            if isinstance(t, torch.Tensor) and not t.is_meta and t.untyped_storage().data_ptr() not in inputs:
                self.events.append((self.phase, t.dtype, t.untyped_storage().nbytes() // t.element_size()))
        return out


@contextlib.contextmanager
def logging_allocations():
    log = AllocationLog()
    original = BuildMeter.phase

    def phase(self, name):
        original(self, name)
        log.phase += 1

    BuildMeter.phase = phase
    try:
        with log:
            yield log
    finally:
        BuildMeter.phase = original


def gathered(p: torch.nn.Parameter) -> torch.Tensor:
    with deepspeed.zero.GatheredParameters([p]):
        return p.detach().clone().cpu()


def bnb_nf4(w: torch.Tensor, compressed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' NF4 of `w`: (code bytes (numel/2,), fp32 absmax per 64); `compressed`: the absmax as
    bitsandbytes reads it back from double quantization (what transformers' bnb_4bit_use_double_quant stores)."""
    import bitsandbytes.functional as bnbf

    q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=compressed,
                                  quant_storage=torch.uint8)
    absmax = state.absmax
    if compressed:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return q.reshape(-1), absmax.float()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--prequantized", help="the same model written by llama-ft quantize")
    ap.add_argument("--nf4", action="store_true", help="also the 4-bit builds (needs bitsandbytes)")
    ap.add_argument("--bnb", help="the same model as a bnb-4bit checkpoint (transformers + bitsandbytes wrote it)")
    args, _ = ap.parse_known_args()
    prepare_ops(DS, on_gpu=torch.cuda.is_available())  # one compile at a time; stale build locks cleared
    deepspeed.init_distributed()
    rank = dist.get_rank()
    keep = HfDeepSpeedConfig(DS)  # makes from_pretrained partition under ZeRO-3
    ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    del keep  # HF's global ZeRO-3 switch is for the reference only; our builder does not use it
    ref_params = dict(ref.named_parameters())
    verdict: dict = {"world_size": dist.get_world_size()}
    spec = LoraSpec(4, 8)
    modes = ["bf16", "bf16-hf", "fp8", "fp8-hf"] + (["prequantized"] if args.prequantized else []) + \
        (["nf4", "nf4-hf"] if args.nf4 else []) + (["bnb"] if args.bnb else [])
    for mode in modes:
        src = {"prequantized": args.prequantized, "bnb": args.bnb}.get(mode, args.model)
        with logging_allocations() as allocs:
            model, report = build_lora_model(src, spec, DS, torch.bfloat16, quantize=mode.startswith(("fp8", "nf4")),
                                             bits=4 if mode.startswith("nf4") else 8,
                                             loader="hf" if mode.endswith("-hf") else "stream")
        # floating tensors created before the load phase: the partitions themselves (and small scratch)
        before_load = [(d, n) for ph, d, n in allocs.events if ph < 2 and d.is_floating_point]
        # what a build at the final format must allocate in floating point: the floating partitions, and
        # LoRA's A and B whole (they are initialised whole, broadcast, then partitioned)
        float_partitions = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters()
                               if p.dtype.is_floating_point and not p.requires_grad)
        lora_whole = sum(p.ds_numel * p.element_size() for p in model.parameters() if p.requires_grad)
        fp8_partition_numels = sorted({m.weight.ds_tensor.numel() for m in model.modules()
                                       if isinstance(m, (FP8LoRALinear, NF4LoRALinear))})
        mismatched = []
        checked = 0
        for name, p in model.named_parameters():
            if p.requires_grad or name.endswith(("weight_scale", "weight_absmax")):
                continue
            want = gathered(ref_params[name])
            mod = model.get_submodule(name.rsplit(".", 1)[0])
            if isinstance(mod, FP8LoRALinear):
                q, s = quantize_fp8_reference(want)
                ok = torch.equal(gathered(p), q) and torch.equal(gathered(mod.weight_scale), scales_to_bytes(s))
            elif isinstance(mod, NF4LoRALinear):
                packed, absmax = bnb_nf4(want, compressed=mode == "bnb")
                ok = torch.equal(gathered(p), packed) and torch.equal(gathered(mod.weight_absmax).view(torch.float32),
                                                                      absmax)
            else:
                ok = torch.equal(gathered(p), want)
            checked += 1
            if not ok:
                mismatched.append(name)
        totals = torch.tensor([report.bytes_read], dtype=torch.float64)
        dist.all_reduce(totals)
        verdict[mode] = {"checked": checked, "mismatched": mismatched, "bytes_read_rank": report.bytes_read,
                         "bytes_read_total": int(totals.item()), "checkpoint_bytes": report.checkpoint_bytes,
                         "quantized_layers": report.quantized_layers, "build": report.build,
                         "float_bytes_before_load": sum(n * d.itemsize for d, n in before_load),
                         "float_partition_bytes": float_partitions, "lora_bytes": lora_whole,
                         "largest_float_before_load": max((n for _, n in before_load), default=0),
                         "smallest_fp8_partition": fp8_partition_numels[0] if fp8_partition_numels else None,
                         "partition_bytes": report.partition_bytes_host + report.partition_bytes_gpu}
    gathered_verdicts = [None] * dist.get_world_size()
    dist.all_gather_object(gathered_verdicts, verdict)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(gathered_verdicts, f, indent=2)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
