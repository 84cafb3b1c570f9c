"""The model side of the plan: a Llama's shape, and the parameters llama-ft builds from it, in model order.

A shape comes from an alias (`8b`, `70b`, `405b`: Llama 3.1), from a model directory's config.json, or
from a transformers LlamaConfig. config.json is read with the json module and LlamaConfig's defaults for
absent fields (tests/test_plan.py checks the result against `AutoConfig`): importing transformers'
config classes imports torch (2-3.5 s here), and run-llama.sh runs the planner before every launch.

Parameters, as the build makes them (llama_ft/model/build.py, lora.py, fp8/module.py), per decoder layer
in execution order, with d = head_dim, q = heads * d, kv = kv_heads * d, I = intermediate size:

    input_layernorm.weight        (h,)                   frozen, training dtype
    self_attn.{q,k,v,o}_proj      (q, h) (kv, h) (kv, h) (h, q)
    post_attention_layernorm      (h,)
    mlp.{gate,up,down}_proj       (I, h) (I, h) (h, I)

plus embed_tokens (V, h), the final norm (h,) and lm_head (V, h) (absent when tied to the embeddings).
A LoRA target linear W (N out, K in) holds its frozen base, uint8 under quantization (ZeRO-3 upcasts floating
parameters, FIELD_NOTES.md), and lora_A (r, K), lora_B (N, r) in the training dtype:

    bits 16 (no --quantize)   weight         N K elements of the training dtype
    bits 8  (FP8, --quantize) weight         uint8, N K                      (one e4m3 byte a weight)
                              weight_scale   uint8, ceil(N/128) ceil(K/128) 4  (an fp32 scale per 128x128 block)
    bits 4  (NF4, --bits 4)   weight         uint8, ceil(N K / 2)            (two 4-bit codes a byte)
                              weight_absmax  uint8, 4 ceil(N K / 64)         (an fp32 absmax per 64 weights of
                                                                              the flattened W, as bytes)

Per weight: FP8 1 + 4/128^2 bytes, NF4 1/2 + 4/64 = 0.5625 bytes (0.28125 of bf16). Everything else is frozen in
the training dtype. `named_parameters` names the list as `model.named_parameters()` of a build does.

A checkpoint's config.json `quantization_config` fixes the format (`checkpoint_bits`): `quant_method: fp8` (a
`llama-ft quantize` checkpoint) is 8 bits, `quant_method: bitsandbytes` with `load_in_4bit` and
`bnb_4bit_quant_type: nf4` (the Hub's `*-bnb-4bit` repositories) is 4 bits; anything else is one line, as
training refuses it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_ft.checkpoint.gguf import check_not_gguf
from llama_ft.errors import UserError
from llama_ft.flags import LLAMA_LINEAR_NAMES, expand_targets

FP8_BLOCK = 128
"""Side of an FP8 scale block (llama_ft/fp8/format.py BLOCK)."""
NF4_BLOCK = 64
"""Weights per NF4 absmax (bitsandbytes' blocksize 64, along the flattened weight)."""
BITS = (4, 8)
"""What --bits takes (llama_ft/config.py): the quantized formats; 16 means no --quantize."""


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama that decide its memory."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 131072
    checkpoint_bits: int | None = None  # a pre-quantized checkpoint's format (8: FP8, 4: NF4): --quantize implied
    name: str = ""

    @property
    def prequantized(self) -> bool:
        return self.checkpoint_bits is not None

    @property
    def q_width(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each decoder-layer linear."""
        h, i = self.hidden_size, self.intermediate_size
        return {"q_proj": (self.q_width, h), "k_proj": (self.kv_width, h), "v_proj": (self.kv_width, h),
                "o_proj": (h, self.q_width), "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    def parameter_count(self) -> int:
        """Parameters of the bf16 model (no LoRA)."""
        per_layer = sum(o * i for o, i in self.linear_shapes().values()) + 2 * self.hidden_size
        heads = 1 if self.tie_word_embeddings else 2
        return self.num_hidden_layers * per_layer + heads * self.vocab_size * self.hidden_size + self.hidden_size


def _llama31(name: str, hidden: int, inter: int, layers: int, heads: int) -> ModelShape:
    return ModelShape(hidden, inter, layers, heads, 8, hidden // heads, 128256, False, 131072, None, name)


ALIASES = {
    "8b": _llama31("Llama 3.1 8B", 4096, 14336, 32, 32),
    "70b": _llama31("Llama 3.1 70B", 8192, 28672, 80, 64),
    "405b": _llama31("Llama 3.1 405B", 16384, 53248, 126, 128),
}

# LlamaConfig's defaults for the fields a config.json may leave out (transformers 5.x)
_LLAMA_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None,
                   "tie_word_embeddings": False, "max_position_embeddings": 2048, "attention_bias": False,
                   "mlp_bias": False}


def checkpoint_bits(qc: Any, where: str) -> int | None:
    """The bits of a pre-quantized checkpoint from its `quantization_config` (a config.json dict, or the
    object transformers may hold in its place); None for a plain checkpoint."""
    if qc is None or qc == {}:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)
    method = qc.get("quant_method")
    if method == "fp8":
        return 8
    supported = ("supported: a bitsandbytes checkpoint with load_in_4bit and bnb_4bit_quant_type nf4 (QLoRA's "
                 "format, --bits 4), or an FP8 one written by llama-ft quantize (--bits 8)")
    if method == "bitsandbytes":  # as llama_ft/nf4/checkpoint.py reads it (transformers writes both spellings)
        four, eight = (bool(qc.get(k) or qc.get(f"_{k}")) for k in ("load_in_4bit", "load_in_8bit"))
        if four and not eight and qc.get("bnb_4bit_quant_type", "fp4") == "nf4":
            return 4
        kind = ("8-bit (load_in_8bit)" if eight else
                f"4-bit {qc.get('bnb_4bit_quant_type', 'fp4')}" if four else "neither 4- nor 8-bit")
        raise UserError(f"{where}: quantization_config is bitsandbytes {kind}; {supported}")
    raise UserError(f"{where}: quantization_config quant_method is {method!r}; {supported}")


def shape_from_fields(get: Any, where: str, name: str) -> ModelShape:
    """ModelShape from a field getter `get(key, default)` (a config.json dict or a LlamaConfig)."""
    model_type = get("model_type", "llama")
    if model_type != "llama":
        raise UserError(f"{where}: model_type is {model_type!r}, expected 'llama'")
    v = {k: get(k, d) for k, d in _LLAMA_DEFAULTS.items()}
    if v["attention_bias"] or v["mlp_bias"]:
        raise UserError(f"{where}: attention_bias/mlp_bias is set; LoRA on linears with a bias is not supported")
    heads = v["num_attention_heads"]
    try:
        shape = ModelShape(int(v["hidden_size"]), int(v["intermediate_size"]), int(v["num_hidden_layers"]),
                           int(heads), int(v["num_key_value_heads"] or heads),
                           int(v["head_dim"] or v["hidden_size"] // heads), int(v["vocab_size"]),
                           bool(v["tie_word_embeddings"]), int(v["max_position_embeddings"]),
                           checkpoint_bits(get("quantization_config", None), where), name)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise UserError(f"{where}: not a usable Llama config ({e})") from None
    sizes = [shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers, shape.num_attention_heads,
             shape.num_key_value_heads, shape.head_dim, shape.vocab_size]
    if min(sizes) <= 0:
        raise UserError(f"{where}: every size must be > 0, got {sizes}")
    return shape


def shape_from_dir(model_dir: str | Path, flag: str = "--model_name_or_path") -> ModelShape:
    """The shape config.json describes (LlamaConfig's defaults for absent fields)."""
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{flag} {model_dir}: no config.json there (expected a Hugging Face model directory, "
                        f"or one of {', '.join(ALIASES)})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable JSON config ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object")
    return shape_from_fields(raw.get, str(path), Path(model_dir).name)


def shape_from_config(config: Any) -> ModelShape:
    """The shape of a transformers LlamaConfig (or a ModelShape, returned as is)."""
    if isinstance(config, ModelShape):
        return config
    return shape_from_fields(lambda k, d: getattr(config, k, d), "llama_config",
                             str(getattr(config, "name_or_path", "") or "llama_config"))


def resolve_model(spec: str, flag: str = "--model_name_or_path") -> ModelShape:
    """An alias (8b, 70b, 405b; case-insensitive) or a model directory."""
    alias = ALIASES.get(spec.lower())
    if alias is not None:
        return alias
    check_not_gguf(spec, flag)
    if not Path(spec).is_dir():
        raise UserError(f"{flag} {spec!r}: not a model alias ({', '.join(ALIASES)}) nor a model directory")
    return shape_from_dir(spec, flag)


@dataclass(frozen=True)
class Param:
    """One parameter as llama-ft builds it: `numel` elements of `itemsize` bytes, in module `module`.

    kind: "target" (the frozen base of a LoRA linear: weight, and with FP8 / NF4 its scale / absmax bytes),
    "frozen" (embeddings, norms, lm_head, non-target linears) or "lora" (A and B, trainable)."""

    name: str
    module: str
    numel: int
    itemsize: int
    kind: str

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


def fp8_scale_numel(out_features: int, in_features: int) -> int:
    """uint8 elements of the FP8 block scales: ceil(out/128) x ceil(in/128) fp32 values, 4 bytes each."""
    return math.ceil(out_features / FP8_BLOCK) * math.ceil(in_features / FP8_BLOCK) * 4


def nf4_packed_numel(out_features: int, in_features: int) -> int:
    """uint8 elements of the NF4 codes: two 4-bit codes a byte over the flattened weight, ceil(N K / 2)."""
    return math.ceil(out_features * in_features / 2)


def nf4_absmax_numel(out_features: int, in_features: int) -> int:
    """uint8 elements of the NF4 absmax: one fp32 per 64 weights of the flattened weight, 4 ceil(N K / 64)."""
    return 4 * math.ceil(out_features * in_features / NF4_BLOCK)


def base_bits(quantize: bool, bits: int, dtype_bytes: int) -> int:
    """Bits a frozen target weight is stored in: --bits when quantized, else the training dtype's."""
    return bits if quantize else 8 * dtype_bytes


def check_targets(targets: tuple[str, ...] | list[str] | str) -> tuple[str, ...]:
    """The explicit Llama linears of `--lora_target_modules` (groups expanded), in module order."""
    return tuple(expand_targets(targets))


def _linear(prefix: str, out_f: int, in_f: int, target: bool, r: int, bits: int, dtype_bytes: int) -> list[Param]:
    """`bits`: the stored bits of a target's frozen weight (base_bits): 4, 8, or 8 x dtype_bytes (unquantized)."""
    if not target:
        return [Param(f"{prefix}.weight", prefix, out_f * in_f, dtype_bytes, "frozen")]
    if bits == 4:
        base = [Param(f"{prefix}.weight", prefix, nf4_packed_numel(out_f, in_f), 1, "target"),
                Param(f"{prefix}.weight_absmax", prefix, nf4_absmax_numel(out_f, in_f), 1, "target")]
    elif bits == 8:
        base = [Param(f"{prefix}.weight", prefix, out_f * in_f, 1, "target"),
                Param(f"{prefix}.weight_scale", prefix, fp8_scale_numel(out_f, in_f), 1, "target")]
    else:
        base = [Param(f"{prefix}.weight", prefix, out_f * in_f, dtype_bytes, "target")]
    return base + [Param(f"{prefix}.lora_A.weight", prefix, r * in_f, dtype_bytes, "lora"),
                   Param(f"{prefix}.lora_B.weight", prefix, out_f * r, dtype_bytes, "lora")]


def layer_params(shape: ModelShape, layer: int, targets: tuple[str, ...], r: int, quantize: bool,
                 dtype_bytes: int, bits: int = 8) -> list[Param]:
    """One decoder layer's parameters in execution order (norm, q, k, v, o, norm, gate, up, down)."""
    h, pre = shape.hidden_size, f"model.layers.{layer}"
    out: list[Param] = []
    lin = shape.linear_shapes()
    stored = base_bits(quantize, bits, dtype_bytes)
    for block, names in (("self_attn", LLAMA_LINEAR_NAMES[:4]), ("mlp", LLAMA_LINEAR_NAMES[4:])):
        norm = "input_layernorm" if block == "self_attn" else "post_attention_layernorm"
        out.append(Param(f"{pre}.{norm}.weight", f"{pre}.{norm}", h, dtype_bytes, "frozen"))
        for n in names:
            out += _linear(f"{pre}.{block}.{n}", *lin[n], n in targets, r, stored, dtype_bytes)
    return out


def model_params(shape: ModelShape, targets: tuple[str, ...], r: int, quantize: bool, dtype_bytes: int,
                 bits: int = 8) -> list[Param]:
    """Every parameter of the LoRA model, in execution order (embeddings, layers, final norm, head); `bits`:
    the quantized format with `quantize` (8: FP8, 4: NF4)."""
    v, h = shape.vocab_size, shape.hidden_size
    params = [Param("model.embed_tokens.weight", "model.embed_tokens", v * h, dtype_bytes, "frozen")]
    for layer in range(shape.num_hidden_layers):
        params += layer_params(shape, layer, targets, r, quantize, dtype_bytes, bits)
    params.append(Param("model.norm.weight", "model.norm", h, dtype_bytes, "frozen"))
    if not shape.tie_word_embeddings:
        params.append(Param("lm_head.weight", "lm_head", v * h, dtype_bytes, "frozen"))
    return params


def named_parameters(params: list[Param]) -> dict[str, tuple[int, int, bool]]:
    """name -> (numel, element size, requires_grad) under the names `model.named_parameters()` gives a llama-ft
    build (LoRALinear holds lora_A and lora_B as parameters themselves, not as modules with a weight): what a
    test compares with a real build, meta or ZeRO-3 partitioned (there numel is `ds_numel`)."""
    return {p.name.removesuffix(".weight") if p.kind == "lora" else p.name: (p.numel, p.itemsize, p.kind == "lora")
            for p in params}
