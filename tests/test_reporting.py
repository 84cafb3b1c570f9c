"""--report_to: TensorBoard event files and offline W&B runs hold exactly metrics.jsonl's numbers, resume
continues them without duplicate steps, every way out closes them, and bad input is one line at parse time.

The reporters are driven here with fake records; the real training run with --report_to tensorboard is
test_e2e.py's default run (test_tensorboard_matches_metrics_jsonl).
"""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llama_ft.config import parse_train_args
from llama_ft.errors import StopRun, UserError
from llama_ft.metrics import read_metrics
from llama_ft.reporting import TENSORBOARD_DIR, WANDB_RUN_ID, Reporter, scalars
from llama_ft.train.recipe import main as train_main

OPTIONS = {"learning_rate": 5e-3, "lora_r": 16, "lora_target_modules": ["q_proj", "v_proj"], "max_seq_len": None}
NAMES = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/trained_tokens_per_s", "eval/loss"}


def fake_records(steps: range, eval_every: int = 2, offset: float = 0.0) -> list[dict[str, Any]]:
    """Records shaped like the recipe's: a train record per step, an eval record every `eval_every` steps."""
    out: list[dict[str, Any]] = []
    for s in steps:
        out.append({"step": s, "loss": 6.0 / s + offset, "lr": 1e-3 * s, "epoch": 0, "grad_norm": 0.1 * s + offset,
                    "trained_tokens": 100 * s, "tokens_per_s": 1000.5 + s, "trained_tokens_per_s": 400.25 + s,
                    "skipped_steps": 0, "elapsed_s": 0.5 * s})
        if s % eval_every == 0:
            out.append({"step": s, "eval_loss": 5.0 / s + offset})
    return out


def expected_scalars(metrics_jsonl: Path, dtype: type = float) -> dict[str, dict[int, float]]:
    """{name: {step: value}} from metrics.jsonl (`dtype` np.float32: as TensorBoard stores a scalar)."""
    want: dict[str, dict[int, float]] = {}
    for record in read_metrics(metrics_jsonl):
        for name, value in scalars(record).items():
            want.setdefault(name, {})[record["step"]] = float(dtype(value))
    return want


def tensorboard_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} as TensorBoard shows them (its own reader, purge_step applied); each step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    got = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        assert len({e.step for e in events}) == len(events), f"{tag}: a step has two points"
        got[tag] = {e.step: e.value for e in events}
    return got


def tensorboard_options(logdir: Path) -> dict[str, Any]:
    """The options JSON of the TEXT tab (the newest start's)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    acc.Reload()
    text = acc.Tensors("options/text_summary")[-1].tensor_proto.string_val[0].decode()
    return json.loads(text)


def _drive(out: Path, report_to: str, records: list[dict[str, Any]], resume_step: int | None = None) -> None:
    with Reporter.open(out, report_to, OPTIONS, resume_step) as reporter:
        for r in records:
            reporter.log(r)


def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    _drive(tmp_path, "tensorboard", fake_records(range(1, 7)))
    got = tensorboard_scalars(tmp_path / TENSORBOARD_DIR)
    assert NAMES <= got.keys()
    assert got == expected_scalars(tmp_path / "metrics.jsonl", np.float32)
    assert got["eval/loss"].keys() == {2, 4, 6} and got["train/loss"].keys() == set(range(1, 7))
    assert tensorboard_options(tmp_path / TENSORBOARD_DIR) == OPTIONS


def test_tensorboard_resume_has_no_duplicate_steps(tmp_path):
    """A run stopped after step 5 with its checkpoint at step 3, resumed: steps 4-5 are the resumed run's,
    once each, in TensorBoard as in metrics.jsonl; a fresh start over the same directory starts clean."""
    pytest.importorskip("tensorboard")
    logdir = tmp_path / TENSORBOARD_DIR
    _drive(tmp_path, "tensorboard", fake_records(range(1, 6)))
    _drive(tmp_path, "tensorboard", fake_records(range(4, 8), offset=1.0), resume_step=3)
    got = tensorboard_scalars(logdir)
    assert got == expected_scalars(tmp_path / "metrics.jsonl", np.float32)
    assert got["train/loss"].keys() == set(range(1, 8))
    assert got["train/loss"][3] == np.float32(2.0) and got["train/loss"][4] == np.float32(2.5)  # 6/4 + 1
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 2

    _drive(tmp_path, "tensorboard", fake_records(range(1, 3)))  # --overwrite_output_dir: a new run
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 1
    assert tensorboard_scalars(logdir)["train/loss"].keys() == {1, 2}


class _Recorder:
    """A sink that remembers what it got."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.closed: list[int] = []

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def close(self, exit_code: int = 0) -> None:
        self.closed.append(exit_code)


class _FailsToClose(_Recorder):
    def close(self, exit_code: int = 0) -> None:
        raise OSError("disk gone")


@pytest.mark.parametrize("raised,code", [(None, 0), (StopRun(143, "stopped by SIGTERM"), 143),
                                         (StopRun(3, "NaN"), 3), (RuntimeError("boom"), 1)])
def test_every_way_out_closes_once_with_its_exit_code(raised, code):
    first, broken, last = _Recorder(), _FailsToClose(), _Recorder()
    reporter = Reporter([first, broken, last])
    try:
        with reporter:
            reporter.log({"step": 1, "loss": 2.0})
            if raised is not None:
                raise raised
    except (StopRun, RuntimeError) as e:
        assert e is raised
    assert first.records == last.records == [{"step": 1, "loss": 2.0}]
    assert first.closed == last.closed == [code]  # a sink that fails to close does not stop the others
    reporter.close()
    assert first.closed == [code]  # closing twice is harmless


def test_other_ranks_report_nothing(tmp_path):
    reporter = Reporter.open(tmp_path, "tensorboard", OPTIONS, None, rank=1)
    reporter.log({"step": 1, "loss": 1.0})
    reporter.close()
    assert not any(tmp_path.iterdir())


def wandb_records(run_dir: Path) -> list[Any]:
    """The protobuf Records of an offline run's .wandb file (a LevelDB-style log: a 7-byte header, then
    32 KiB blocks of chunks, each `crc32c u32 | length u16 | type u8` + payload; type 1 = a whole record,
    2/3/4 = its first/middle/last part). wandb >= 0.18 writes it from Go and ships no Python reader."""
    from wandb.proto.wandb_internal_pb2 import Record

    (path,) = run_dir.glob("run-*.wandb")
    raw, block = path.read_bytes(), 32768
    assert raw[:4] == b":W&B"
    pos, part, records = 7, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # too little room left in the block for a chunk header: zero padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0:
            break
        part += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = Record()
            rec.ParseFromString(part)
            records.append(rec)
            part = b""
    return records


def wandb_history(records: list[Any]) -> dict[str, dict[int, float]]:
    got: dict[str, dict[int, float]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            for item in r.history.item:
                name = item.key or "/".join(item.nested_key)  # "train/loss" comes as nested ["train", "loss"]
                if not name.startswith("_"):
                    got.setdefault(name, {})[r.history.step.num] = json.loads(item.value_json)
    return got


def test_wandb_offline_run_holds_history_config_and_resumes(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb not installed (pip install 'llama-ft[wandb]')")
    for var in ("WANDB_DIR", "WANDB_RUN_ID", "WANDB_PROJECT", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    _drive(tmp_path, "wandb", fake_records(range(1, 5)))
    run_id = (tmp_path / WANDB_RUN_ID).read_text().strip()
    (first,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}")
    records = wandb_records(first)
    assert wandb_history(records) == expected_scalars(tmp_path / "metrics.jsonl")
    assert NAMES <= wandb_history(records).keys()
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_id == run_id and run.project == "llama-ft"
    config = {u.key: json.loads(u.value_json) for u in run.config.update if u.key != "_wandb"}
    assert config == OPTIONS

    # resumed from step 2 and stopped by SIGTERM: the same W&B run id, finished with the exit code. An offline
    # run's folder is named by the second it starts in: a resume within the same second would share it
    time.sleep(1.1)
    with pytest.raises(StopRun), Reporter.open(tmp_path, "wandb", OPTIONS, resume_step=2) as reporter:
        for r in fake_records(range(3, 5)):
            reporter.log(r)
        raise StopRun(143)
    assert (tmp_path / WANDB_RUN_ID).read_text().strip() == run_id
    (second,) = set((tmp_path / "wandb").glob(f"offline-run-*-{run_id}")) - {first}
    records = wandb_records(second)
    assert wandb_history(records)["train/loss"].keys() == {3, 4}
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_id == run_id
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [143]
    assert any(r.WhichOneof("record_type") == "preempting" for r in records)


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(tmp_path), "--output_dir", str(tmp_path / "out"), *extra]


@pytest.mark.parametrize("value,missing,needle", [
    ("tensorbord", None, "--report_to 'tensorbord': expected one of none, tensorboard, wandb"),
    ("wandb", "wandb", "--report_to wandb: the wandb package is not installed (pip install wandb"),
    ("tensorboard", "tensorboard", "--report_to tensorboard: the tensorboard package is not installed "
                                   "(pip install tensorboard"),
])
def test_bad_report_to_is_one_line_at_parse_time(tmp_path, monkeypatch, capsys, value, missing, needle):
    if missing:
        monkeypatch.setitem(sys.modules, missing, None)  # importlib.util.find_spec then finds nothing
    with pytest.raises(UserError, match="--report_to"):
        parse_train_args(_args(tmp_path, "--report_to", value))
    with pytest.raises(SystemExit) as e:
        train_main(_args(tmp_path, "--report_to", value))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and f"llama-ft: error: {needle}" in err, err
    assert not (tmp_path / "out").exists()


def test_report_to_defaults_to_none(tmp_path):
    assert parse_train_args(_args(tmp_path)).report_to == "none"
    assert parse_train_args(_args(tmp_path, "--report_to", "tensorboard")).report_to == "tensorboard"
