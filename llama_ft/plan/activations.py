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

Shared by all layers: RoPE's cos and sin (2 B M head_dim) and the boolean mask (b s^2) when one is built.
Gradient checkpointing (non-reentrant, one checkpoint per decoder layer) keeps only each layer's input
(B M h per layer) and recomputes one layer at a time in backward. The backward of a layer adds its
gradients: the incoming and outgoing dL/dh (2 B M h) and, in the MLP, d(act*up), d(SiLU) and d(up)
alive together (3 B M I).

Loss (train/loss.py ChunkedLMHeadLoss), N trained positions (planned as N = M: every position trained),
c = min(--loss_chunk_size, N), V vocabulary: the whole head gathered (B V h), the trained hidden rows and
their gradient (2 B N h), and per chunk the logits in the training dtype and in fp32 at once (c V (B + 4);
4 c V in fp32 training, where the cast is the same tensor). After the final norm (outside any checkpoint):
its fp32 input copy (4 M h + 4 M) and the hidden states it returns (B M h).
"""

from __future__ import annotations

from dataclasses import dataclass

from llama_ft.plan.shape import ModelShape

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

    @property
    def dropout_mask_bytes(self) -> int:
        """Bytes per element of a dropout mask: CUDA's fused dropout keeps a bool mask, the CPU path
        (`x * bernoulli noise`) keeps the noise in the input's dtype."""
        return 1 if self.device == "cuda" else self.dtype_bytes

    @property
    def tokens(self) -> int:
        return self.rows * self.seq_len

    @property
    def has_mask(self) -> bool:
        """transformers builds a 4-D mask for packed rows (from position_ids) and padded batches of > 1 row,
        except for flash-attention (varlen boundaries instead)."""
        return (self.packing or self.rows > 1) and self.attn_implementation != "flash_attention_2"


def input_widths(shape: ModelShape) -> dict[str, int]:
    return {"attn_in": shape.hidden_size, "attn_out": shape.q_width, "mlp_in": shape.hidden_size,
            "mlp_mid": shape.intermediate_size}


def lora_saved(shape: ModelShape, mb: MicroBatch) -> int:
    """Bytes the LoRA branches of one layer keep: t per target, and dropout(x) + its mask per target, or
    without dropout x per distinct input (o_proj's input is the attention output sdpa and flash-attention
    already keep: their (b, s, heads, d) output makes transformers' transpose + contiguous a no-op)."""
    m, b = mb.tokens, mb.dtype_bytes
    widths = input_widths(shape)
    t = len(mb.targets) * b * m * mb.lora_r
    if mb.lora_dropout > 0:
        return t + sum((b + mb.dropout_mask_bytes) * m * widths[LINEAR_INPUTS[n]] for n in mb.targets)
    inputs = {LINEAR_INPUTS[n] for n in mb.targets}
    if mb.attn_implementation != "eager":
        inputs.discard("attn_out")
    return t + sum(b * m * widths[i] for i in inputs)


def attention_saved(shape: ModelShape, mb: MicroBatch) -> int:
    """What the attention core keeps (after the q/k/v projections, before o_proj's input)."""
    m, b, q = mb.tokens, mb.dtype_bytes, shape.q_width
    heads = shape.num_attention_heads
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
            "MLP SiLU in/out, up": 3 * b * m * shape.intermediate_size,
            "LoRA inputs": lora_saved(shape, mb)}


def layer_backward_transient(shape: ModelShape, mb: MicroBatch) -> int:
    """Gradients alive inside one layer's backward: dL/dh in and out, and three I-wide MLP gradients."""
    return mb.dtype_bytes * mb.tokens * (2 * shape.hidden_size + 3 * shape.intermediate_size)


def checkpoint_boundary(shape: ModelShape, mb: MicroBatch) -> int:
    """A checkpointed layer's input, kept until its backward."""
    return mb.dtype_bytes * mb.tokens * shape.hidden_size


def shared_inputs(shape: ModelShape, mb: MicroBatch) -> int:
    """RoPE cos/sin and the boolean attention mask, built once per forward."""
    mask = mb.rows * mb.seq_len * mb.seq_len if mb.has_mask else 0
    return 2 * mb.dtype_bytes * mb.tokens * shape.head_dim + mask


def final_norm(shape: ModelShape, mb: MicroBatch) -> int:
    """The final norm's fp32 input copy and the hidden states it returns."""
    m, h = mb.tokens, shape.hidden_size
    return 4 * m * h + 4 * m + mb.dtype_bytes * m * h


def loss_temporaries(shape: ModelShape, mb: MicroBatch, chunk: int) -> dict[str, int]:
    """The chunked LM head + cross-entropy at its peak (bytes)."""
    n, b, v, h = mb.tokens, mb.dtype_bytes, shape.vocab_size, shape.hidden_size
    c = min(chunk, n)
    return {"lm_head gathered": b * v * h, "trained rows + their gradient": 2 * b * n * h,
            "chunk logits": c * v * (4 if b == 4 else b + 4)}
