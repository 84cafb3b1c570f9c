"""GGUF files: a GGUF path where a model directory is expected is one line saying how to convert it, in every
command; `llama-ft convert-gguf` refuses bad input in one line. (The conversion itself runs on the real
SmolLM2 GGUF in the `real_checkpoint` fixture: tests/test_real_checkpoint.py loads and trains its output.)"""

from __future__ import annotations

import pytest

from llama_ft.cli import main as cli_main
from llama_ft.train.recipe import main as train_main


@pytest.fixture
def gguf(tmp_path):
    f = tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    f.parent.mkdir()
    f.write_bytes(b"GGUF\x03\x00\x00\x00")
    return f


def _one_line(capsys, argv: list[str], code: int = 2) -> str:
    with pytest.raises(SystemExit) as e:
        # `llama-ft train` ends its process with os._exit (train/process_exit.py): call the recipe itself
        train_main(argv[1:]) if argv[0] == "train" else cli_main(argv)
    assert e.value.code == code
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "[WARNING]" not in ln
             and "INFO" not in ln]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("command", [
    ["train", "--model_name_or_path", "{f}"],
    ["train", "--model_name_or_path", "{d}"],  # a folder of GGUF files, no config.json
    ["data", "--model_name_or_path", "{f}"],
    ["generate", "--model_name_or_path", "{f}", "--prompt", "hi"],
    ["eval", "--model_name_or_path", "{f}", "--dataset", "x.jsonl"],
    ["merge", "--base", "{f}", "--adapter", "{d}", "--output", "{d}/out"],
])
def test_a_gguf_model_path_is_one_line_naming_the_converter(command, gguf, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_FT_CACHE", str(tmp_path / "cache"))
    argv = [a.format(f=gguf, d=gguf.parent) for a in command]
    line = _one_line(capsys, argv)
    assert "a GGUF file (SmolLM2-135M-Instruct.Q4_1.gguf)" in line, line
    assert f"llama-ft convert-gguf {gguf} OUT_DIR" in line


def test_plan_names_the_converter_too(gguf, capsys):
    line = _one_line(capsys, ["plan", str(gguf)])
    assert line.startswith("llama-ft plan: error:") and "llama-ft convert-gguf" in line


def test_convert_gguf_bad_input(gguf, tmp_path, capsys):
    assert "file not found" in _one_line(capsys, ["convert-gguf", str(tmp_path / "none.gguf"), str(tmp_path / "o")])
    (tmp_path / "o").mkdir()
    line = _one_line(capsys, ["convert-gguf", str(gguf), str(tmp_path / "o")])
    assert "exists" in line and "--overwrite" in line
    line = _one_line(capsys, ["convert-gguf", str(gguf), str(tmp_path / "o2")])  # not a model GGUF
    assert "transformers cannot read this GGUF" in line
    assert not (tmp_path / "o2").exists() and not list(tmp_path.glob("o2*"))  # nothing half-written
