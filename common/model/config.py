"""Model, cache and parallel configuration, built once at the edge and frozen.

`ModelConfig.from_hf` reads a Hugging Face `config.json` of a `Glm4MoeForCausalLM` checkpoint
(GLM-4.5, GLM-4.5-Air, GLM-4.6, GLM-4.7) and refuses anything it cannot serve with a message that
names the offending field. Field names follow the HF config so that a reader can map them 1:1.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("Glm4MoeForCausalLM",)
SUPPORTED_MODEL_TYPES = ("glm4_moe",)


class ConfigError(ValueError):
    """A config.json that glmserve cannot serve; the message names the field."""


@dataclass(frozen=True)
class QuantConfig:
    """An FP8 checkpoint's `quantization_config`, reduced to what the loader and kernels need.

    Two families exist for GLM: compressed-tensors `float-quantized` (the official releases: E4M3
    weights with one scale per output channel, or one per tensor; activations quantised per token at
    run time) and block FP8 (`quant_method: fp8` or compressed-tensors `strategy: block`: one
    `weight_scale_inv` per block of weights, activations quantised per 1 x block group).
    """

    method: str  # "compressed-tensors" | "fp8"
    weight_block_size: tuple[int, int] | None = None  # block FP8 only
    ignore: tuple[str, ...] = ()

    @property
    def block(self) -> int:
        """The block edge of a block-FP8 checkpoint; 0 for per-channel or per-tensor scales."""
        return self.weight_block_size[0] if self.weight_block_size else 0


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    partial_rotary_factor: float
    rope_theta: float
    rms_norm_eps: float
    attention_bias: bool
    use_qk_norm: bool
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    first_k_dense_replace: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    num_nextn_predict_layers: int
    hidden_act: str = "silu"
    torch_dtype: str = "bfloat16"
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    quant: QuantConfig | None = None
    architecture: str = "Glm4MoeForCausalLM"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    # ------------------------------------------------------------------ derived values
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def has_mtp(self) -> bool:
        return self.num_nextn_predict_layers > 0

    @property
    def mtp_layer_index(self) -> int:
        """Checkpoint index of the MTP/NextN layer (`model.layers.{L}`)."""
        return self.num_hidden_layers

    def is_moe_layer(self, layer: int) -> bool:
        """Main layers [0, first_k_dense_replace) are dense; the MTP layer is always MoE."""
        return layer >= self.first_k_dense_replace

    def fingerprint(self) -> str:
        """Stable hash of everything that shapes weights and numerics (used at P/D pairing)."""
        d = asdict(self)
        d.pop("extra", None)
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any]) -> ModelConfig:
        """Build from a model directory, a config.json path or an already-parsed dict."""
        raw = _read_config(source)
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        archs = raw.get("architectures") or []
        if not archs or archs[0] not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"config field 'architectures' is {archs!r}; glmserve serves only "
                f"{list(SUPPORTED_ARCHITECTURES)}"
            )
        if raw.get("model_type") not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"config field 'model_type' is {raw.get('model_type')!r}; expected 'glm4_moe'"
            )
        rope = raw.get("rope_parameters") or {}
        if raw.get("rope_scaling") not in (None, {}) and (raw["rope_scaling"] or {}).get(
            "rope_type", raw["rope_scaling"].get("type")
        ) not in (None, "default"):
            raise ConfigError(f"config field 'rope_scaling' = {raw['rope_scaling']!r} is not supported")
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"config field 'rope_parameters.rope_type' = {rope['rope_type']!r} is not supported")

        def need(name: str, *aliases: str) -> Any:
            for key in (name, *aliases):
                if key in raw and raw[key] is not None:
                    return raw[key]
            raise ConfigError(f"config field '{name}' is missing")

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        head_dim = raw.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ConfigError("config field 'head_dim' is missing and hidden_size/num_attention_heads "
                                  "is not an integer")
            head_dim = hidden // heads
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        cfg = cls(
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            moe_intermediate_size=int(need("moe_intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(need("num_key_value_heads")),
            head_dim=int(head_dim),
            partial_rotary_factor=float(rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 0.5))),
            rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            attention_bias=bool(raw.get("attention_bias", False)),
            use_qk_norm=bool(raw.get("use_qk_norm", False)),
            n_routed_experts=int(need("n_routed_experts", "num_local_experts")),
            n_shared_experts=int(raw.get("n_shared_experts", 1)),
            num_experts_per_tok=int(need("num_experts_per_tok")),
            n_group=int(raw.get("n_group", 1)),
            topk_group=int(raw.get("topk_group", 1)),
            first_k_dense_replace=int(raw.get("first_k_dense_replace", 1)),
            routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 131072)),
            num_nextn_predict_layers=int(raw.get("num_nextn_predict_layers", raw.get("num_mtp_layers", 0)) or 0),
            hidden_act=str(raw.get("hidden_act", "silu")),
            torch_dtype=str(raw.get("torch_dtype", raw.get("dtype", "bfloat16"))),
            eos_token_ids=tuple(int(x) for x in eos_ids),
            pad_token_id=raw.get("pad_token_id"),
            quant=_parse_quant(raw.get("quantization_config")),
            architecture=archs[0],
            extra={k: v for k, v in raw.items() if k not in _KNOWN_KEYS},
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Refuse inconsistent configs, naming the field at fault."""
        positive = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                    "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"config field '{name}' must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config field 'num_key_value_heads' ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ConfigError(f"config field 'partial_rotary_factor' must be in (0, 1], got "
                              f"{self.partial_rotary_factor}")
        if self.rotary_dim % 2:
            raise ConfigError(f"config field 'partial_rotary_factor' gives an odd rotary dim {self.rotary_dim}")
        if self.n_routed_experts % self.n_group:
            raise ConfigError(f"config field 'n_group' ({self.n_group}) must divide n_routed_experts "
                              f"({self.n_routed_experts})")
        if self.topk_group > self.n_group:
            raise ConfigError(f"config field 'topk_group' ({self.topk_group}) exceeds n_group ({self.n_group})")
        per_group = self.n_routed_experts // self.n_group
        if self.n_group > 1 and per_group < 2:
            raise ConfigError("config field 'n_group' leaves fewer than 2 experts per group "
                              "(group scores take the top-2)")
        if self.num_experts_per_tok > per_group * self.topk_group:
            raise ConfigError(
                f"config field 'num_experts_per_tok' ({self.num_experts_per_tok}) exceeds the experts "
                f"allowed by topk_group ({per_group * self.topk_group})")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ConfigError(f"config field 'first_k_dense_replace' ({self.first_k_dense_replace}) must be "
                              f"within [0, num_hidden_layers]")
        if self.num_nextn_predict_layers not in (0, 1):
            raise ConfigError(f"config field 'num_nextn_predict_layers' must be 0 or 1, got "
                              f"{self.num_nextn_predict_layers}")
        if self.hidden_act != "silu":
            raise ConfigError(f"config field 'hidden_act' must be 'silu', got {self.hidden_act!r}")
        if self.tie_word_embeddings:
            raise ConfigError("config field 'tie_word_embeddings' must be false for GLM-4 MoE")


_KNOWN_KEYS = {
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
    "moe_intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "partial_rotary_factor", "rope_theta", "rope_scaling", "rope_parameters",
    "rms_norm_eps", "attention_bias", "use_qk_norm", "n_routed_experts", "num_local_experts",
    "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group", "first_k_dense_replace",
    "routed_scaling_factor", "norm_topk_prob", "tie_word_embeddings", "max_position_embeddings",
    "num_nextn_predict_layers", "num_mtp_layers", "hidden_act", "torch_dtype", "dtype",
    "eos_token_id", "pad_token_id", "quantization_config",
}


def _read_config(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    if isinstance(source, dict):
        return dict(source)
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no config.json found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


_QC = "quantization_config"


def _parse_quant(q: dict[str, Any] | None) -> QuantConfig | None:
    """Accept the FP8 schemes the kernels implement; refuse anything else naming its field."""
    if not q:
        return None
    method = q.get("quant_method")
    if method == "compressed-tensors":
        return _parse_compressed_tensors(q)
    if method == "fp8":
        if q.get("activation_scheme", "dynamic") != "dynamic":
            raise ConfigError(f"config field '{_QC}.activation_scheme' = {q['activation_scheme']!r}: only dynamic "
                              "activation quantisation is supported (static input scales are not)")
        if q.get("fmt", "e4m3") != "e4m3":
            raise ConfigError(f"config field '{_QC}.fmt' = {q['fmt']!r}: only e4m3 FP8 weights are supported")
        block = q.get("weight_block_size")
        return QuantConfig(method=method, weight_block_size=_block_size(block, f"{_QC}.weight_block_size"),
                           ignore=tuple(q.get("ignored_layers", q.get("modules_to_not_convert", ())) or ()))
    raise ConfigError(f"config field '{_QC}.quant_method' = {method!r} is not supported "
                      "(supported: compressed-tensors FP8, fp8)")


def _parse_compressed_tensors(q: dict[str, Any]) -> QuantConfig:
    fmt = q.get("format", "float-quantized")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise ConfigError(f"config field '{_QC}.format' = {fmt!r} is not supported (float-quantized FP8 only)")
    if q.get("kv_cache_scheme"):
        raise ConfigError(f"config field '{_QC}.kv_cache_scheme' is set: an FP8 KV cache from the checkpoint "
                          "is not supported; the KV cache stays in the model dtype")
    groups = q.get("config_groups") or {}
    if not groups:
        raise ConfigError(f"config field '{_QC}.config_groups' is empty: nothing says how weights are quantised")
    blocks: set[tuple[int, int] | None] = set()
    for name, group in groups.items():
        field_ = f"{_QC}.config_groups.{name}"
        w = group.get("weights") or {}
        strategy = w.get("strategy")
        if w.get("num_bits") != 8 or w.get("type") != "float" or strategy not in ("channel", "tensor", "block"):
            raise ConfigError(f"config field '{field_}.weights' describes an unsupported scheme {w!r} "
                              "(FP8 E4M3 with channel, tensor or block scales only)")
        if w.get("symmetric") is False:
            raise ConfigError(f"config field '{field_}.weights.symmetric' is false: only symmetric FP8 is supported")
        blocks.add(_block_size(w.get("block_structure"), f"{field_}.weights.block_structure")
                   if strategy == "block" else None)
        a = group.get("input_activations")
        if a is not None:
            a_strategy = a.get("strategy")
            if a.get("num_bits") != 8 or a.get("type") != "float" or not a.get("dynamic"):
                raise ConfigError(f"config field '{field_}.input_activations' = {a!r}: only dynamic FP8 activation "
                                  "quantisation is supported (static input scales are not)")
            if a_strategy not in ("token", "group", None):
                raise ConfigError(f"config field '{field_}.input_activations.strategy' = {a_strategy!r}: "
                                  "activations are quantised per token (or per group with block weights)")
        if group.get("output_activations"):
            raise ConfigError(f"config field '{field_}.output_activations' is set: output quantisation is not "
                              "supported")
    if len(blocks) > 1:
        raise ConfigError(f"config field '{_QC}.config_groups' mixes block and non-block weight scales")
    return QuantConfig(method="compressed-tensors", weight_block_size=blocks.pop(), ignore=tuple(q.get("ignore", ())))


def _block_size(block: Any, field_: str) -> tuple[int, int] | None:
    """A square [b, b] block edge; None when absent."""
    if block is None:
        return None
    if (not isinstance(block, (list, tuple)) or len(block) != 2 or not all(isinstance(b, int) for b in block)
            or block[0] != block[1] or block[0] < 1):
        raise ConfigError(f"config field '{field_}' = {block!r}: expected a square block [b, b] of positive ints")
    return (block[0], block[1])


@dataclass(frozen=True)
class CacheConfig:
    page_size: int = 16
    num_pages: int = 0  # 0 = size from memory
    dtype: str = "auto"  # "auto" = model dtype


@dataclass(frozen=True)
class SpecConfig:
    """EAGLE settings (SGLang names). `algorithm` None = speculation off."""

    algorithm: str | None = None
    num_steps: int = 3
    eagle_topk: int = 1
    num_draft_tokens: int = 4

    @property
    def enabled(self) -> bool:
        return self.algorithm is not None

    @property
    def step_slots(self) -> int:
        return eagle_step_slots(self.num_steps, self.eagle_topk, self.num_draft_tokens)


def eagle_step_slots(num_steps: int, topk: int, num_draft_tokens: int) -> int:
    """KV slots one EAGLE step may write past a request's length: the N verify nodes, the (S-1)k draft
    scratch slots, the S+1 queries of the fixed-shape draft extend."""
    return max(num_draft_tokens, (num_steps - 1) * topk, num_steps + 1)


def validate_spec_config(num_steps: int, topk: int, num_draft_tokens: int) -> tuple[int, str | None]:
    """Check (S, k, N) as SGLang does; return (N to use, warning text or None). Raises ValueError."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"speculative_num_steps must be an integer >= 1 (got {num_steps!r})")
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"speculative_eagle_topk must be an integer >= 1 (got {topk!r})")
    if not isinstance(num_draft_tokens, int) or num_draft_tokens < 2:
        raise ValueError(
            f"speculative_num_draft_tokens must be an integer >= 2, the root plus at least one draft "
            f"(got {num_draft_tokens!r})"
        )
    if topk == 1:
        if num_draft_tokens != num_steps + 1:
            return num_steps + 1, (
                f"speculative_num_draft_tokens is adjusted from {num_draft_tokens} to speculative_num_steps + 1 "
                f"= {num_steps + 1} when speculative_eagle_topk == 1"
            )
        return num_draft_tokens, None
    max_candidates = topk + (num_steps - 1) * topk * topk
    if num_draft_tokens - 1 > max_candidates:
        raise ValueError(
            f"speculative_num_draft_tokens - 1 = {num_draft_tokens - 1} exceeds the {max_candidates} draft "
            f"candidates of speculative_eagle_topk={topk}, speculative_num_steps={num_steps} "
            f"(k + (S-1)*k^2); lower speculative_num_draft_tokens or raise the other two"
        )
    return num_draft_tokens, None
