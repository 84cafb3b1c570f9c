"""`llama-ft plan`: the memory plan of a LoRA run on the command line.

    llama-ft plan 405b --quantize --nodes 1 --gpus_per_node 8 --gpu_memory_gb 79.6
    llama-ft plan 70b --quantize --fp8_compute --gpu h100        (--gpu: memory and the FP8 mode of that GPU)
    llama-ft plan 405b --bits 4 --gpu l40s --offload_ratio auto  (NF4 base weights, as QLoRA)
    llama-ft plan /data/Meta-Llama-3.1-70B --hostfile hostfiles/my-two-nodes --gpu_memory_gb 79.6 --json
    llama-ft plan --hostfile H --gpu_memory_gb 79.6 --brief -- TRAINING FLAGS...   (run-llama.sh)

Training flags keep their training names and defaults (llama_ft/config.py TrainConfig; a test keeps
them equal). They are declared here rather than taken from config.py's parser because importing
config.py imports torch (~2 s), and run-llama.sh runs this before every launch. After `--`, a whole
training command line is accepted: the flags the plan does not use are skipped.

Exit status: 0 fits, 1 does not fit (the numbers and the largest term are printed), 2 bad input,
3 a long-context layout training refuses too (llama_ft/train/sp_layout.py LayoutError: sequence
parallelism the model's heads or the ranks cannot take, ...): run-llama.sh stops before launching on 3,
and only notes a 2, since training may read what the plan cannot.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from llama_ft.config_file import add_config_flag, config_path, config_values
from llama_ft.errors import UserError, user_errors_exit
from llama_ft.flags import OBJECTIVE_HELP, float_or_auto, str2bool
from llama_ft.gpus import GPU_KINDS, arch_of, capability_text, fp8_compute_refusal, fp8_mode, parse_gpu
from llama_ft.hostfile import active_slots, parse_hostfile
from llama_ft.plan.planner import (
    CPU_HEAP_RETENTION,
    CPU_RANK_BASELINE_BYTES,
    CUDA_CONTEXT_BYTES,
    DEFAULT_PCIE_GBPS,
    FRAGMENTATION,
    GiB,
    Machine,
    options_from,
    plan,
)
from llama_ft.plan.report import not_fit_line, report
from llama_ft.plan.shape import ALIASES, LLAMA_LINEAR_NAMES, resolve_model
from llama_ft.plan.zero import zero_settings
from llama_ft.train.sp_layout import LayoutError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DS_CONFIG = "ds_configs/zero3.json"
EXIT_REFUSED_LAYOUT = 3

TRAINING_DEFAULTS: dict[str, Any] = {
    "model_name_or_path": "", "quantize": False, "offload": False, "offload_ratio": None, "lora_r": 64,
    "lora_dropout": 0.05, "lora_target_modules": list(LLAMA_LINEAR_NAMES), "max_seq_len": None,
    "source_max_len": 1024, "target_max_len": 256, "dataset_format": "alpaca", "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 1, "gradient_checkpointing": False, "packing": False, "loss_chunk_size": 1024,
    "bf16": True, "attn_implementation": "sdpa", "deepspeed": DEFAULT_DS_CONFIG, "sequence_parallel_size": 1,
    "tiled_mlp": False, "activation_offload": False, "objective": "sft", "precompute_ref_logprobs": False,
    "fp8_compute": False, "bits": None,
}
"""The training flags the plan reads, with TrainConfig's defaults."""


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes are one `llama-ft plan: error:` line (exit 2), like every other bad input."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(message)


def _ratio(v: str) -> float | str:
    r = float_or_auto(v)
    if r != "auto" and not 0 <= r <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1] or 'auto', got {v!r}")
    return r


def add_training_flags(p: argparse.ArgumentParser) -> None:
    """The training flags the plan reads; absent ones are left out of the namespace (SUPPRESS), so that a
    flag given before `--` overrides one in the training command line after it."""
    g = p.add_argument_group("training flags (as `llama-ft train` names them; its defaults)")
    s = argparse.SUPPRESS
    g.add_argument("--model_name_or_path", default=s, help="the model: same as MODEL")
    for name, helptext in (("quantize", "quantized frozen base weights of the LoRA-targeted linears: FP8 e4m3 with "
                                        "--bits 8, NF4 with --bits 4"),
                           ("fp8_compute", "with --quantize: fp8 tensor cores (compute capability 8.9+); the plan "
                                           "says which FP8 mode --gpu runs"),
                           ("offload", "offload base-weight partitions (ratio 1.0 unless --offload_ratio)"),
                           ("gradient_checkpointing", "recompute each layer in backward"),
                           ("packing", "packed rows of --max_seq_len tokens"), ("bf16", "bf16 training (false: fp32)"),
                           ("tiled_mlp", "MLPs in slices of ~hidden_size tokens"),
                           ("activation_offload", "activation checkpoints in host memory"),
                           ("precompute_ref_logprobs", "DPO: the reference pass runs once before training, on padded "
                                                       "batches of --per_device_train_batch_size pairs, not in each "
                                                       "step")):
        g.add_argument(f"--{name}", type=str2bool, nargs="?", const=True, default=s, metavar="BOOL",
                       help=f"{helptext} (default {TRAINING_DEFAULTS[name]})")
    g.add_argument("--bits", type=int, default=s, metavar="{8,4}",
                   help="bits of the quantized base weights: 8 FP8 e4m3 (1 byte a weight + 128x128 block scales), "
                        "4 NF4 (0.5625 bytes a weight: codes + an fp32 absmax per 64); --bits 4 implies --quantize "
                        "(default: 8, or what a pre-quantized checkpoint holds)")
    g.add_argument("--offload_ratio", type=_ratio, default=s, metavar="R|auto",
                   help="fraction of the frozen base-weight partitions kept in host memory; 'auto': the smallest "
                        "that fits (default: none)")
    for name in ("lora_r", "max_seq_len", "source_max_len", "target_max_len", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "loss_chunk_size", "sequence_parallel_size"):
        g.add_argument(f"--{name}", type=int, default=s, help=f"(default {TRAINING_DEFAULTS[name]})")
    g.add_argument("--lora_dropout", type=float, default=s, help="(default 0.05)")
    g.add_argument("--lora_target_modules", nargs="+", default=s, help="(default: all seven Llama linears)")
    g.add_argument("--dataset_format", default=s, help="chat: --source/--target_max_len do not apply")
    g.add_argument("--attn_implementation", default=s, help="sdpa (default), eager (keeps seq^2 probabilities), "
                                                            "flash_attention_2")
    g.add_argument("--deepspeed", default=s, metavar="CONFIG", help=f"DeepSpeed config (default {DEFAULT_DS_CONFIG})")
    g.add_argument("--objective", default=s, help=f"{OBJECTIVE_HELP}. dpo: --per_device_train_batch_size counts "
                                                  "pairs (2 rows each), and the reference pass is planned too "
                                                  f"(default {TRAINING_DEFAULTS['objective']})")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="llama-ft plan", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Memory per GPU and per host of a LoRA run under ZeRO-3, whether it fits, the smallest "
                            "--offload_ratio that does, and what the offload costs on PCIe.",
                epilog=f"Constants: CUDA context + NCCL {CUDA_CONTEXT_BYTES / GiB:.1f} GiB per GPU, fragmentation "
                       f"margin {FRAGMENTATION:.0%} of the bytes allocated within a step "
                       f"({CPU_HEAP_RETENTION:.0%} malloc heap retention on CPU ranks), CPU rank baseline "
                       f"{CPU_RANK_BASELINE_BYTES / GiB:.2f} GiB (see llama_ft/plan/planner.py). Sizes are GiB "
                       "(2^30 bytes), as nvidia-smi reports them: an H100 80GB has 79.6, an H200 140.4.\n"
                       "After `--`, a whole training command line may follow; flags the plan does not use are "
                       "skipped. Exit status: 0 fits, 1 does not fit, 2 bad input, 3 a long-context layout "
                       "training refuses too (e.g. a --sequence_parallel_size the model's heads cannot take).")
    p.add_argument("model", nargs="?", metavar="MODEL", help=f"{', '.join(ALIASES)} (Llama 3.1) or a model directory")
    m = p.add_argument_group("machines")
    m.add_argument("--hostfile", help="DeepSpeed hostfile (HOST slots=N lines): nodes and ranks per node")
    m.add_argument("--include", default="", help="with --hostfile: the launcher's --include filter")
    m.add_argument("--exclude", default="", help="with --hostfile: the launcher's --exclude filter")
    m.add_argument("--nodes", type=int, help="nodes (default 1; or --hostfile)")
    m.add_argument("--gpus_per_node", type=int, help="ranks per node (default 8; with --hostfile: its slots)")
    m.add_argument("--gpu", metavar="KIND",
                   help=f"the GPU: {', '.join(GPU_KINDS)}, or a compute capability (8.0): its memory (unless "
                        "--gpu_memory_gb) and the FP8 mode it runs")
    m.add_argument("--gpu_memory_gb", type=float, help="memory of one GPU, GiB (79.6 for an H100 80GB; default: "
                                                        "--gpu's)")
    m.add_argument("--host_memory_gb", type=float, help="memory of one host, GiB (default: the host is not checked "
                                                        "on GPUs; required with --device cpu)")
    m.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda: ranks on GPUs; cpu: CPU ranks, every term in host memory (default cuda)")
    m.add_argument("--pcie_gbps", type=float, default=DEFAULT_PCIE_GBPS,
                   help=f"host-to-device GB/s per GPU with all GPUs copying (default {DEFAULT_PCIE_GBPS:g}: PCIe Gen5 "
                        "x16, shared by 8 GPUs)")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    o.add_argument("--brief", action="store_true", help="one line when it fits (the whole breakdown when not)")
    add_training_flags(p)
    add_config_flag(p)
    return p


def training_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="llama-ft plan -- (training flags)", allow_abbrev=False, add_help=False)
    add_training_flags(p)
    return p


def parse(argv: list[str]) -> tuple[argparse.Namespace, SimpleNamespace]:
    """(plan options, training options): flags before `--` strictly, a training command line after it
    leniently; the flags before `--` win."""
    head, tail = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = build_parser()
    path = config_path(head)  # --config FILE: below both command lines, above the defaults
    from_file = config_values(path, parser) if path is not None else {}
    parser.set_defaults(**{k: v for k, v in from_file.items() if k not in TRAINING_DEFAULTS})
    ns = parser.parse_args(head)
    del ns.config
    lenient, _skipped = training_parser().parse_known_args(tail)
    given = {k: v for k, v in vars(ns).items() if k in TRAINING_DEFAULTS}
    file_training = {k: v for k, v in from_file.items() if k in TRAINING_DEFAULTS}
    return ns, SimpleNamespace(**{**TRAINING_DEFAULTS, **file_training, **vars(lenient), **given})


def load_ds_config(path: str) -> tuple[dict, str]:
    """The --deepspeed JSON: the path as given, else relative to the source checkout (as training does)."""
    p = Path(path)
    if not p.is_file() and not p.is_absolute() and (REPO_ROOT / path).is_file():
        p = REPO_ROOT / path
    try:
        cfg = json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"--deepspeed {path}: file not found (expected a DeepSpeed JSON config)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--deepspeed {p}: not a readable JSON config ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"--deepspeed {p}: expected a JSON object")
    return cfg, str(p)


def machine_from(ns: argparse.Namespace) -> Machine:
    """Nodes and ranks per node from --hostfile (llama_ft/hostfile.py, the launcher's filters) or the flags."""
    if ns.hostfile:
        if ns.nodes is not None:
            raise UserError("--nodes and --hostfile: give one of them (the hostfile lists the nodes)")
        hosts = parse_hostfile(ns.hostfile)
        active = active_slots(ns.hostfile, hosts, ns.gpus_per_node, ns.include, ns.exclude)
        nodes, per_node = len(active), max(len(v) for v in active.values())
    else:
        if ns.include or ns.exclude:
            raise UserError("--include/--exclude filter a hostfile: give --hostfile too")
        nodes = 1 if ns.nodes is None else ns.nodes
        per_node = 8 if ns.gpus_per_node is None else ns.gpus_per_node
    for flag, v in (("--nodes", nodes), ("--gpus_per_node", per_node)):
        if v <= 0:
            raise UserError(f"{flag} {v}: expected an integer > 0")
    sizes = {}
    for flag, v in (("--gpu_memory_gb", ns.gpu_memory_gb), ("--host_memory_gb", ns.host_memory_gb)):
        if v is not None and not v > 0:
            raise UserError(f"{flag} {v:g}: expected a size > 0 (GiB)")
        sizes[flag] = None if v is None else int(v * GiB)
    if not ns.pcie_gbps > 0:
        raise UserError(f"--pcie_gbps {ns.pcie_gbps:g}: expected a bandwidth > 0 (GB/s)")
    return Machine(nodes, per_node, sizes["--gpu_memory_gb"], sizes["--host_memory_gb"], ns.device, ns.pcie_gbps)


def make_plan(argv: list[str]) -> tuple[dict[str, Any], argparse.Namespace]:
    ns, train = parse(argv)
    model = ns.model or train.model_name_or_path
    if not model:
        raise UserError(f"MODEL: expected {', '.join(ALIASES)} or a model directory (or --model_name_or_path)")
    shape = resolve_model(model, "MODEL" if ns.model else "--model_name_or_path")
    gpu = parse_gpu(ns.gpu) if ns.gpu else None
    if gpu and ns.gpu_memory_gb is None:
        ns.gpu_memory_gb = gpu[2]
    machine = machine_from(ns)
    opts = options_from(train, shape)
    fp8 = fp8_line(gpu, train) if opts.base_bits == 8 else None  # the FP8 mode: FP8 weights only
    ds, ds_path = load_ds_config(train.deepspeed)
    zero = zero_settings(ds, shape.hidden_size, f"--deepspeed {ds_path}")
    try:
        result = plan(shape, opts, zero, machine)
    except LayoutError as e:
        if e.ranks and not _exact_ranks(ns):
            # nodes x the most ranks on a node is more than the launch has: training, which counts them, decides
            raise UserError(str(e)) from None
        raise
    result["inputs"]["deepspeed"]["config"] = ds_path
    if fp8:
        result["fp8"] = fp8
    return result, ns


def fp8_line(gpu: tuple[str, tuple[int, int], float | None] | None, train: SimpleNamespace) -> dict[str, Any]:
    """The FP8 mode --quantize runs on --gpu (as training decides it at launch); --fp8_compute on a GPU without
    FP8 tensor cores is refused with training's own line."""
    if gpu is None:
        return {"gpu": None, "capability": None, "mode": fp8_mode(None, train.fp8_compute)}
    label, cap, _ = gpu
    refusal = fp8_compute_refusal(label, cap) if train.fp8_compute else None
    if refusal:
        raise UserError(refusal)
    return {"gpu": label, "capability": capability_text(cap), "arch": arch_of(cap),
            "mode": fp8_mode(cap, train.fp8_compute)}


def _exact_ranks(ns: argparse.Namespace) -> bool:
    """Whether the plan's rank count (nodes x ranks per node) is the launch's: every node runs as many."""
    if not ns.hostfile or ns.gpus_per_node is not None:
        return True
    active = active_slots(ns.hostfile, parse_hostfile(ns.hostfile), None, ns.include, ns.exclude)
    return len({len(v) for v in active.values()}) == 1


@user_errors_exit(prog="llama-ft plan")
def main(argv: list[str] | None = None) -> int:
    try:
        result, ns = make_plan(list(sys.argv[1:] if argv is None else argv))
    except LayoutError as e:
        # its own status: run-llama.sh stops on it, since every rank would refuse the same flags after start-up
        print(f"llama-ft plan: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return EXIT_REFUSED_LAYOUT
    if ns.json:
        print(json.dumps(result, indent=1))
    else:
        print(report(result, brief=ns.brief and result["fits"]))
    if result["fits"]:
        return 0
    line = not_fit_line(result)
    print(f"llama-ft plan: {line}", file=sys.stderr)
    return 1
