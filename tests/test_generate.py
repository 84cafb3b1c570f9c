"""`llama-ft generate` and `--generate_every`, on the embedded default run (tests/test_e2e.py's default_run).

The reference is the training data itself: after run-llama.sh's 60 steps the adapters answer a training
prompt with its trained response, greedily, and the base model does not; the merged checkpoint answers as
base + adapters do. The chat template comes from the adapter directory when it has one. Bad input is one line.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest

from llama_ft.data.formats import PROMPT_INPUT, PROMPT_NO_INPUT
from llama_ft.generate import main
from llama_ft.tiny import BUNDLED_DATASET

pytestmark = pytest.mark.slow


def _prompt(row: dict) -> str:
    """The alpaca source text, as training formatted it."""
    if row["input"]:
        return PROMPT_INPUT.format(instruction=row["instruction"], input=row["input"])
    return PROMPT_NO_INPUT.format(instruction=row["instruction"])


def _generate(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(argv)) == 0
    return out.getvalue().rstrip("\n")


def test_trained_adapters_answer_a_training_prompt(default_run):  # noqa: F811
    rows = [json.loads(ln) for ln in BUNDLED_DATASET.read_text().splitlines()]
    row = rows[13]
    assert row["output"] == "The sum is nine."
    model, out = str(default_run["model"]), str(default_run["out"])
    flags = ["--prompt", _prompt(row), "--max_new_tokens", "12"]
    tuned = _generate("--model_name_or_path", model, "--adapter", out, *flags)
    assert tuned == row["output"]
    assert _generate("--model_name_or_path", model, *flags) != row["output"]
    assert _generate("--model_name_or_path", str(default_run["merged"]), *flags) == tuned
    # sampling is seeded: the same seed, the same text
    sampled = ["--temperature", "0.8", "--top_p", "0.9", "--seed", "3"]
    assert _generate("--model_name_or_path", model, "--adapter", out, *flags, *sampled) == \
        _generate("--model_name_or_path", model, "--adapter", out, *flags, *sampled)


def test_messages_use_the_adapters_chat_template(default_run, tmp_path, monkeypatch):  # noqa: F811
    from llama_ft import generate

    adapter = tmp_path / "adapter"
    shutil.copytree(default_run["out"], adapter, ignore=shutil.ignore_patterns("checkpoint-*"))
    config = json.loads((adapter / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (adapter / "tokenizer_config.json").write_text(json.dumps(config))
    (adapter / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<<assistant>> {% endif %}")
    seen = []
    real = generate.prompt_ids
    monkeypatch.setattr(generate, "prompt_ids", lambda tok, p, m: seen.append(tok.decode(real(tok, p, m)[0])) or
                        real(tok, p, m))
    _generate("--model_name_or_path", str(default_run["model"]), "--adapter", str(adapter), "--messages",
              json.dumps([{"role": "user", "content": "Say hi."}]), "--max_new_tokens", "3")
    assert seen and seen[0].endswith("<<user>> Say hi.\n<<assistant>> ")


def test_samples_while_training(default_run):  # noqa: F811
    """--generate_every 30 in the default run: 3 fixed held-out prompts at steps 30 and 60, every rank generating
    (ZeRO-3 gathers are collective: the run would hang otherwise)."""
    samples = [json.loads(ln) for ln in (default_run["out"] / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [30, 30, 30, 60, 60, 60]
    first, last = samples[:3], samples[3:]
    assert [s["prompt"] for s in first] == [s["prompt"] for s in last]
    for s in samples:
        assert s["prompt"].rstrip().endswith("### Response:") and s["reference"] and isinstance(s["completion"], str)
    assert "step 60 sample 0:" in default_run["log"]


def _bad(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("Loading weights")]  # transformers' bar
    assert e.value.code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("llama-ft generate: error: "), lines
    return lines[0]


def test_bad_input_is_one_line(default_run, tmp_path, capsys):  # noqa: F811
    model, out = str(default_run["model"]), default_run["out"]
    unfit = tmp_path / "unfit"
    shutil.copytree(out, unfit, ignore=shutil.ignore_patterns("checkpoint-*"))
    config = json.loads((unfit / "adapter_config.json").read_text())
    (unfit / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["qkv_proj"]}))
    assert "does not fit the base" in _bad(capsys, "--model_name_or_path", model, "--adapter", str(unfit),
                                           "--prompt", "x")
    assert "no adapter_config.json" in _bad(capsys, "--model_name_or_path", model, "--adapter", str(tmp_path),
                                            "--prompt", "x")
    assert "not valid JSON" in _bad(capsys, "--model_name_or_path", model, "--messages", "[{role: user}]")
    assert "item 1" in _bad(capsys, "--model_name_or_path", model, "--messages",
                            json.dumps([{"role": "user", "content": "a"}, {"role": "user"}]))
    assert "non-empty JSON list" in _bad(capsys, "--model_name_or_path", model, "--messages", "{}")
    assert "not allowed with" in _bad(capsys, "--model_name_or_path", model, "--prompt", "x", "--messages", "[]")
    assert "--temperature -1" in _bad(capsys, "--model_name_or_path", model, "--prompt", "x", "--temperature", "-1")
