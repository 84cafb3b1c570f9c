"""Metrics: one JSON object per line in metrics.jsonl (rank 0), and the loss curve PNG."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only JSONL log. On resume, lines from steps after the checkpoint are dropped first."""

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [ln for ln in _complete_lines(self.path) if json.loads(ln)["step"] <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        elif self.path.exists():
            self.path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def close(self, exit_code: int = 0) -> None:
        """Nothing to do: each write opens, appends and closes (a Sink of llama_ft/reporting.py)."""


def _complete_lines(path: Path) -> list[str]:
    """Lines that parse as JSON: a run killed mid-write leaves at most a partial last line."""
    out = []
    for ln in path.read_text().splitlines():
        try:
            json.loads(ln)
        except json.JSONDecodeError:
            continue
        out.append(ln)
    return out


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in _complete_lines(Path(path))]


def plot_loss(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> None:
    """Train loss per step (and eval loss where present) against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(png_path).with_name(f".{Path(png_path).name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)
