"""What every architecture file provides, the registry it joins, and the tensor-parallel shard rules.

A `ModelSpec` knows one architecture: how its HF config maps to a TensorRT-LLM config, which HF tensors make
each TensorRT-LLM tensor (in the TP1 layout, the "canonical" tensor), and which `ShardRule` spreads that
tensor over the tensor-parallel ranks. `generator.convert.job` applies the rules; `generator.convert.inspect` undoes
them (`merge_shards`). Rules depend only on tensor names and the checkpoint's `ShardLayout`, so both
directions read the same table.

Besides conversion, the spec owns what the other stages would otherwise branch on by name: what INT8 KV
calibration needs to load the model with transformers (`calibration_model`, `adapt_transformers_config`),
what TensorRT-LLM's own model of the architecture refuses (`check_trtllm_build`), and a tiny random HF
checkpoint of the architecture (`tiny_hf_model`), which `generator.tiny` and the tests' parity sweep use.
A spec joins the registry with the `@register` decorator on its class; nothing else lists architectures.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import torch

from generator.errors import ConfigError
from generator.formats.hf_checkpoint import HFCheckpoint
from generator.formats.mapping import Mapping

RuleKind = Literal["replicated", "split", "vocab", "qkv", "experts", "experts_fc"]


@dataclass(frozen=True)
class ShardRule:
    """How one canonical (TP1) tensor is spread over the ranks of a tensor-parallel group.

    - `replicated`: every rank holds the whole tensor.
    - `split`: contiguous equal chunks along `dim`.
    - `vocab`: rows (dim 0) padded with zeros to a multiple of tp_size, then split (lm_head).
    - `qkv`: fused [Q; K; V] rows; Q, K and V split by heads, KV heads repeated when tp_size > kv heads,
      re-concatenated per rank as [Q_r; K_r; V_r].
    - `experts`: experts (dim 0) split over moe_ep ranks, then `dim` split over moe_tp ranks.
    - `experts_fc`: like `experts` on dim 1, but dim 1 is [up; gate] and each half is split separately.
    """

    kind: RuleKind
    dim: int = 0


REPLICATED = ShardRule("replicated")


@dataclass(frozen=True)
class ShardLayout:
    """The sizes the shard rules need, readable from a TensorRT-LLM checkpoint config alone."""

    num_attention_heads: int
    num_key_value_heads: int
    head_size: int
    vocab_size: int

    @classmethod
    def from_trtllm_config(cls, config: dict[str, Any]) -> ShardLayout:
        heads = int(config["num_attention_heads"])
        return cls(heads, int(config.get("num_key_value_heads") or heads),
                   int(config.get("head_size") or config["hidden_size"] // heads), int(config["vocab_size"]))


def chunk(tensor: torch.Tensor, parts: int, index: int, dim: int) -> torch.Tensor:
    """Part `index` of `parts` equal contiguous chunks along `dim` (the caller checked divisibility)."""
    size = tensor.shape[dim] // parts
    return tensor.narrow(dim, index * size, size)


def kv_heads_per_rank(num_key_value_heads: int, tensor_parallel_size: int) -> int:
    """KV heads each rank holds: KV heads are split when there are enough, else each rank holds one copy."""
    return max(1, num_key_value_heads // tensor_parallel_size)


def shard_tensor(tensor: torch.Tensor, rule: ShardRule, layout: ShardLayout, mapping: Mapping) -> torch.Tensor:
    """The part of a canonical tensor that `mapping`'s rank holds (a contiguous copy)."""
    tp, tp_rank = mapping.tensor_parallel_size, mapping.tp_rank
    if rule.kind == "replicated" or tp == 1 and rule.kind != "vocab":
        return tensor.contiguous()
    if rule.kind == "split":
        return chunk(tensor, tp, tp_rank, rule.dim).contiguous()
    if rule.kind == "vocab":
        rows = math.ceil(tensor.shape[0] / tp) * tp
        if rows != tensor.shape[0]:
            padding = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
            tensor = torch.cat([tensor, padding])
        return chunk(tensor, tp, tp_rank, 0).contiguous()
    if rule.kind == "qkv":
        q, k, v = _split_qkv(tensor, layout)
        q = chunk(q, tp, tp_rank, 0)
        kv_heads = layout.num_key_value_heads
        if kv_heads >= tp:
            k, v = chunk(k, tp, tp_rank, 0), chunk(v, tp, tp_rank, 0)
        else:  # rank r holds KV head r // (tp / kv): the heads its query heads attend with
            head = tp_rank // (tp // kv_heads)
            k, v = chunk(k, kv_heads, head, 0), chunk(v, kv_heads, head, 0)
        return torch.cat([q, k, v]).contiguous()
    if rule.kind in ("experts", "experts_fc"):
        local = chunk(tensor, mapping.moe_expert_parallel_size, mapping.moe_ep_rank, 0)
        moe_tp, moe_tp_rank = mapping.moe_tensor_parallel_size, mapping.moe_tp_rank
        if rule.kind == "experts":
            return chunk(local, moe_tp, moe_tp_rank, rule.dim).contiguous()
        up, gate = local.chunk(2, dim=1)
        return torch.cat([chunk(up, moe_tp, moe_tp_rank, 1), chunk(gate, moe_tp, moe_tp_rank, 1)], dim=1)
    raise ValueError(f"unknown shard rule {rule}")


def merge_shards(shards: list[torch.Tensor], rule: ShardRule, layout: ShardLayout,
                 mapping: Mapping) -> torch.Tensor:
    """Undo `shard_tensor`: `shards[i]` is tp rank i's tensor; returns the canonical tensor."""
    tp = mapping.tensor_parallel_size
    if rule.kind == "replicated" or tp == 1 and rule.kind != "vocab":
        return shards[0]
    if rule.kind == "split":
        return torch.cat(shards, dim=rule.dim)
    if rule.kind == "vocab":
        return torch.cat(shards)[: layout.vocab_size]
    if rule.kind == "qkv":
        local = ShardLayout(layout.num_attention_heads // tp,
                            kv_heads_per_rank(layout.num_key_value_heads, tp), layout.head_size,
                            layout.vocab_size)
        parts = [_split_qkv(shard, local) for shard in shards]
        # with repeated KV heads, the first rank of each group of tp / kv ranks holds the original copy
        kv_ranks = range(tp) if layout.num_key_value_heads >= tp else range(0, tp, tp // layout.num_key_value_heads)
        return torch.cat([torch.cat([p[0] for p in parts]), torch.cat([parts[r][1] for r in kv_ranks]),
                          torch.cat([parts[r][2] for r in kv_ranks])])
    if rule.kind in ("experts", "experts_fc"):
        ep, moe_tp = mapping.moe_expert_parallel_size, mapping.moe_tensor_parallel_size
        per_ep = []
        for ep_rank in range(ep):
            group = [shards[moe_tp_rank * ep + ep_rank] for moe_tp_rank in range(moe_tp)]
            if rule.kind == "experts":
                per_ep.append(torch.cat(group, dim=rule.dim))
            else:
                halves = [shard.chunk(2, dim=1) for shard in group]
                per_ep.append(torch.cat([torch.cat([h[0] for h in halves], dim=1),
                                         torch.cat([h[1] for h in halves], dim=1)], dim=1))
        return torch.cat(per_ep)
    raise ValueError(f"unknown shard rule {rule}")


def _split_qkv(tensor: torch.Tensor, layout: ShardLayout) -> tuple[torch.Tensor, ...]:
    q_rows = layout.num_attention_heads * layout.head_size
    kv_rows = layout.num_key_value_heads * layout.head_size
    if tensor.shape[0] != q_rows + 2 * kv_rows:
        raise ConfigError(f"fused qkv tensor has {tensor.shape[0]} rows, expected {q_rows + 2 * kv_rows} "
                          f"({layout.num_attention_heads} query + 2 x {layout.num_key_value_heads} kv heads of "
                          f"{layout.head_size})")
    return tuple(torch.split(tensor, [q_rows, kv_rows, kv_rows]))


# A canonical tensor, produced on demand from the HF checkpoint (so nothing is read before it is needed).
TensorSource = Callable[[HFCheckpoint], torch.Tensor]


@dataclass(frozen=True)
class CanonicalTensor:
    """One TensorRT-LLM tensor in its TP1 layout: its name (global layer index), how to read it, its rule."""

    name: str
    source: TensorSource
    rule: ShardRule


@dataclass(frozen=True)
class TinyShape:
    """Sizes of a tiny random checkpoint; a field left None takes the architecture's own default
    (e.g. MHA for KV heads, its usual FFN ratio). The names follow `generator.presets.Preset`."""

    hidden_size: int = 64
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    num_hidden_layers: int = 2
    vocab_size: int = 512
    max_position_embeddings: int = 128
    intermediate_size: int | None = None
    num_experts: int = 4
    experts_per_token: int = 2
    clip_qkv: float | None = None
    rope_theta: float | None = None


class ModelSpec(ABC):
    """All knowledge of one architecture. Construct from the HF config dict; raises ConfigError on
    anything unsupported, naming the config field."""

    name: ClassVar[str]  # short family name: tiny preset `tiny-<name>`, the `gen-repo models` arch column
    architecture: ClassVar[str]  # the TensorRT-LLM `architecture` string
    hf_model_types: ClassVar[tuple[str, ...]]  # HF config `model_type` values this spec reads
    hf_architectures: ClassVar[tuple[str, ...]] = ()  # HF `architectures` entries besides `architecture`
    # INT8 KV calibration: a regex over the HF model's module names matching the module whose output is the
    # fused QKV, group 1 the layer index
    calibration_qkv_modules: ClassVar[str]
    tiny_tokenizer: ClassVar[Literal["hf", "tiktoken"]] = "hf"  # the layout the real checkpoints ship

    def __init__(self, hf_config: dict[str, Any]) -> None:
        self.hf_config = hf_config

    # sizes every architecture has
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    intermediate_size: int
    max_seq_len: int  # the longest sequence the model was trained for (HF max_seq_len / max_position_embeddings)

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def shard_layout(self) -> ShardLayout:
        return ShardLayout(self.num_attention_heads, self.num_key_value_heads, self.head_size, self.vocab_size)

    def check_mapping(self, mapping: Mapping) -> None:
        """Reject a layout this model cannot be split into; the message names the flag and the field."""
        tp = mapping.tensor_parallel_size
        if self.num_attention_heads % tp:
            raise ConfigError(f"--tp-size {tp} does not divide the number of attention heads "
                              f"({self.num_attention_heads}, config n_heads)")
        kv = self.num_key_value_heads
        if kv % tp and tp % kv:
            raise ConfigError(f"--tp-size {tp} and the number of KV heads ({kv}, config attn_config.kv_n_heads) "
                              "are incompatible: one must divide the other")
        if mapping.pipeline_parallel_size > self.num_layers:
            raise ConfigError(f"--pp-size {mapping.pipeline_parallel_size} is larger than the number of layers "
                              f"({self.num_layers}, config n_layers)")

    def extensions(self) -> list[str]:
        """Features of this checkpoint beyond TensorRT-LLM's own model (read only by gen-repo's engine)."""
        return []

    @abstractmethod
    def trtllm_config(self, mapping: Mapping, dtype: str, quantization: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint's config.json (mapping is any rank of the layout): `decoder_config` plus the fields
        of this architecture."""

    def decoder_config(self, mapping: Mapping, dtype: str, quantization: dict[str, Any]) -> dict[str, Any]:
        """The config.json fields every decoder-only architecture writes the same way."""
        return {
            "architecture": self.architecture,
            "dtype": dtype,
            "logits_dtype": "float32",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_size": self.head_size,
            "max_position_embeddings": self.max_seq_len,
            "use_parallel_embedding": False,
            "embedding_sharding_dim": 0,
            "quantization": quantization,
            "mapping": mapping.to_json(),
        }

    @abstractmethod
    def layer_tensors(self, layer: int) -> list[CanonicalTensor]:
        """The canonical tensors of one decoder layer (names use the global layer index)."""

    @abstractmethod
    def first_stage_tensors(self) -> list[CanonicalTensor]:
        """Tensors of the first pipeline stage besides its layers (embeddings)."""

    @abstractmethod
    def last_stage_tensors(self) -> list[CanonicalTensor]:
        """Tensors of the last pipeline stage besides its layers (final norm, lm_head)."""

    @abstractmethod
    def expected_hf_tensors(self) -> dict[str, tuple[int, ...]]:
        """Every HF tensor the conversion reads, with its expected shape."""

    def optional_hf_tensors(self) -> set[str]:
        """HF tensors that may be present but are not read (e.g. a tied lm_head saved anyway)."""
        return set()

    @classmethod
    @abstractmethod
    def shard_rule(cls, name: str) -> ShardRule:
        """The rule of a TensorRT-LLM tensor name (any layer index)."""

    def check_hf_checkpoint(self, checkpoint: HFCheckpoint) -> None:
        """Fail before any work on missing, unknown or mis-shaped HF tensors (a spec may adapt to what the
        checkpoint holds, e.g. MPT biases transformers never saved)."""
        expected = self.expected_hf_tensors()
        present = set(checkpoint.names())
        missing = sorted(set(expected) - present)
        if missing:
            raise ConfigError(f"the HF checkpoint lacks {len(missing)} tensor(s) the config implies, e.g. "
                              f"{', '.join(missing[:3])}")
        unknown = sorted(present - set(expected) - self.optional_hf_tensors())
        if unknown:
            raise ConfigError(f"the HF checkpoint has {len(unknown)} tensor(s) this converter does not know "
                              f"(an unsupported variant?), e.g. {', '.join(unknown[:3])}")
        for name, shape in expected.items():
            if tuple(checkpoint.shape(name)) != tuple(shape):
                raise ConfigError(f"HF tensor {name} has shape {list(checkpoint.shape(name))}, the config implies "
                                  f"{list(shape)}")

    # --- what other stages ask the architecture -------------------------------------------------------------

    @classmethod
    def check_trtllm_build(cls, config: dict[str, Any], mapping: Mapping) -> None:
        """Refuse (ConfigError naming the field) a checkpoint config TensorRT-LLM's model of this architecture
        cannot build, or would build into a different model. Default: everything the converter writes."""
        return None

    def calibration_model(self, model_dir: Path, trust_remote_code: bool) -> torch.nn.Module | None:
        """The float32 CPU HF model INT8 KV calibration runs, when `AutoModelForCausalLM` cannot load it
        as is; None lets the caller use `AutoModelForCausalLM` (after `adapt_transformers_config`)."""
        return None

    @classmethod
    def adapt_transformers_config(cls, config: Any) -> None:
        """Fix, in place, what the installed transformers misreads in this architecture's config."""
        return None

    @classmethod
    @abstractmethod
    def tiny_hf_model(cls, shape: TinyShape, **hf_overrides: Any) -> torch.nn.Module:
        """A transformers model of this architecture with `shape`'s sizes (weights as transformers
        initialises them; `write_tiny_checkpoint` randomizes and saves it). `hf_overrides` are HF config
        fields, merged into nested dicts (e.g. `attn_config={"clip_qkv": 0.6}` keeps the other keys)."""

    def rank_tensors(self, mapping: Mapping) -> Iterator[tuple[str, CanonicalTensor]]:
        """(local name, canonical tensor) for every tensor `mapping`'s rank holds, layers renumbered locally."""
        layers = mapping.pp_layers(self.num_layers)
        if mapping.is_first_pp_rank:
            for tensor in self.first_stage_tensors():
                yield tensor.name, tensor
        for local, layer in enumerate(layers):
            prefix, local_prefix = f"transformer.layers.{layer}.", f"transformer.layers.{local}."
            for tensor in self.layer_tensors(layer):
                yield local_prefix + tensor.name.removeprefix(prefix), tensor
        if mapping.is_last_pp_rank:
            for tensor in self.last_stage_tensors():
                yield tensor.name, tensor


def hf_get(name: str) -> TensorSource:
    """A source that reads one HF tensor as is."""
    return lambda checkpoint: checkpoint.get(name)


def config_value(config: dict[str, Any], key: str, default: Any) -> Any:
    """`config[key]`, or `default` when the key is absent or null."""
    value = config.get(key)
    return default if value is None else value


def positive_int(config: dict[str, Any], key: str, where: str = "", default: Any = None) -> int:
    """`config[key]` as an int of at least 1; a ConfigError naming `where + key` otherwise.

    Absent (or null) with `default` None raises KeyError, so callers can report a missing field their way.
    """
    value = config.get(key)
    if value is None:
        if default is None:
            raise KeyError(key)
        value = default
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        number = int(value)
    else:
        raise ConfigError(f"{where}{key} {value!r} is not an integer")
    if number < 1:
        raise ConfigError(f"{where}{key} must be at least 1, got {value!r}")
    return number


def merged_config(defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`defaults` updated with `overrides`, nested dicts merged one level deep (`attn_config`, `ffn_config`)."""
    merged = dict(defaults)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


# A larger std than transformers' default so greedy logits are well separated and parity does not hinge on
# float rounding.
TINY_INIT_STD = 0.15


def randomize(model: torch.nn.Module, seed: int, quiet_token_ids: Sequence[int] = ()) -> None:
    """Deterministic random weights for a tiny model. The embedding / lm_head rows of `quiet_token_ids` are
    scaled down so greedy decoding (almost) never picks them (e.g. tokens that are not valid UTF-8 alone)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                # norms near 1 / biases near 0, but not exactly, so a converter that drops or misnames them
                # shows up in the parity tests
                base = 1.0 if name.endswith("weight") else 0.0
                parameter.copy_(base + 0.1 * torch.randn(parameter.shape, generator=generator))
            else:
                parameter.copy_(TINY_INIT_STD * torch.randn(parameter.shape, generator=generator))
        if quiet_token_ids:
            tables = [model.get_input_embeddings().weight]  # type: ignore[operator]
            output = model.get_output_embeddings()  # type: ignore[operator]
            if output is not None and output.weight is not tables[0]:
                tables.append(output.weight)
            for table in tables:
                table[list(quiet_token_ids)] *= 0.05


def write_tiny_checkpoint(spec_class: type[ModelSpec], out_dir: Path, shape: TinyShape | None = None, *,
                          seed: int = 0, quiet_token_ids: Sequence[int] = (), **hf_overrides: Any) -> Path:
    """Save a tiny random HF checkpoint of `spec_class`'s architecture to `out_dir` (weights only, no
    tokenizer) and return it; the same `seed` and arguments give the same bytes."""
    torch.manual_seed(seed)
    model = spec_class.tiny_hf_model(shape or TinyShape(), **hf_overrides).eval()
    randomize(model, seed, quiet_token_ids)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)  # type: ignore[operator]
    return out_dir


# --- the registry --------------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[ModelSpec]] = {}  # TensorRT-LLM architecture -> spec class, in registration order
SpecClass = TypeVar("SpecClass", bound=type[ModelSpec])


def register(spec_class: SpecClass) -> SpecClass:
    """Class decorator: make an architecture known to convert, inspect, calibration, trtllm-build's checks,
    the tiny models and the registry-wide parity test. Keyed by `architecture`, `hf_model_types` and
    `hf_architectures`, which must not collide with another spec's."""
    keys = {spec_class.architecture.lower(), *(t.lower() for t in spec_class.hf_model_types),
            *(a.lower() for a in spec_class.hf_architectures)}
    for other in _REGISTRY.values():
        if other is spec_class or other.__qualname__ == spec_class.__qualname__:
            continue  # a module imported twice registers the same class again
        taken = keys & {other.architecture.lower(), *(t.lower() for t in other.hf_model_types),
                        *(a.lower() for a in other.hf_architectures)}
        if taken:
            raise ValueError(f"{spec_class.__name__} claims {sorted(taken)}, already {other.__name__}'s")
    _REGISTRY[spec_class.architecture] = spec_class
    return spec_class


def registered_specs() -> dict[str, type[ModelSpec]]:
    """TensorRT-LLM architecture name -> spec class of every registered architecture."""
    return dict(_REGISTRY)
