"""The plan as text: a breakdown per GPU (or CPU rank) and per host, the offload and PCIe lines, the verdict."""

from __future__ import annotations

from typing import Any

from llama_ft.plan.planner import CPU_HEAP_RETENTION, FRAGMENTATION, GiB

GPU_LABELS = {
    "base_partitions_bytes": "base weight partitions (frozen)",
    "persistent_bytes": "small parameters kept whole (norms, scales)",
    "lora_bytes": "LoRA partitions",
    "optimizer_bytes": "optimizer: fp32 master, Adam m/v, gradients",
    "comm_bytes": "gradient reduce bucket",
    "activations_bytes": "activations",
    "gathered_bytes": "ZeRO-3 gathered parameters",
    "loss_bytes": "LM head gathered + chunked loss",
    "optimizer_step_bytes": "optimizer step temporaries",
    "fragmentation_bytes": f"fragmentation {FRAGMENTATION:.0%} (CPU: malloc retention {CPU_HEAP_RETENTION:.0%})",
    "cuda_context_bytes": "CUDA context, cuBLAS, NCCL",
    "process_baseline_bytes": "process baseline (imports, DeepSpeed engine)",
}
HOST_LABELS = {
    "base_partitions_bytes": "offloaded base partitions (pinned)",
    "lora_bytes": "LoRA partitions (offload_param)",
    "optimizer_bytes": "optimizer states (offload_optimizer)",
    "activations_bytes": "activation checkpoints (--activation_offload, pinned)",
    "process_baseline_bytes": "rank processes (CUDA libraries, imports)",
}
CPU_HOST_LABELS = {"ranks_bytes": "the CPU ranks, each as above"}
MOMENTS = {"loss": "at the loss, end of forward", "backward": "in the last layer's backward",
           "optimizer step": "at the optimizer step", "reference pass": "in the DPO reference pass"}
HINTS = {
    ("per_gpu", "base_partitions_bytes"): "more GPUs or --offload --offload_ratio",  # + base_hint: a smaller format
    ("per_gpu", "activations_bytes"): "--gradient_checkpointing, --sequence_parallel_size, --tiled_mlp, "
                                      "--activation_offload, a smaller --per_device_train_batch_size or --max_seq_len",
    ("per_host", "activations_bytes"): "no --activation_offload, more host memory or a larger --sequence_parallel_size",
    ("per_gpu", "loss_bytes"): "a smaller --loss_chunk_size (the whole LM head is gathered regardless)",
    ("per_gpu", "optimizer_bytes"): "a smaller --lora_r, fewer --lora_target_modules, more GPUs, or offload_optimizer "
                                    "in the DeepSpeed config",
    ("per_gpu", "lora_bytes"): "a smaller --lora_r or more GPUs",
    ("per_gpu", "gathered_bytes"): "smaller stage3_prefetch_bucket_size, stage3_max_live_parameters or "
                                   "stage3_max_reuse_distance",
    ("per_gpu", "comm_bytes"): "a smaller reduce_bucket_size",
    ("per_gpu", "cuda_context_bytes"): "a GPU with more memory",
    ("per_gpu", "process_baseline_bytes"): "more host memory",
    ("per_host", "base_partitions_bytes"): "a smaller --offload_ratio, more host memory or more nodes",
    ("per_host", "optimizer_bytes"): "more nodes or no offload_optimizer",
    ("per_host", "process_baseline_bytes"): "fewer ranks per host",
}


BASE_FORMATS = {4: "NF4", 8: "FP8"}


def base_hint(bits: int) -> str:
    """What a smaller format of the frozen target weights saves, from `bits` (inputs.training.bits: 16 or 32
    unquantized, 8 FP8, 4 NF4): FP8 is 1 + 4/128^2 bytes a weight, NF4 0.5625 (llama_ft/plan/shape.py). "" at 4."""
    if bits == 4:
        return ""
    if bits == 8:
        return "--bits 4 (NF4: 0.56x the FP8 bytes of the LoRA-targeted weights)"
    return (f"--bits 4 (NF4: {0.5625 * 8 / bits:.2f}x these bytes of the LoRA-targeted weights) or --quantize "
            f"(FP8: {8 / bits:.2f}x)")


def gib(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / GiB:.2f}"


def _table(title: str, terms: dict[str, int], labels: dict[str, str], capacity: int | None,
           ok: bool | None) -> list[str]:
    lines = [f"{title:<58}{'GiB':>9}"]
    for key, label in labels.items():
        if key in terms:
            lines.append(f"  {label:<56}{gib(terms[key]):>9}")
    verdict = "not checked" if ok is None else "fits" if ok else "DOES NOT FIT"
    of = f" of {gib(capacity)}" if capacity is not None else ""
    lines.append(f"  {'total':<56}{gib(terms['total_bytes']):>9}{of}  {verdict}")
    return lines


def count(n: int) -> str:
    """1.24B, 828.0M, 12.3K."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.{2 if unit == 'B' else 1}f}{unit}"
    return str(n)


def header(r: dict[str, Any]) -> list[str]:
    i = r["inputs"]
    mo, t, z, m = i["model"], i["training"], i["deepspeed"], i["machine"]
    bits = t.get("bits", 8 if t["quantize"] else 16)
    base = f"{BASE_FORMATS.get(bits, t['dtype'])} base weights"
    lora = f"LoRA r={t['lora_r']} on {','.join(n.removesuffix('_proj') for n in t['lora_target_modules'])}"
    unit = "GPUs" if m["device"] == "cuda" else "CPU ranks"
    mem = f"GPU {gib(m['gpu_memory_bytes'])} GiB, " if m["device"] == "cuda" else ""
    host = "not given" if m["host_memory_bytes"] is None else f"{gib(m['host_memory_bytes'])} GiB"
    return [f"{mo['name'] or 'model'}: {count(mo['parameters'])} parameters, {base}; {lora} "
            f"({count(mo['lora_parameters'])} trainable, {t['dtype']})",
            f"  {m['nodes']} node(s) x {m['gpus_per_node']} {unit} = {m['world_size']} rank(s); {mem}host {host}",
            f"  micro-batch {micro_batch_text(t)} x {t['seq_len']} tokens ({t['seq_len_from']}), "
            f"{t['attn_implementation']}, gradient checkpointing {'on' if t['gradient_checkpointing'] else 'off'}, "
            f"loss chunk {t['loss_chunk_size']}, accumulation {t['gradient_accumulation_steps']}"
            + (f"; sequence parallel {t['sequence_parallel_size']} ({t['tokens_per_rank']} tokens per rank)"
               if t.get("sequence_parallel_size", 1) > 1 else "")
            + (f"; tiled MLP ({t['tiled_mlp_slices']} slices)" if t.get("tiled_mlp_slices", 1) > 1 else "")
            + ("; activation checkpoints in host memory" if t.get("activation_offload") else ""),
            f"  ZeRO-3 ({z.get('config', 'config')}): reduce bucket {count(z['reduce_bucket_size'])}, prefetch "
            f"{count(z['prefetch_bucket_size'])}, persistence <= {count(z['param_persistence_threshold'])}, max live "
            f"{count(z['max_live_parameters'])}, reuse distance {count(z['max_reuse_distance'])} elements; "
            f"offload_param {z['offload_param']}, offload_optimizer {z['offload_optimizer']}"] + fp8_lines(r)


def fp8_lines(r: dict[str, Any]) -> list[str]:
    """--quantize: the FP8 mode the GPU runs (llama_ft/gpus.py), or the rule when no --gpu was given."""
    f = r.get("fp8")
    if not f:
        return []
    on = f"{f['gpu']}, {f['arch']}" if f.get("gpu") else "GPU not given (--gpu)"
    return [f"  FP8 ({on}): {f['mode']}"]


def micro_batch_text(t: dict[str, Any]) -> str:
    """`4`, or for DPO `4 pairs = 8 rows` (packed: `--per_device_train_batch_size` counts rows of whole pairs)."""
    if t.get("objective") != "dpo" or t["packing"]:
        return f"{t['per_device_train_batch_size']}"
    return f"{t['per_device_train_batch_size']} pairs = {t['rows_per_micro_batch']} rows"


def reference_line(r: dict[str, Any]) -> str:
    """DPO: the reference pass beside the peak, each as the transient bytes of its moment."""
    ref = sum(r["moments"]["reference pass"].values())
    peak = sum(r["moments"][r["peak_at"]].values())
    at = "the peak" if r["peak_at"] == "reference pass" else \
        f"against {gib(peak)} GiB at the peak, {MOMENTS[r['peak_at']]}"
    terms = ", ".join(f"{k} {gib(v)}" for k, v in r["moments"]["reference pass"].items())
    rp = r["inputs"]["training"]["reference_pass"]
    rows = f"{rp['rows']} rows x {rp['seq_len']} tokens"
    when = (f"once before training (--precompute_ref_logprobs), on padded batches of {rows}" if rp["before_training"]
            else f"first in each micro-batch, on the same {rows}")
    return (f"DPO reference pass (adapters off, no grad, {when}): {gib(ref)} GiB of transients at its largest "
            f"({terms}), {at}; it keeps nothing for backward and adds no weights")


def report(r: dict[str, Any], brief: bool = False) -> str:
    """The plan as text (`brief`: the verdict line only)."""
    if brief:
        return summary_line(r)
    m = r["inputs"]["machine"]
    cpu = m["device"] == "cpu"
    gpu_title = f"per {'CPU rank (host memory)' if cpu else 'GPU'}, peak {MOMENTS[r['peak_at']]}"
    lines = header(r) + [""]
    lines += _table(gpu_title, r["per_gpu"], GPU_LABELS, None if cpu else m["gpu_memory_bytes"],
                    None if cpu else r["gpu_fits"])
    if "reference pass" in r["moments"]:
        lines.append(reference_line(r))
    ranks = m["gpus_per_node"]
    lines += [""] + _table(f"per host ({ranks} rank{'s' if ranks != 1 else ''})", r["per_host"],
                           CPU_HOST_LABELS if cpu else HOST_LABELS, m["host_memory_bytes"], r["host_fits"])
    if cpu:
        lines += ["", "offload: CPU ranks hold every partition in host memory; --offload_ratio moves nothing"]
    else:
        lines += ["", offload_line(r), pcie_line(r)]
    lines.append(summary_line(r))
    return "\n".join(lines)


def offload_line(r: dict[str, Any]) -> str:
    return (f"offload: --offload_ratio {r['offload_ratio']:.2f} evaluated ({gib(r['offloaded_bytes_per_gpu'])} GiB of "
            f"base partitions per GPU in host memory); smallest ratio that fits: {ratio_text(r['min_offload_ratio'])}")


def pcie_line(r: dict[str, Any]) -> str:
    pcie = r["inputs"]["machine"]["pcie_gbps"]
    return (f"PCIe: {gib(r['h2d_bytes_per_step'])} GiB host-to-device per GPU per optimizer step "
            f"({gib(r['h2d_bytes_per_micro_batch'])} per micro-batch) -> a step takes at least "
            f"{r['step_time_lower_bound_s']:.2f} s at {pcie:g} GB/s per GPU")


def ratio_text(ratio: float | None) -> str:
    return "none" if ratio is None else f"{ratio:.2f}"


def summary_line(r: dict[str, Any]) -> str:
    m = r["inputs"]["machine"]
    side = "per_host" if m["device"] == "cpu" else "per_gpu"
    cap = m["host_memory_bytes"] if side == "per_host" else m["gpu_memory_bytes"]
    where = "per host" if side == "per_host" else "per GPU"
    state = "fits" if r["fits"] else "does not fit"
    return (f"verdict: {state}: {gib(r[side]['total_bytes'])} of {gib(cap)} GiB {where} at --offload_ratio "
            f"{r['offload_ratio']:.2f} (largest term: {r['dominant_term'].removesuffix('_bytes')}); smallest "
            f"--offload_ratio that fits: {ratio_text(r['min_offload_ratio'])}")


def not_fit_line(r: dict[str, Any]) -> str:
    """One line for a plan that does not fit: at this ratio (and which ratio would), or at none."""
    bad = r.get("cannot_fit")
    if bad is None:
        side = "per_host" if r["gpu_fits"] is not False else "per_gpu"
        m = r["inputs"]["machine"]
        cap = m["host_memory_bytes"] if side == "per_host" else m["gpu_memory_bytes"]
        term = r["dominant_term"]
        where = "per host" if side == "per_host" else "per GPU"
        smaller = base_hint(r["inputs"]["training"].get("bits", 16)) if term == "base_partitions_bytes" else ""
        return (f"does not fit: {gib(r[side]['total_bytes'])} GiB {where} of {gib(cap)} at "
                f"--offload_ratio {r['offload_ratio']:.2f} (largest term: {term.removesuffix('_bytes')} "
                f"{gib(r[side][term])} GiB); --offload --offload_ratio {ratio_text(r['min_offload_ratio'])} fits"
                + (f"; with less offload or none: {smaller}" if smaller and side == "per_gpu" else ""))
    hint = HINTS.get((bad["where"], bad["term"])) or HINTS.get(("per_gpu", bad["term"]), "more memory")
    training = r.get("inputs", {}).get("training", {})
    if bad["term"] == "base_partitions_bytes" and base_hint(training.get("bits", 16)):
        hint = f"{base_hint(training.get('bits', 16))}, {hint}"  # the format first: it costs no GPUs and no PCIe
    if bad["term"] == "activations_bytes" and str(training.get("seq_len_from", "")).startswith("chat data without"):
        # the plan had to assume rows as long as the model allows (a Llama 3.1: 131,072 tokens)
        hint = (f"--max_seq_len N (without it, chat rows are planned at the model's {training['seq_len']:,} "
                f"positions; llama-ft data shows the real lengths), or {hint}")
    where = "per host" if bad["where"] == "per_host" else "per GPU"
    at = (f"at any --offload_ratio: at {bad['offload_ratio']:.2f}," if bad["offload_applies"] else
          "(offload moves nothing here: CPU ranks, or offload_param keeps every partition on the host already):")
    return (f"error: does not fit {at} {gib(bad['total_bytes'])} GiB {where} of {gib(bad['capacity_bytes'])}; the "
            f"largest term is {bad['term'].removesuffix('_bytes')} ({gib(bad['term_bytes'])} GiB): try {hint}")
