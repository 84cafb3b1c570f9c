"""`--config FILE` (llama_ft/config_file.py): precedence, the run's own run_config.yaml, bad files.

The references are the parser's own defaults (TrainConfig's dataclass fields, read independently of the file
code), the values written into the test's files, and the flags given on the command line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from test_e2e import REPO, llama_env

from llama_ft.config import TrainConfig, parse_train_args
from llama_ft.config_file import config_argv
from llama_ft.errors import UserError

BASE = ["--model_name_or_path", "some-model"]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_command_line_beats_file_beats_defaults(tmp_path):
    cfg_file = _write(tmp_path / "run.yaml", "lora_r: 32\nlearning_rate: 0.001\nlora_target_modules: [q_proj, v_proj]\n"
                                              "gradient_checkpointing: true\nmax_seq_len: 512\ndataset_format: chat\n"
                                              "gpus_per_node: 4\n")  # a plan key: training ignores it
    out = str(tmp_path / "o")
    cfg = parse_train_args([*BASE, "--config", str(cfg_file), "--lora_r", "8", "--output_dir", out])
    defaults = TrainConfig()
    assert cfg.lora_r == 8  # the command line wins
    assert (cfg.learning_rate, cfg.lora_target_modules, cfg.gradient_checkpointing, cfg.max_seq_len) == (
        0.001, ["q_proj", "v_proj"], True, 512)  # the file wins over the defaults
    changed = {"lora_r", "learning_rate", "lora_target_modules", "gradient_checkpointing", "max_seq_len",
               "dataset_format", "dataset", "model_name_or_path", "output_dir"}
    for f in fields(TrainConfig):  # everything else is the dataclass default
        if f.name not in changed:
            assert getattr(cfg, f.name) == getattr(defaults, f.name), f.name
    # the same values from JSON, and the flag placed before --config still wins
    json_file = _write(tmp_path / "run.json", json.dumps({"lora_r": 32, "learning_rate": 0.001}))
    cfg = parse_train_args(["--lora_r", "8", *BASE, "--config", str(json_file), "--output_dir", out])
    assert (cfg.lora_r, cfg.learning_rate) == (8, 0.001)


def test_config_argv_is_the_file_as_training_flags(tmp_path):
    f = _write(tmp_path / "c.yaml", "lora_r: 16\nbf16: false\nlora_target_modules: [q_proj, k_proj]\n"
                                    "max_seq_len: null\noffload_ratio: auto\nnodes: 2\n")
    assert config_argv(f) == ["--lora_r", "16", "--bf16", "false", "--lora_target_modules", "q_proj", "k_proj",
                              "--offload_ratio", "auto"]


@pytest.mark.parametrize("text, suffix, message", [
    ("lora_r: 8\nlora_rr: 3\n", ".yaml", "line 2: unknown key 'lora_rr'"),
    ("lora_r: '8'\n", ".yaml", "line 1: 'lora_r': expected an integer, got '8'"),
    ("learning_rate: [1, 2]\n", ".yaml", "line 1: 'learning_rate': expected a single value, got a list"),
    ("gradient_checkpointing: 1\n", ".yaml", "line 1: 'gradient_checkpointing': expected true or false, got 1"),
    ("dataset: 3\n", ".yaml", "line 1: 'dataset': expected a string, got 3"),
    ("\n\nobjective: ppo\n", ".yaml", "line 3: 'objective': 'ppo' is not one of sft, dpo"),
    ("lr_scheduler_type: linearly\n", ".yaml", "line 1: 'lr_scheduler_type': 'linearly' is not one of linear"),
    ("lora_r: null\n", ".yaml", "line 1: 'lora_r': null is not a value for this flag"),
    ("lora_r: 8\nlora_r: 9\n", ".yaml", "line 2: 'lora_r' is given twice (also on line 1)"),
    ("lora_r: [8\n", ".yaml", "not valid YAML"),
    ("- lora_r\n", ".yaml", "line 1: expected a mapping of flag names to values"),
    ('{"lora_r": 8,\n "x": }\n', ".json", "line 2: not valid JSON"),
])
def test_bad_config_is_one_line_naming_file_line_and_key(tmp_path, text, suffix, message):
    f = _write(tmp_path / f"bad{suffix}", text)
    with pytest.raises(UserError) as e:
        parse_train_args([*BASE, "--config", str(f), "--output_dir", str(tmp_path / "o")])
    assert str(e.value).startswith(f"--config {f}: ") and message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("command", [["data"], ["eval", "--model_name_or_path", "x"], ["config"]])
def test_commands_refuse_a_bad_config_in_one_line(tmp_path, command):
    f = _write(tmp_path / "bad.yaml", "lora_r: 8\nwarmup: 3\n")
    args = [*command, str(f)] if command == ["config"] else [*command, "--config", str(f)]
    proc = subprocess.run([sys.executable, "-m", "llama_ft.cli", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and f"--config {f}: line 2: unknown key 'warmup'" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_run_llama_with_config_and_its_run_config_repeats_the_run(tmp_path):
    """run-llama.sh --config: the file's values beat the script's embedded defaults, the command line beats the
    file, and the file's output_dir stands in for OUTPUT_DIR. The run_config.yaml it writes, read back with
    --config, gives the options the run recorded in its checkpoint."""
    out = tmp_path / "from-config"
    cfg_file = _write(tmp_path / "run.yaml", f"output_dir: {out}\nmax_steps: 2\nsave_steps: 2\nlora_r: 4\n"
                                              "lora_alpha: 4\neval_dataset_size: 0\n")
    env = llama_env(tmp_path, tmp_path / "unused")
    del env["OUTPUT_DIR"]
    proc = subprocess.run(["bash", str(REPO / "run-llama.sh"), "--config", str(cfg_file), "--lora_alpha", "8"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    written = yaml.safe_load((out / "run_config.yaml").read_text())
    assert written["lora_r"] == 4 and written["max_steps"] == 2  # the file over the script's defaults (16, 60)
    assert written["lora_alpha"] == 8  # the command line over the file
    assert written["learning_rate"] == 5e-3 and written["per_device_train_batch_size"] == 4  # the script's defaults
    assert written["output_dir"] == str(out) and not (tmp_path / "unused").exists()

    recorded = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["options"]
    again = parse_train_args(["--config", str(out / "run_config.yaml"), "--overwrite_output_dir"]).to_json()
    again["overwrite_output_dir"] = written["overwrite_output_dir"]
    for key, value in again.items():
        if key != "local_rank":
            assert recorded[key] == value, (key, recorded[key], value)

    bad = _write(tmp_path / "bad.yaml", "max_steps: two\n")
    proc = subprocess.run(["bash", str(REPO / "run-llama.sh"), "--config", str(bad)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"--config {bad}: line 1: 'max_steps': expected an integer, got 'two'" in proc.stderr.splitlines()[-1]
