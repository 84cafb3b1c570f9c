"""`llama-ft` command line: train | data | generate | merge | quantize | download | hostfile | plan | kernels | ...

    llama-ft train ...        one process (no launcher); for several ranks use run-llama.sh
    llama-ft data ...         what training will read: summary, --preview K, --dump OUT.jsonl
    llama-ft generate ...     a completion from the base model + trained adapters (or a merged model)
    llama-ft merge ...        fold PEFT adapters into a new checkpoint, shard by shard
    llama-ft quantize ...     write a pre-quantized FP8 (--bits 8) or bnb-4bit NF4 (--bits 4) checkpoint
    llama-ft download REPO --local-dir DIR
                              fetch a checkpoint from the Hugging Face Hub, checked before and after
    llama-ft hostfile check F validate a DeepSpeed hostfile before launching
    llama-ft plan MODEL ...   memory per GPU / per host, the verdict, the smallest offload ratio
    llama-ft kernels --compile sm_80,sm_90
                              compile every Triton kernel for those GPUs (no GPU needed): registers, spills
    llama-ft make-tiny DIR    write the embedded tiny Llama + tokenizer (the default model)
    llama-ft eval ...         loss and greedy exact match on held-out data: base, base + adapters, or merged
    llama-ft convert-gguf F D a GGUF model file -> a Hugging Face safetensors directory to train on
    llama-ft config FILE      check a --config file and print it as training flags (run-llama.sh uses it)
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from llama_ft.errors import user_errors_exit

COMMANDS = {
    "train": "LoRA fine-tuning under DeepSpeed ZeRO-3 (single process here; run-llama.sh for many ranks)",
    "data": "show what the model will be trained on: example summary, decoded preview, JSONL dump",
    "generate": "generate a completion with the trained adapters (or a merged model): the sanity check",
    "merge": "merge PEFT adapters into a base checkpoint, streaming one shard at a time",
    "quantize": "write an FP8 (--bits 8: e4m3, 128x128 block scales) or NF4 (--bits 4: the bnb-4bit layout) copy of "
                "a checkpoint",
    "download": "download a safetensors checkpoint + tokenizer from the Hugging Face Hub (resumable, verified)",
    "hostfile": "check a DeepSpeed hostfile (syntax, duplicates, slots, the ranks asked for)",
    "plan": "memory per GPU and per host of a run, whether it fits, the smallest --offload_ratio that does",
    "kernels": "compile every Triton kernel for GPU architectures without a GPU: errors, registers, spills",
    "make-tiny": "write the embedded tiny Llama checkpoint and tokenizer to a directory",
    "eval": "did the fine-tune work: token-weighted loss and greedy exact match on held-out data",
    "convert-gguf": "convert a GGUF model file (llama.cpp) into a Hugging Face safetensors directory",
    "config": "check a --config file (YAML or JSON) and print it as training flags",
}


def _single_process_env() -> None:
    """Give a launcher-less `llama-ft train` the rendezvous variables torch.distributed needs."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def make_tiny_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama-ft make-tiny", description=COMMANDS["make-tiny"])
    p.add_argument("output_dir", help="directory for the tiny checkpoint and its tokenizer")
    p.add_argument("--overwrite", action="store_true", help="rewrite it even if it exists")
    return p


@user_errors_exit
def _make_tiny(argv: list[str]) -> int:
    from llama_ft.tiny import make_tiny_llama

    args = make_tiny_parser().parse_args(argv)
    path = make_tiny_llama(args.output_dir, overwrite=args.overwrite)
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = "\n".join(f"  {k:<{width}}  {v}" for k, v in COMMANDS.items())
        msg = f"usage: llama-ft {{{','.join(COMMANDS)}}} ...\n\ncommands:\n{lines}\n"
        if argv and argv[0] not in ("-h", "--help"):
            print(f"llama-ft: error: unknown command {argv[0]!r}\n{msg}", file=sys.stderr)
            return 2
        print(msg)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        from llama_ft.train import recipe
        from llama_ft.train.process_exit import run_and_exit

        _single_process_env()
        run_and_exit(lambda: recipe.main(rest))
    if cmd == "data":
        from llama_ft.data import command

        return command.main(rest)
    if cmd == "generate":
        from llama_ft import generate

        return generate.main(rest)
    if cmd == "merge":
        from llama_ft import merge

        return merge.main(rest)
    if cmd == "quantize":
        from llama_ft import quantize

        return quantize.main(rest)
    if cmd == "download":
        from llama_ft import hub

        return hub.main(rest)
    if cmd == "hostfile":
        from llama_ft import hostfile

        return hostfile.main(rest)
    if cmd == "plan":
        from llama_ft.plan import command as plan_command

        return plan_command.main(rest)
    if cmd == "kernels":
        from llama_ft.kernelcheck import command as kernels_command

        return kernels_command.main(rest)
    if cmd == "eval":
        from llama_ft.eval import command as eval_command

        return eval_command.main(rest)
    if cmd == "config":
        from llama_ft import config_file

        return user_errors_exit(prog="llama-ft config")(config_file.main)(rest)
    if cmd == "convert-gguf":
        from llama_ft.checkpoint import gguf

        return gguf.main(rest)
    return _make_tiny(rest)


if __name__ == "__main__":
    sys.exit(main())
