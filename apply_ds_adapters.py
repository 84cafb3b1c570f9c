#!/usr/bin/env python
"""Merge a PEFT LoRA adapter into a Llama checkpoint, shard by shard (Snowflake's script name and flags).

python apply_ds_adapters.py --model-name BASE_DIR --ckpt-path ADAPTER_DIR --output-dir OUT_DIR
(same as: llama-ft merge --base BASE_DIR --adapter ADAPTER_DIR --output OUT_DIR)
"""

from llama_ft.merge import main

if __name__ == "__main__":
    raise SystemExit(main())
