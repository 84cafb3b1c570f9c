"""Training data: rows from files or the Hub -> `{"input_ids", "labels"}` examples -> micro-batches.

    readers.py   read rows with `datasets` (.json/.jsonl/.parquet, Hub names); name the file and line
    parquet.py   a .parquet file: the columns a format reads, their types and UTF-8 checked first
    formats.py   what a row holds: alpaca-family source/target pairs, chat conversations (OpenAI, ShareGPT)
    chat.py      chat template rendering and assistant-only labels
    tokenize.py  rows -> examples, --max_seq_len cuts, the trained-token count
    pairs.py     preference pairs (DPO): chosen/rejected rows -> both sides' ids and response-only labels
    cache.py     the cache key: tokenize once per node
    pipeline.py  DataOptions -> (examples, DataStats): the interface training and `llama-ft data` use
    split.py     seeded train/eval split
    collate.py   right-padding into tensors, the pad id
    batches.py   each rank's deterministic micro-batch stream
    command.py   `llama-ft data`: summary, preview, dump
"""

from llama_ft.data.batches import MicroBatches
from llama_ft.data.chat import use_chat_template
from llama_ft.data.collate import collate, collate_packed, pad_token_id
from llama_ft.data.formats import CHAT, DATASET_FORMATS, IGNORE_INDEX, PROMPT_INPUT, PROMPT_NO_INPUT
from llama_ft.data.pipeline import DataOptions, DataStats, load_rows, load_tokenizer, prepare_examples
from llama_ft.data.split import train_eval_split
from llama_ft.data.tokenize import tokenize_rows, trained_tokens

__all__ = [
    "CHAT", "DATASET_FORMATS", "IGNORE_INDEX", "PROMPT_INPUT", "PROMPT_NO_INPUT", "DataOptions", "DataStats",
    "MicroBatches", "collate", "collate_packed", "load_rows", "load_tokenizer", "pad_token_id", "prepare_examples",
    "tokenize_rows", "train_eval_split", "trained_tokens", "use_chat_template",
]
