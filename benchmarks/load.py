"""Loading a Llama checkpoint into ZeRO-3 partitions: llama-ft's streaming loader vs Hugging Face.

    python benchmarks/load.py                      # Llama-3.2-1B shape (1.24B params, 2.5 GB bf16), 2 ranks
    python benchmarks/load.py --shape tiny --json out.json    # seconds-long smoke run

Writes a random bf16 checkpoint of a Llama shape to --dir (once; reused when present), then
launches the same 2-rank job (torchrun, DeepSpeed's CPU or CUDA accelerator) once per loader:

    stream  llama-ft `build_lora_model(loader="stream")`: every rank reads only its own
            partition bytes straight into `ds_tensor` (counted by the loader's reader)
    fp8     the same with --quantize: FP8 layers quantized on load (not a default run: --loaders fp8)
    hf      transformers `from_pretrained` under ZeRO-3 (`HfDeepSpeedConfig`, zero.Init):
            bytes counted as what the ranks pull out of safetensors (`get_tensor` / slices)

Per rank: wall time of the load (barrier to barrier), bytes read, peak RSS (getrusage), and
the partition bytes the rank holds. Goal (DESIGN.md): total bytes read <= 1.05x the
checkpoint, peak RSS per rank <= its partition + 2 GiB, and faster than the HF path.
The page cache is warm for both loaders after the checkpoint is written (no root needed to
drop it): the figures compare what each process reads and holds, not disk speed.
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
}
SHARD_BYTES = 500 * 2**20
DS_CONFIG = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
             "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def write_checkpoint(out: Path, shape: str) -> int:
    """Random bf16 Llama checkpoint in ~500 MB shards + index + config. Returns its parameter count."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, rope_theta=500000.0, dtype="bfloat16")
    with torch.device("meta"):
        names = {n: tuple(p.shape) for n, p in LlamaForCausalLM(config).named_parameters()}
    groups: list[list[str]] = [[]]
    size = 0
    for n, s in names.items():
        nbytes = 2 * int(torch.Size(s).numel())
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(n)
        size += nbytes
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, group in enumerate(tqdm(groups, desc="writing checkpoint", unit="shard")):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for n in group:
            t = torch.ones(names[n]) if n.endswith("norm.weight") else torch.randn(names[n], generator=g) * 0.02
            tensors[n] = t.to(torch.bfloat16)
            weight_map[n] = shard
            total += 2 * t.numel()
        save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=2))
    config.save_pretrained(tmp)
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
    if args.loader in ("stream", "fp8"):
        from llama_ft.lora import LoraSpec
        from llama_ft.model.build import build_lora_model

        model, report = build_lora_model(args.model, LoraSpec(16, 32), DS_CONFIG, torch.bfloat16, loader="stream",
                                         quantize=args.loader == "fp8")
        counter[0] = report.bytes_read
        build = getattr(report, "build", {})  # the build's own account (absent before the meta-device build)
    else:
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        _count_safetensors_reads(counter)
        keep = HfDeepSpeedConfig(DS_CONFIG)  # noqa: F841 - from_pretrained partitions under zero.Init
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    dist.barrier()
    seconds = time.perf_counter() - t0
    held = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters() if hasattr(p, "ds_tensor"))
    row = {"loader": args.loader, "rank": rank, "world_size": world, "seconds": seconds, "bytes_read": counter[0],
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "partition_bytes": held,
           "build": build}
    Path(args.out).with_suffix(f".rank{rank}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_loader(loader: str, model: Path, nproc: int, out: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc)))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_free_port()), str(Path(__file__).resolve()), "--worker", "--loader", loader, "--model", str(model),
           "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"load.py: the {loader} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(nproc)]


def table(rows: list[dict], ckpt_bytes: int) -> str:
    gib = 2**30
    lines = ["| loader | rank | load s | read GiB | read / checkpoint | peak RSS GiB | partition GiB | "
             "RSS - partition GiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['loader']} | {r['rank']} | {r['seconds']:.1f} | {r['bytes_read'] / gib:.2f} | "
                     f"{r['bytes_read'] / ckpt_bytes:.2f}x | {r['peak_rss_bytes'] / gib:.2f} | "
                     f"{r['partition_bytes'] / gib:.2f} | {(r['peak_rss_bytes'] - r['partition_bytes']) / gib:.2f} |")
    for loader in dict.fromkeys(r["loader"] for r in rows):
        mine = [r for r in rows if r["loader"] == loader]
        total = sum(r["bytes_read"] for r in mine)
        lines.append(f"| {loader} | all | {max(r['seconds'] for r in mine):.1f} | {total / gib:.2f} | "
                     f"{total / ckpt_bytes:.2f}x | {max(r['peak_rss_bytes'] for r in mine) / gib:.2f} (max) | "
                     f"{sum(r['partition_bytes'] for r in mine) / gib:.2f} | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/llama-ft-loadbench"), help="where the checkpoint goes")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--loaders", nargs="+", default=["stream", "hf"], choices=["stream", "fp8", "hf"])
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--loader", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    model = args.dir / f"llama-{args.shape}"
    if not (model / "model.safetensors.index.json").exists():
        n = write_checkpoint(model, args.shape)
        print(f"wrote {n / 1e9:.2f}B-parameter checkpoint to {model}", file=sys.stderr)
    from llama_ft.shards import open_checkpoint

    ckpt_bytes = open_checkpoint(model).total_bytes()
    rows = []
    for loader in args.loaders:
        rows += run_loader(loader, model, args.nproc, args.dir / f"result-{args.shape}-{loader}")
    print(f"checkpoint {ckpt_bytes / 2**30:.2f} GiB ({args.shape}), {args.nproc} ranks\n")
    print(table(rows, ckpt_bytes))
    if args.json:
        args.json.write_text(json.dumps({"shape": args.shape, "checkpoint_bytes": ckpt_bytes, "rows": rows}, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
