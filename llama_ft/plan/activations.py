"""Activation and loss memory of one micro-batch, from the Llama block as transformers 5 writes it.

M = b x s tokens (b rows of s tokens: the longest a padded batch can be, or a packed row), B = bytes of
the training dtype, h hidden, q = heads x head_dim, kv = kv_heads x head_dim, I intermediate, r LoRA rank.
What autograd keeps per decoder layer (a frozen W needs no input saved: its matmul keeps only W):

    input_layernorm, post_attention_layernorm   the fp32 copy of the input (pow and mul save it) + 1/rms:
                                                2 x (4 M h + 4 M)
    attention (sdpa)                            q and k after RoPE, v, the output: B M (2q + 2kv'), and the
                                                fp32 log-sum-exp 4 b heads s; kv' = q when transformers
                                                repeats k/v to every head (it does whenever it passes a mask:
                                                padded rows with b > 1, packed rows), else kv; with a mask
                                                also its float copy (torch converts the bool mask at every
                                                call and the kernel keeps it): B b s^2
              (flash_attention_2)               the same with kv' = kv (no mask, no repeat)
              (eager)                           q, k and v repeated to every head (B M 3q), and the
                                                probabilities in fp32 and cast back: (4 + B) b heads s^2
    MLP (SiLU gate)                             SiLU's input, its output and up's output: 3 B M I
    LoRA, per target linear with input width n  t = x A^T: B M r; and dropout(x) with its mask (B + 1) M n
                                                (--lora_dropout > 0, one per target; the mask is bool on CUDA,
                                                in the input's dtype on CPU: (B + B) M n), or x itself, saved
                                                once per distinct input (q/k/v share one, gate/up another; o's
                                                is the attention output, already counted)

Shared by all layers: RoPE's cos and sin (2 B M head_dim) and the mask when one is built: boolean (b s^2), or
for eager additive in the training dtype (B b s^2; measured, tests/test_plan.py).
Gradient checkpointing (non-reentrant, one checkpoint per decoder layer) keeps only each layer's input
(B M h per layer) and recomputes one layer at a time in backward. The backward of a layer adds its
gradients: the incoming and outgoing dL/dh (2 B M h) and, in the MLP, d(act*up), d(SiLU) and d(up)
alive together (3 B M I).

Long context (train/parallel.py, train/activation_memory.py). Sequence parallelism over n ranks: a rank holds
M = b x ceil(s / n) tokens, and every term above counts those, except the attention core, which Ulysses runs
on the whole sequence with heads / n query heads and max(kv_heads / n, 1) KV heads (no mask: it drops
them): B b s (2 q/n + 2 kv'/n) + 4 b (heads/n) s; its all-to-alls keep send and receive buffers of the
local q, k, v alive in the backward: 2 B M (q + 2 kv). Tiled MLP over t slices: the MLP keeps only its input
(B M h), its LoRA branches keep nothing, and its backward recomputes one slice at a time: 3 B (M/t) I saved
+ 3 B (M/t) I of gradients. Activation offload: the checkpoint boundaries live in host memory; the device
keeps the one being recomputed.

Loss (train/loss.py ChunkedLMHeadNLL), N trained positions (planned as N = M: every position trained),
c = min(--loss_chunk_size, N), V vocabulary: the whole head gathered (B V h), the trained hidden rows and
their gradient (2 B N h), and per chunk the logits in the training dtype and in fp32 at once (c V (B + 4);
4 c V in fp32 training, where the cast is the same tensor). After the final norm (outside any checkpoint):
its fp32 input copy (4 M h + 4 M) and the hidden states it returns (B M h).

DPO (--objective dpo, train/objectives.py). A micro-batch of P pairs is b = 2P right-padded rows (each side a
sequence), or with --packing b rows of whole pairs, s = 2 x --max_seq_len (data/batches.py), so every term above
counts those rows (with b > 1, or packed, there is always a mask, except flash-attention). With
--dpo_shared_prompt (data/shared_prompt.py) the rows are the same bound, b rows of s = 2 x --max_seq_len tokens
holding more pairs, and the mask llama-ft builds for them has the size and dtype of transformers' own (boolean
b s^2 for sdpa, additive for eager), so they are planned alike (tests/test_dpo_train.py). Before the policy
pass, the reference pass runs the same rows with the adapters off under no_grad (with --precompute_ref_logprobs
once, before training, on padded batches of P pairs instead: train/reference.py): it saves nothing for
backward, but has a working set of its own. No graph holds anything, so what is alive is what Python still
references (measured op by op, tests/test_plan.py):
  in a layer   the embeddings' output (the model's `inputs_embeds`, held through the whole forward) and the
               layer's input (B M h each; one tensor when there is one layer), plus the largest of
                 q's RoPE    normed input, q, q cos, rotate_half(q) and its product with sin, k, v:
                             B M (h + 4q + 2kv)
                 k's RoPE    normed input, q, RoPE'd q, k, k cos, rotate_half(k), its product, v:
                             B M (h + 2q + 5kv)
                 sdpa        normed input, RoPE'd q and k, v, k and v repeated to every head (when
                             transformers repeats them, as above: 2 B M q), the output, the log-sum-exp
                             and the mask's float copy: B M (h + 2q + 2kv) [+ 2 B M q] + 4 b heads s
                             [+ B b s^2]
                 (eager)     normed input, RoPE'd q, k, v, k and v repeated (always, when kv < heads),
                             and at the softmax its fp32 input copy and output beside the scores:
                             B M (h + q + 2kv) [+ 2 B M q] + (8 + B) b heads s^2 (fp32 training: 8)
                 MLP         the attention's residual sum, the normed input, gate, SiLU(gate) and up
                             (SiLU(gate) * up is made as gate is freed): 2 B M h + 3 B M I
               (the RMSNorms' fp32 copies, 8 M h at most, stay below the MLP whenever I >= h: every Llama)
  at its loss  the final hidden states (B M h), the whole head gathered (B V h), the trained rows (B N h,
               no gradient) and one chunk's logits (c V (B + 4)): sequence_logprobs without dx.
"""

from __future__ import annotations

from dataclasses import dataclass

from llama_ft.flags import TARGET_GROUPS
from llama_ft.plan.shape import ModelShape

MLP_TARGETS = TARGET_GROUPS["mlp"]

LINEAR_INPUTS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
                 "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_mid"}
"""Which tensor each linear reads: q/k/v share the normed hidden states, gate/up the post-attention ones."""


@dataclass(frozen=True)
class MicroBatch:
    """What decides the activations: rows, tokens per row, dtype and the LoRA layers."""

    rows: int
    seq_len: int
    dtype_bytes: int
    lora_r: int
    targets: tuple[str, ...]
    lora_dropout: float
    packing: bool
    attn_implementation: str = "sdpa"
    device: str = "cuda"
    sp: int = 1  # ranks sharing each sequence
    mlp_tiles: int = 1  # slices of the tiled MLP (1: not tiled)

    @property
    def dropout_mask_bytes(self) -> int:
        """Bytes per element of a dropout mask: CUDA's fused dropout keeps a bool mask, the CPU path
        (`x * bernoulli noise`) keeps the noise in the input's dtype."""
        return 1 if self.device == "cuda" else self.dtype_bytes

    @property
    def tokens(self) -> int:
        """Tokens this rank holds: its 1/sp of every row."""
        return self.rows * -(-self.seq_len // self.sp)

    @property
    def has_mask(self) -> bool:
        """transformers builds a 4-D mask for packed rows (from position_ids) and padded batches of > 1 row,
        except for flash-attention (varlen boundaries instead)."""
        return ((self.packing or self.rows > 1) and self.attn_implementation != "flash_attention_2"
                and self.sp == 1)  # Ulysses drops every 4-D mask


def input_widths(shape: ModelShape) -> dict[str, int]:
    return {"attn_in": shape.hidden_size, "attn_out": shape.q_width, "mlp_in": shape.hidden_size,
            "mlp_mid": shape.intermediate_size}


def lora_saved(shape: ModelShape, mb: MicroBatch) -> int:
    """Bytes the LoRA branches of one layer keep: t per target, and dropout(x) + its mask per target, or
    without dropout x per distinct input (o_proj's input is the attention output sdpa and flash-attention
    already keep: their (b, s, heads, d) output makes transformers' transpose + contiguous a no-op)."""
    m, b = mb.tokens, mb.dtype_bytes
    widths = input_widths(shape)
    targets = [n for n in mb.targets if mb.mlp_tiles == 1 or n not in MLP_TARGETS]  # tiled: recomputed per slice
    t = len(targets) * b * m * mb.lora_r
    if mb.lora_dropout > 0:
        return t + sum((b + mb.dropout_mask_bytes) * m * widths[LINEAR_INPUTS[n]] for n in targets)
    inputs = {LINEAR_INPUTS[n] for n in targets}
    if mb.attn_implementation != "eager":
        inputs.discard("attn_out")
    return t + sum(b * m * widths[i] for i in inputs)


def attention_saved(shape: ModelShape, mb: MicroBatch) -> int:
    """What the attention core keeps (after the q/k/v projections, before o_proj's input)."""
    m, b, q = mb.tokens, mb.dtype_bytes, shape.q_width
    heads = shape.num_attention_heads
    if mb.sp > 1:  # Ulysses: the whole sequence, heads / sp of the heads, no mask
        kv_heads = max(shape.num_key_value_heads // mb.sp, 1)
        whole = mb.rows * mb.seq_len
        lse = 4 * mb.rows * (heads // mb.sp) * mb.seq_len
        return b * whole * (2 * q // mb.sp + 2 * kv_heads * shape.head_dim) + lse
    if mb.attn_implementation == "eager":
        probs = (4 if b == 4 else 4 + b) * mb.rows * heads * mb.seq_len * mb.seq_len
        return b * m * 3 * q + probs
    repeated = mb.has_mask and shape.num_key_value_heads < heads
    kv = q if repeated else shape.kv_width
    float_mask = b * mb.rows * mb.seq_len * mb.seq_len if mb.has_mask else 0  # sdpa converts the bool mask per call
    return b * m * (2 * q + 2 * kv) + 4 * mb.rows * heads * mb.seq_len + float_mask


def layer_saved(shape: ModelShape, mb: MicroBatch) -> dict[str, int]:
    """What one decoder layer's forward keeps for its backward, by part (bytes)."""
    m, b, h = mb.tokens, mb.dtype_bytes, shape.hidden_size
    return {"RMSNorm inputs (fp32)": 2 * (4 * m * h + 4 * m),
            "attention": attention_saved(shape, mb),
            "MLP SiLU in/out, up": b * m * h if mb.mlp_tiles > 1 else 3 * b * m * shape.intermediate_size,
            "LoRA inputs": lora_saved(shape, mb)}


def layer_backward_transient(shape: ModelShape, mb: MicroBatch) -> int:
    """Gradients alive inside one layer's backward: dL/dh in and out, and three I-wide MLP gradients (tiled:
    one slice's, with the slice's recomputed forward); under SP the all-to-all buffers of q, k, v."""
    b, m, i = mb.dtype_bytes, mb.tokens, shape.intermediate_size
    mlp = 3 * b * m * i if mb.mlp_tiles == 1 else 6 * b * -(-m // mb.mlp_tiles) * i
    all_to_all = 2 * b * m * (shape.q_width + 2 * shape.kv_width) if mb.sp > 1 else 0
    return 2 * b * m * shape.hidden_size + mlp + all_to_all


def checkpoint_boundary(shape: ModelShape, mb: MicroBatch) -> int:
    """A checkpointed layer's input, kept until its backward."""
    return mb.dtype_bytes * mb.tokens * shape.hidden_size


def shared_inputs(shape: ModelShape, mb: MicroBatch) -> int:
    """RoPE cos/sin and the attention mask (boolean; eager: additive, in the training dtype), built once per
    forward."""
    per_entry = mb.dtype_bytes if mb.attn_implementation == "eager" else 1
    mask = per_entry * mb.rows * mb.seq_len * mb.seq_len if mb.has_mask else 0
    return 2 * mb.dtype_bytes * mb.tokens * shape.head_dim + mask


def final_norm(shape: ModelShape, mb: MicroBatch) -> int:
    """The final norm's fp32 input copy and the hidden states it returns."""
    m, h = mb.tokens, shape.hidden_size
    return 4 * m * h + 4 * m + mb.dtype_bytes * m * h


def loss_temporaries(shape: ModelShape, mb: MicroBatch, chunk: int, grad: bool = True) -> dict[str, int]:
    """The chunked LM head + cross-entropy at its peak (bytes); `grad` False: no dnll/dx is kept (no_grad)."""
    n, b, v, h = mb.tokens, mb.dtype_bytes, shape.vocab_size, shape.hidden_size
    c = min(chunk, n)
    rows = {"trained rows + their gradient": 2 * b * n * h} if grad else {"trained rows": b * n * h}
    return {"lm_head gathered": b * v * h, **rows, "chunk logits": c * v * (4 if b == 4 else b + 4)}


def attention_no_grad(shape: ModelShape, mb: MicroBatch) -> int:
    """The largest set of tensors one layer's attention holds without autograd (module doc, DPO), its input
    aside: the normed input and the largest of q's RoPE, k's RoPE and the attention core."""
    m, b, q, kv = mb.tokens, mb.dtype_bytes, shape.q_width, shape.kv_width
    heads, s = shape.num_attention_heads, mb.seq_len
    rope = b * m * max(4 * q + 2 * kv, 2 * q + 5 * kv)
    if mb.attn_implementation == "eager":
        repeated = 2 * b * m * q if shape.num_key_value_heads < heads else 0
        core = b * m * (q + 2 * kv) + repeated + (8 if b == 4 else 8 + b) * mb.rows * heads * s * s
    else:
        repeated = 2 * b * m * q if mb.has_mask and shape.num_key_value_heads < heads else 0
        float_mask = b * mb.rows * s * s if mb.has_mask else 0
        core = b * m * (2 * q + 2 * kv) + repeated + 4 * mb.rows * heads * s + float_mask
    return b * m * shape.hidden_size + max(rope, core)


def reference_forward(shape: ModelShape, mb: MicroBatch) -> int:
    """The DPO reference pass's largest working set in its forward (no autograd), RoPE tables and mask aside
    (shared_inputs): the embeddings' output, the layer's input, and the larger of its attention and its MLP."""
    m, b, h = mb.tokens, mb.dtype_bytes, shape.hidden_size
    inputs = (2 if shape.num_hidden_layers > 1 else 1) * b * m * h
    mlp = 2 * b * m * h + 3 * b * m * shape.intermediate_size
    return inputs + max(attention_no_grad(shape, mb), mlp)


def reference_loss(shape: ModelShape, mb: MicroBatch, chunk: int) -> dict[str, int]:
    """The DPO reference pass at its sequence_logprobs (bytes): the final hidden states and the chunked head
    without gradients."""
    return {"final hidden states": mb.dtype_bytes * mb.tokens * shape.hidden_size,
            **loss_temporaries(shape, mb, chunk, grad=False)}
