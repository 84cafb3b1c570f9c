"""lm-evaluation-harness on what llama-ft writes: a local task whose exact match is `llama-ft eval`'s.

The task (a YAML with a local `data_files` JSONL, one {"question", "answer"} per single-turn chat row):
generate_until with the tokenizer's chat template (`apply_chat_template`: the user message, the template's
default system turn, add_generation_prompt), greedy, stopping at SmolLM2's end tokens; the prediction stripped
(`remove_whitespace`) and both sides stripped by `regexes_to_ignore` before the harness's exact_match. That is
llama-ft's definition (train/evaluate.py), given the same token budget on both sides (`--max_new_tokens`).
"""

from __future__ import annotations

import json
from pathlib import Path

MAX_GEN_TOKS = 32

TASK_YAML = """task: {name}
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: question
doc_to_target: answer
num_fewshot: 0
generation_kwargs:
  until: ["<|im_end|>", "<|endoftext|>"]
  do_sample: false
  max_gen_toks: {max_gen_toks}
filter_list:
  - name: strip
    filter:
      - function: remove_whitespace
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: false
    ignore_punctuation: false
    regexes_to_ignore: ['^\\s+', '\\s+$']
metadata:
  version: 1.0
"""


def write_task(directory: Path, chat_jsonl: Path, name: str = "llama_ft_heldout") -> str:
    """The task YAML and its flat data in `directory`, from single-turn chat rows; returns the task name."""
    directory.mkdir(parents=True, exist_ok=True)
    flat = directory / "heldout_flat.jsonl"
    rows = [json.loads(line)["messages"] for line in chat_jsonl.read_text().splitlines()]
    flat.write_text("".join(json.dumps({"question": m[0]["content"], "answer": m[1]["content"]}) + "\n" for m in rows))
    (directory / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=flat, max_gen_toks=MAX_GEN_TOKS))
    return name


def run_lm_eval(directory: Path, chat_jsonl: Path, model_args: str) -> dict:
    """lm_eval on the rows with `--model hf --model_args MODEL_ARGS` (float32, CPU, batch 1): {"exact_match",
    "predictions": each document's stripped generation, "matches": each document's score}, in row order."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    name = write_task(directory, chat_jsonl)
    result = lm_eval.simple_evaluate(model="hf", model_args=f"{model_args},dtype=float32", tasks=[name],
                                     task_manager=TaskManager(include_path=str(directory)), apply_chat_template=True,
                                     device="cpu", batch_size=1, bootstrap_iters=0, log_samples=True)
    metrics = result["results"][name]
    samples = sorted(result["samples"][name], key=lambda x: x["doc_id"])
    return {"exact_match": float(next(v for k, v in metrics.items() if k.startswith("exact_match")
                                      and "stderr" not in k)),
            "predictions": [x["filtered_resps"][0] for x in samples],
            "matches": [bool(x["exact_match"]) for x in samples]}
