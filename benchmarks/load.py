"""Loading a Llama checkpoint into ZeRO-3 partitions: llama-ft's streaming loader vs Hugging Face.

    python benchmarks/load.py                      # Llama-3.2-1B shape (1.24B params, 2.5 GB bf16), 2 ranks
    python benchmarks/load.py --shape tiny --json out.json    # seconds-long smoke run
    python benchmarks/load.py --loaders stream fp8 nf4 --json bits.json   # the 1B build at bits 16 / 8 / 4
    python benchmarks/load.py --shape 70b --layers 16 --fp8 --nproc 1 --loaders stream --offload-ratio 0.5 \
        --drop-caches --json load-70b.json    # 16 layers of the 70B shape, FP8, one GPU, half the base offloaded

Writes a random checkpoint of a Llama shape to --dir (once; reused when present): bf16, or with --fp8
pre-quantized in llama-ft's FP8 layout (llama_ft/fp8/checkpoint.py: e4m3 bytes of the seven LoRA-targeted
linears + float32 128x128 block scales, embeddings, norms and LM head in bf16), drawn and quantized on the GPU
when there is one. --layers N keeps the layer shape and cuts the depth (a 70B-shape FP8 checkpoint is ~70 GB:
a fraction of its layers shows the per-layer streaming rate on a machine with less disk or time). Then it
launches the same job (torchrun, DeepSpeed's CPU or CUDA accelerator) once per loader:


    stream  llama-ft `build_lora_model(loader="stream")`: every rank reads only its own
            partition bytes straight into `ds_tensor` (counted by the loader's reader)
    fp8     the same with --quantize: FP8 layers quantized on load (not a default run: --loaders fp8)
    nf4     the same with --quantize --bits 4: NF4 layers (QLoRA's 4-bit format) quantized on load
            (not a default run: --loaders stream fp8 nf4 compares the three formats)
    hf      transformers `from_pretrained` under ZeRO-3 (`HfDeepSpeedConfig`, zero.Init):
            bytes counted as what the ranks pull out of safetensors (`get_tensor` / slices)

Per rank: wall time of the load (barrier to barrier), bytes read, peak RSS (getrusage), the
partition bytes the rank holds (all of them, and those of the frozen LoRA-targeted linears alone: bf16 W, FP8
bytes + block scales, or NF4 codes + absmax; on the GPU and, with --offload-ratio R, in pinned host memory), and on
a GPU torch.cuda.max_memory_allocated. Goal (DESIGN.md): total bytes read <= 1.05x the
checkpoint, peak RSS per rank <= its partition + 2 GiB, and faster than the HF path.
The page cache is warm for both loaders after the checkpoint is written, unless --drop-caches (root:
`sync; echo 1 > /proc/sys/vm/drop_caches` before each loader; the JSON says whether it worked): warm, the
figures compare what each process reads and holds, not disk speed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    # Llama 3.2 1B: hidden 2048, 16 layers, GQA 32/8 heads, tied embeddings, vocab 128256
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=False),
    # Llama 3.1 70B: hidden 8192, 80 layers, GQA 64/8 heads, untied LM head (use --layers to cut the depth)
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
SHARD_BYTES = 500 * 2**20
DS_CONFIG = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
             "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def write_checkpoint(out: Path, shape: str, layers: int | None = None, fp8: bool = False) -> int:
    """Random Llama checkpoint in ~500 MB shards + index + config: bf16, or with `fp8` the seven LoRA-targeted
    linears as e4m3 bytes + block scales (llama-ft's pre-quantized layout). Drawn (and quantized) on the GPU
    when there is one: a CPU generator draws about 1.5e8 values/s, minutes for a 70B layer stack.
    Returns its parameter count."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama_ft.fp8 import quantize_fp8
    from llama_ft.fp8.checkpoint import SCALE_SUFFIX, is_target, quantization_config
    from llama_ft.lora import LLAMA_LINEAR_NAMES

    dims = {**SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})}
    config = LlamaConfig(**dims, max_position_embeddings=8192, rope_theta=500000.0, dtype="bfloat16")
    with torch.device("meta"):
        names = {n: tuple(p.shape) for n, p in LlamaForCausalLM(config).named_parameters()}
    quantized = {n for n in names if fp8 and is_target(n, LLAMA_LINEAR_NAMES)}
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    groups: list[list[str]] = [[]]
    size = 0
    for n, s in names.items():
        nbytes = (1 if n in quantized else 2) * int(torch.Size(s).numel())
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(n)
        size += nbytes
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=device).manual_seed(0)
    weight_map, total = {}, 0
    for i, group in enumerate(tqdm(groups, desc="writing checkpoint", unit="shard")):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for n in group:
            if n.endswith("norm.weight"):
                t = torch.ones(names[n], device=device)
            else:
                t = torch.randn(names[n], generator=g, device=device) * 0.02
            if n in quantized:
                q, scales = quantize_fp8(t.to(torch.bfloat16))
                tensors[n], tensors[n + SCALE_SUFFIX] = q.view(torch.float8_e4m3fn).cpu(), scales.cpu()
                weight_map[n + SCALE_SUFFIX] = shard
            else:
                tensors[n] = t.to(torch.bfloat16).cpu()
            weight_map[n] = shard
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=2))
    config.save_pretrained(tmp)
    if fp8:  # the entry `llama-ft quantize` writes, computed from the shards just written
        from llama_ft.shards import open_checkpoint

        saved = json.loads((tmp / "config.json").read_text())
        saved["quantization_config"] = quantization_config(open_checkpoint(tmp), LLAMA_LINEAR_NAMES)
        (tmp / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
    os.replace(tmp, out)
    return sum(int(torch.Size(s).numel()) for s in names.values())


class _CountingSlice:
    def __init__(self, sl, counter):
        self._sl, self._counter = sl, counter

    def __getitem__(self, idx):
        t = self._sl[idx]
        self._counter[0] += t.numel() * t.element_size()
        return t

    def __getattr__(self, name):
        return getattr(self._sl, name)


def _count_safetensors_reads(counter: list[int]) -> None:
    """Count the bytes transformers pulls out of safetensors files (it mmaps them: read syscalls
    would miss them). Patches the `safe_open` names transformers' loading modules imported."""
    import safetensors

    real = safetensors.safe_open

    class CountingOpen:
        def __init__(self, *args, **kwargs):
            self._f = real(*args, **kwargs)

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def get_tensor(self, name):
            t = self._f.get_tensor(name)
            counter[0] += t.numel() * t.element_size()
            return t

        def get_slice(self, name):
            return _CountingSlice(self._f.get_slice(name), counter)

        def __getattr__(self, name):
            return getattr(self._f, name)

    import transformers.modeling_utils as mu

    mods = [mu]
    try:
        import transformers.modeling_layers as ml

        mods.append(ml)
    except ImportError:
        pass
    for m in mods:
        if hasattr(m, "safe_open"):
            m.safe_open = CountingOpen


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from llama_ft.ops import prepare_ops

    prepare_ops(DS_CONFIG, on_gpu=torch.cuda.is_available())  # one compile at a time; stale build locks cleared
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    counter = [0]
    dist.barrier()
    t0 = time.perf_counter()
    build = {}
    if args.loader in ("stream", "fp8", "nf4"):
        from llama_ft.lora import LoraSpec
        from llama_ft.model.build import build_lora_model

        model, report = build_lora_model(args.model, LoraSpec(16, 32), DS_CONFIG, torch.bfloat16, loader="stream",
                                         quantize=args.loader in ("fp8", "nf4"), bits=4 if args.loader == "nf4" else 8,
                                         offload_ratio=args.offload_ratio)
        counter[0] = report.bytes_read
        build = getattr(report, "build", {})  # the build's own account (absent before the meta-device build)
        where = {"partition_bytes_gpu": report.partition_bytes_gpu, "partition_bytes_host": report.partition_bytes_host,
                 "offload": report.extra.get("offload")}
    else:
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        _count_safetensors_reads(counter)
        keep = HfDeepSpeedConfig(DS_CONFIG)  # noqa: F841 - from_pretrained partitions under zero.Init
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
        where = {}
    dist.barrier()
    seconds = time.perf_counter() - t0
    held = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters() if hasattr(p, "ds_tensor"))
    held_linear = frozen_linear_bytes(model)
    row = {"loader": args.loader, "rank": rank, "world_size": world, "seconds": seconds, "bytes_read": counter[0],
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "partition_bytes": held,
           "frozen_linear_partition_bytes": held_linear, "build": build, **where}
    if torch.cuda.is_available():
        row["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    Path(args.out).with_suffix(f".rank{rank}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


def frozen_linear_bytes(model) -> int:
    """This rank's partition bytes of the frozen storage of the LoRA-targeted linears (q, k, v, o, gate, up,
    down): the bf16 `weight`, or a quantized layer's storage (`weight` bytes and its scales / absmax); LoRA's
    A and B, embeddings, norms and the LM head are not counted."""
    from llama_ft.lora import LLAMA_LINEAR_NAMES

    return sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for name, p in model.named_parameters()
               if hasattr(p, "ds_tensor") and not p.requires_grad and name.split(".")[-2] in LLAMA_LINEAR_NAMES)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drop_page_cache() -> str:
    """Empty the page cache so the load reads the disk: 'dropped', or 'warm (why not)'."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return "dropped"
    except OSError as e:
        return f"warm (drop_caches: {e.strerror or e})"


def run_loader(loader: str, model: Path, nproc: int, out: Path, offload_ratio: float | None) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc)))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_free_port()), str(Path(__file__).resolve()), "--worker", "--loader", loader, "--model", str(model),
           "--out", str(out), *(["--offload-ratio", str(offload_ratio)] if offload_ratio is not None else [])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"load.py: the {loader} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(nproc)]


def table(rows: list[dict], ckpt_bytes: int) -> str:
    gib = 2**30
    lines = ["| loader | rank | load s | read GiB | read / checkpoint | peak RSS GiB | partition GiB | "
             "RSS - partition GiB | frozen linears GiB | vs stream |", "|---|---|---|---|---|---|---|---|---|---|"]
    bf16 = {r["rank"]: r["frozen_linear_partition_bytes"] for r in rows if r["loader"] == "stream"}
    for r in rows:
        lin = r["frozen_linear_partition_bytes"]
        ratio = f"{lin / bf16[r['rank']]:.3f}x" if bf16.get(r["rank"]) else ""
        lines.append(f"| {r['loader']} | {r['rank']} | {r['seconds']:.1f} | {r['bytes_read'] / gib:.2f} | "
                     f"{r['bytes_read'] / ckpt_bytes:.2f}x | {r['peak_rss_bytes'] / gib:.2f} | "
                     f"{r['partition_bytes'] / gib:.2f} | {(r['peak_rss_bytes'] - r['partition_bytes']) / gib:.2f} | "
                     f"{lin / gib:.3f} | {ratio} |")
    for loader in dict.fromkeys(r["loader"] for r in rows):
        mine = [r for r in rows if r["loader"] == loader]
        total = sum(r["bytes_read"] for r in mine)
        lines.append(f"| {loader} | all | {max(r['seconds'] for r in mine):.1f} | {total / gib:.2f} | "
                     f"{total / ckpt_bytes:.2f}x | {max(r['peak_rss_bytes'] for r in mine) / gib:.2f} (max) | "
                     f"{sum(r['partition_bytes'] for r in mine) / gib:.2f} | | "
                     f"{sum(r['frozen_linear_partition_bytes'] for r in mine) / gib:.3f} | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/llama-ft-loadbench"), help="where the checkpoint goes")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--loaders", nargs="+", default=["stream", "hf"], choices=["stream", "fp8", "nf4", "hf"])
    ap.add_argument("--layers", type=int, help="layers of the shape's size (default: the shape's own number)")
    ap.add_argument("--fp8", action="store_true", help="write the checkpoint pre-quantized (llama-ft's FP8 layout)")
    ap.add_argument("--offload-ratio", type=float, help="stream/fp8 loaders: keep this fraction of the frozen base "
                                                        "partitions in (pinned) host memory")
    ap.add_argument("--drop-caches", action="store_true", help="empty the page cache before each loader (root)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--loader", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.layers is not None and args.layers < 1:
        ap.exit(2, f"load.py: error: --layers {args.layers}: expected a number > 0\n")
    if args.offload_ratio is not None and not 0 <= args.offload_ratio <= 1:
        ap.exit(2, f"load.py: error: --offload-ratio {args.offload_ratio}: expected a fraction in [0, 1]\n")
    if args.fp8 and "hf" in args.loaders:
        ap.exit(2, "load.py: error: --fp8 with --loaders hf: transformers does not read llama-ft's FP8 layout; "
                   "use --loaders stream\n")

    model = args.dir / (f"llama-{args.shape}" + (f"-{args.layers}layers" if args.layers else "")
                        + ("-fp8" if args.fp8 else ""))
    write_s = None
    if not (model / "model.safetensors.index.json").exists():
        t0 = time.perf_counter()
        n = write_checkpoint(model, args.shape, args.layers, args.fp8)
        write_s = time.perf_counter() - t0
        print(f"wrote {n / 1e9:.2f}B-parameter checkpoint to {model} in {write_s:.1f} s", file=sys.stderr)
    from llama_ft.shards import open_checkpoint

    ckpt_bytes = open_checkpoint(model).total_bytes()
    rows, page_cache = [], {}
    for loader in args.loaders:
        page_cache[loader] = drop_page_cache() if args.drop_caches else "warm"
        rows += run_loader(loader, model, args.nproc, args.dir / f"result-{model.name}-{loader}", args.offload_ratio)
    print(f"checkpoint {ckpt_bytes / 2**30:.2f} GiB ({model.name}), {args.nproc} ranks, page cache "
          f"{', '.join(f'{k}: {v}' for k, v in page_cache.items())}\n")
    print(table(rows, ckpt_bytes))
    if args.json:
        report = {"shape": args.shape, "layers": args.layers or SHAPES[args.shape]["num_hidden_layers"],
                  "fp8": args.fp8, "offload_ratio": args.offload_ratio, "checkpoint": str(model),
                  "checkpoint_bytes": ckpt_bytes, "write_seconds": write_s, "page_cache": page_cache, "rows": rows}
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
