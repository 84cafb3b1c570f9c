"""examples/*.yaml: every ready config is a valid --config file that `llama-ft plan` says fits on the machine it
names, and whose data settings `llama-ft data --preview` runs on the embedded default (the tiny model and the
bundled data of the config's format, since the examples name paths on a user's machine).

Each example names its plan command in a `# plan:` comment (a model alias, so no weights are needed); the test
runs exactly that command.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from llama_ft.tiny import BUNDLED_CHAT_DATASET, BUNDLED_DATASET

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def _cli(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    """`llama-ft ARGS` in this process (the paths in the examples are relative to the checkout): exit status,
    stdout, stderr."""
    from llama_ft.cli import main

    monkeypatch.chdir(REPO)
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return int(code or 0), out.out, out.err


def test_there_are_examples_for_each_setup_the_docs_promise():
    names = {p.stem for p in EXAMPLES}
    assert {"8b-one-gpu", "70b-fp8-one-node", "405b-fp8-offload-one-node", "two-nodes-slurm", "long-context-sp",
            "chat-packing", "dpo-8b"} <= names


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_fits_by_its_own_plan_command(example, capsys, monkeypatch):
    [line] = [ln for ln in example.read_text().splitlines() if ln.startswith("# plan: ")]
    command = shlex.split(line.removeprefix("# plan: "))
    assert command[:2] == ["llama-ft", "plan"] and f"examples/{example.name}" in command
    code, out, err = _cli(capsys, monkeypatch, *command[1:], "--json")
    assert code == 0, err[-2000:]  # 0: fits
    plan = json.loads(out)
    values = yaml.safe_load(example.read_text())
    assert plan["fits"] is True
    # the file's machine and training settings are the ones planned for
    machine, training = plan["inputs"]["machine"], plan["inputs"]["training"]
    assert (machine["gpus_per_node"], machine["nodes"]) == (values["gpus_per_node"], values.get("nodes", 1))
    assert machine["gpu_memory_bytes"] == int(values["gpu_memory_gb"] * 2**30)
    for key in ("lora_r", "quantize", "gradient_checkpointing", "packing", "per_device_train_batch_size"):
        assert training[key] == values.get(key, training[key]), key
    assert training["sequence_parallel_size"] == values.get("sequence_parallel_size", 1)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_data_settings_preview_on_the_embedded_default(example, tmp_path, tiny_model_dir, capsys,
                                                               monkeypatch):
    values = yaml.safe_load(example.read_text())
    if values.get("objective") == "dpo":
        data = tmp_path / "pairs.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "chosen": w, "rejected": w[::-1] + "x"}) + "\n"
                                for w in ("apple", "river", "stone", "meadow")))
    else:
        data = BUNDLED_CHAT_DATASET if values["dataset_format"] == "chat" else BUNDLED_DATASET
    monkeypatch.setenv("LLAMA_FT_CACHE", str(tmp_path / "cache"))
    code, out, err = _cli(capsys, monkeypatch, "data", "--config", str(example), "--model_name_or_path",
                          str(tiny_model_dir), "--dataset", str(data), "--preview", "1")
    assert code == 0, err[-2000:]
    assert "rows read" in out and "[[" in out  # the summary, and a preview with its trained tokens
    if values.get("max_seq_len"):  # the file's data settings were the ones used
        assert f"--max_seq_len {values['max_seq_len']}" in out
