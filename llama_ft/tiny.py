"""The embedded default: a tiny Llama 3-style checkpoint and tokenizer made locally, no hub access.

`make_tiny_llama(DIR)` writes what a real Llama 3.1 download looks like, at toy size:
    config.json, generation_config.json           LlamaForCausalLM, grouped-query attention
    model-0000k-of-0000N.safetensors + index       bf16 weights in several shards
    tokenizer.json, tokenizer_config.json          byte-level BPE that AutoTokenizer loads, with
    chat_template.jinja                            Llama 3.1's special tokens (<|begin_of_text|>,
                                                   <|end_of_text|>, <|start_header_id|>, <|end_header_id|>,
                                                   <|eot_id|>) and its Instruct chat template
The tokenizer is trained on the bundled dataset and the alpaca template, so the same
text always gives the same vocabulary, and the weights come from a fixed seed.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

from llama_ft.fsutil import atomic_dir

ASSETS = Path(__file__).parent / "assets"
BUNDLED_DATASET = ASSETS / "alpaca_tiny.jsonl"
BUNDLED_CHAT_DATASET = ASSETS / "chat_tiny.jsonl"  # the same tasks as conversations, OpenAI and ShareGPT rows
LLAMA31_CHAT_TEMPLATE = ASSETS / "llama3.1_chat_template.jinja"  # Meta's Llama 3.1 Instruct template

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"
CHAT_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention, like every Llama 3.1 size
    max_position_embeddings=1024,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    # Wider than Llama's 0.02: at hidden size 64 a 0.02 lm_head caps logits near +-1, so no adapter
    # could make a confident prediction and the demo loss would barely move.
    initializer_range=0.1,
)
VOCAB_SIZE = 384
SHARD_SIZE = "60KB"  # small enough that the tiny model spans several shards, like a real one


def _training_corpus() -> list[str]:
    from llama_ft.data import PROMPT_INPUT, PROMPT_NO_INPUT

    texts = [PROMPT_INPUT, PROMPT_NO_INPUT]
    for line in BUNDLED_DATASET.read_text().splitlines():
        row = json.loads(line)
        texts.extend([row["instruction"], row["input"], row["output"]])
    return texts


def build_tokenizer():
    """A byte-level BPE fast tokenizer (Llama 3 style special tokens, BOS prepended)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS, PAD, *CHAT_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   chat_template=LLAMA31_CHAT_TEMPLATE.read_text())


def make_tiny_llama(out_dir: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the tiny checkpoint to `out_dir` (atomically); return its path.

    If `out_dir` already holds a complete tiny checkpoint and not `overwrite`, it is kept.
    """
    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors.index.json").exists() and not overwrite:
        return out_dir  # before importing torch: run-llama.sh asks for it at every launch
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **TINY_CONFIG,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    # like Llama 3.1 Instruct: generation stops at <|end_of_text|> or at the end of an assistant turn
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")], do_sample=False,
    )
    try:
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            model.save_pretrained(tmp, max_shard_size=SHARD_SIZE)
            tokenizer.save_pretrained(tmp)
    except OSError as e:
        # another process (the other node of a no-ssh launch) wrote it meanwhile: same seed, same bytes
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not (out_dir / "model.safetensors.index.json").exists():
            raise
    return out_dir
