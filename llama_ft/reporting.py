"""Where training metrics go: metrics.jsonl always, plus TensorBoard or Weights & Biases (`--report_to`).

One call site: the recipe hands each record (a metrics.jsonl line: a dict with "step") to `Reporter.log`,
which gives it to every sink, so metrics.jsonl, the event file and the W&B history cannot disagree. Only
rank 0 reports; the other ranks get a Reporter with no sinks.

In OUTPUT_DIR:
    metrics.jsonl                          always
    tensorboard/events.out.tfevents.*      --report_to tensorboard (view: tensorboard --logdir OUTPUT_DIR/tensorboard)
    wandb/offline-run-* or wandb/run-*     --report_to wandb (WANDB_DIR, WANDB_PROJECT, WANDB_MODE are honoured);
    .llama-ft/wandb_run_id                 the W&B run a resumed run continues

Names shown in TensorBoard and W&B: `eval_loss` -> `eval/loss`, every other number KEY -> `train/KEY`
(train/loss, train/lr, train/grad_norm, train/tokens_per_s, train/trained_tokens_per_s, ...).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from llama_ft.errors import StopRun, UserError
from llama_ft.fsutil import atomic_write_text
from llama_ft.metrics import MetricsLog

log = logging.getLogger("llama_ft")

REPORT_TO = ("none", "tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"
WANDB_RUN_ID = Path(".llama-ft") / "wandb_run_id"


def check_report_to(name: str) -> None:
    """Parse-time check of --report_to: a known value, and its package importable (one line, exit 2)."""
    if name not in REPORT_TO:
        raise UserError(f"--report_to {name!r}: expected one of {', '.join(REPORT_TO)}")
    if name != "none" and importlib.util.find_spec(name) is None:
        raise UserError(f"--report_to {name}: the {name} package is not installed (pip install {name}, or "
                        f"pip install 'llama-ft[{name}]')")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl record under their TensorBoard / W&B names (see the module docstring)."""
    return {("eval/loss" if k == "eval_loss" else f"train/{k}"): float(v) for k, v in record.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}


class Sink(Protocol):
    """One destination of the records: `write` each as it comes, `close` once with the run's exit code."""

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self, exit_code: int = 0) -> None: ...


class TensorBoardSink:
    """Event files in OUTPUT_DIR/tensorboard, one per start of the run, read by TensorBoard as one run.

    A resumed run opens its file with purge_step = the first step after the checkpoint: TensorBoard then
    hides what earlier files logged from that step on (the steps the stopped run did after its last
    checkpoint), so no step has two points. A fresh run removes the event files of the run it overwrites,
    as MetricsLog does with metrics.jsonl."""

    def __init__(self, logdir: Path, options: dict[str, Any], resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # optional: the tensorboard package

        if resume_step is None and logdir.is_dir():
            for old in logdir.glob("events.out.tfevents.*"):
                old.unlink()
        self.writer = SummaryWriter(str(logdir), purge_step=None if resume_step is None else resume_step + 1)
        # the options as an indented (code) block of JSON in the TEXT tab, at the step this start begins from
        text = "\n".join("    " + ln for ln in json.dumps(options, indent=2, sort_keys=True).splitlines())
        self.writer.add_text("options", text, global_step=resume_step or 0)
        self.writer.flush()

    def write(self, record: dict[str, Any]) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=record["step"])
        self.writer.flush()  # as current as metrics.jsonl if the run is killed

    def close(self, exit_code: int = 0) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run with config = the run's options, each record logged at its step.

    Resume continues the SAME W&B run: its id is kept in OUTPUT_DIR/.llama-ft/wandb_run_id and a resumed
    start calls wandb.init(id=..., resume="allow"). That is what W&B documents for preemptible jobs and what
    its users expect: one run, one continuous chart, one config, rather than a run per preemption to stitch
    together. W&B keeps a run's steps increasing, so steps that the stopped run logged after its last
    checkpoint keep their first points; resume is exact, so those equal the repeated ones (tokens/s aside).
    A fresh start (no --resume_from_checkpoint) begins a new W&B run; WANDB_RUN_ID, if set, wins over both.
    Credentials, project, entity and mode come from the environment or `wandb login`, never from flags."""

    def __init__(self, out: Path, options: dict[str, Any], resume_step: int | None) -> None:
        import wandb  # optional: the wandb package

        self._wandb = wandb
        id_file = out / WANDB_RUN_ID
        run_id = os.environ.get("WANDB_RUN_ID") or (
            id_file.read_text().strip() if resume_step is not None and id_file.is_file() else None)
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "llama-ft"),
                                  dir=os.environ.get("WANDB_DIR", str(out)), config=options, id=run_id,
                                  resume="allow" if run_id else None)
        except Exception as e:  # no login in online mode, a bad entity, ...: one line, not a traceback
            raise UserError(f"--report_to wandb: wandb.init failed: {' '.join(str(e).split())} (run `wandb login`, "
                            "or set WANDB_MODE=offline)") from e
        id_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(id_file, self.run.id + "\n")

    def write(self, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self, exit_code: int = 0) -> None:
        if exit_code > 128:  # 128 + signal: preempted (SIGTERM, SIGINT); W&B shows the run as preempted
            self.run.mark_preempting()
        self.run.finish(exit_code=exit_code)
        # finish() can return before W&B's service has written the run's .wandb file (offline: sometimes only its
        # header); teardown waits for the service, so the run is whole on disk when close() returns. Its atexit
        # hook would do the same, but not on every way out (a second signal's immediate exit).
        self._wandb.teardown(exit_code=exit_code)


class Reporter:
    """All the sinks of a run behind one call: `log(record)` each record, `close(exit_code)` at the end.

    Used as a context manager around the training loop, it closes on every way out: the end, a StopRun
    (preemption, NaN stop: its exit code), any other error (exit code 1)."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    @classmethod
    def open(cls, out: Path, report_to: str, options: dict[str, Any], resume_step: int | None,
             rank: int = 0) -> Reporter:
        """Rank 0's sinks: metrics.jsonl (cut back to `resume_step` on resume) and the --report_to one."""
        if rank != 0:
            return cls([])
        sinks: list[Sink] = [MetricsLog(out / "metrics.jsonl", resume_step=resume_step)]
        if report_to == "tensorboard":
            sinks.append(TensorBoardSink(out / TENSORBOARD_DIR, options, resume_step))
        elif report_to == "wandb":
            sinks.append(WandbSink(out, options, resume_step))
        return cls(sinks)

    def log(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self, exit_code: int = 0) -> None:
        """Close every sink; one that fails to close is a warning, so the others (and the exit) still happen."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            try:
                sink.close(exit_code)
            except Exception as e:  # the run's outcome is decided; a report must not change it
                log.warning("closing %s: %s", type(sink).__name__, e)

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc is None:
            code = 0
        elif isinstance(exc, StopRun):
            code = exc.code
        elif isinstance(exc, SystemExit):
            code = exc.code if isinstance(exc.code, int) else 1
        else:
            code = 1
        self.close(code)
