"""Rank layout of a tensor/pipeline/expert-parallel model, as TensorRT-LLM's `Mapping` defines it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from generator.errors import ConfigError


@dataclass(frozen=True)
class Mapping:
    """Where one rank sits in a world of `tensor_parallel_size * pipeline_parallel_size` ranks.

    Ranks are numbered `pp_rank * tp + tp_rank`. MoE layers split the tensor-parallel group once more into
    `moe_tensor_parallel_size * moe_expert_parallel_size` (their product must be the TP size):
    `moe_ep_rank = tp_rank % moe_ep` and `moe_tp_rank = tp_rank // moe_ep`.
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    moe_tensor_parallel_size: int = 1
    moe_expert_parallel_size: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "moe_tensor_parallel_size",
                     "moe_expert_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.moe_tensor_parallel_size * self.moe_expert_parallel_size != self.tensor_parallel_size:
            raise ConfigError(
                f"moe_tp_size ({self.moe_tensor_parallel_size}) x moe_ep_size ({self.moe_expert_parallel_size}) "
                f"must equal tp_size ({self.tensor_parallel_size})")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is outside a world of {self.world_size} ranks")

    @classmethod
    def create(cls, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
               moe_tensor_parallel_size: int | None = None, moe_expert_parallel_size: int | None = None,
               rank: int = 0) -> Mapping:
        """Fill in the MoE sizes the way TensorRT-LLM's converters do: neither given -> moe_tp = tp;
        one given -> the other is tp / given."""
        tp = tensor_parallel_size
        if moe_tensor_parallel_size is None and moe_expert_parallel_size is None:
            moe_tp, moe_ep = tp, 1
        elif moe_tensor_parallel_size is None:
            assert moe_expert_parallel_size is not None
            if moe_expert_parallel_size < 1 or tp % moe_expert_parallel_size:
                raise ConfigError(f"moe_ep_size {moe_expert_parallel_size} does not divide tp_size {tp}")
            moe_tp, moe_ep = tp // moe_expert_parallel_size, moe_expert_parallel_size
        elif moe_expert_parallel_size is None:
            if moe_tensor_parallel_size < 1 or tp % moe_tensor_parallel_size:
                raise ConfigError(f"moe_tp_size {moe_tensor_parallel_size} does not divide tp_size {tp}")
            moe_tp, moe_ep = moe_tensor_parallel_size, tp // moe_tensor_parallel_size
        else:
            moe_tp, moe_ep = moe_tensor_parallel_size, moe_expert_parallel_size
        return cls(tp, pipeline_parallel_size, moe_tp, moe_ep, rank)

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tensor_parallel_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tensor_parallel_size

    @property
    def moe_ep_rank(self) -> int:
        return self.tp_rank % self.moe_expert_parallel_size

    @property
    def moe_tp_rank(self) -> int:
        return self.tp_rank // self.moe_expert_parallel_size

    @property
    def is_first_pp_rank(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_pp_rank(self) -> bool:
        return self.pp_rank == self.pipeline_parallel_size - 1

    def with_rank(self, rank: int) -> Mapping:
        return Mapping(self.tensor_parallel_size, self.pipeline_parallel_size, self.moe_tensor_parallel_size,
                       self.moe_expert_parallel_size, rank)

    def pp_layers(self, num_layers: int) -> list[int]:
        """Global indices of the layers this rank's pipeline stage holds (torch.tensor_split semantics:
        contiguous ranges, the first `num_layers % pp` stages get one extra layer)."""
        pp = self.pipeline_parallel_size
        if pp > num_layers:
            raise ConfigError(f"pp_size {pp} is larger than the model's {num_layers} layers")
        base, extra = divmod(num_layers, pp)
        start = self.pp_rank * base + min(self.pp_rank, extra)
        count = base + (1 if self.pp_rank < extra else 0)
        return list(range(start, start + count))

    def tp_group(self) -> list[int]:
        """Ranks of this rank's tensor-parallel group."""
        first = self.pp_rank * self.tensor_parallel_size
        return list(range(first, first + self.tensor_parallel_size))

    def pp_group(self) -> list[int]:
        """Ranks that hold the same tensor-parallel shard across pipeline stages."""
        return [p * self.tensor_parallel_size + self.tp_rank for p in range(self.pipeline_parallel_size)]

    def to_json(self) -> dict[str, Any]:
        """The `mapping` section of a TensorRT-LLM checkpoint config."""
        return {
            "world_size": self.world_size,
            "tp_size": self.tensor_parallel_size,
            "pp_size": self.pipeline_parallel_size,
            "moe_tp_size": self.moe_tensor_parallel_size,
            "moe_ep_size": self.moe_expert_parallel_size,
        }

    @classmethod
    def from_json(cls, section: dict[str, Any], rank: int = 0) -> Mapping:
        """Read a checkpoint's `mapping` section (missing MoE sizes default as TensorRT-LLM does)."""
        return cls.create(int(section.get("tp_size", 1)), int(section.get("pp_size", 1)),
                          section.get("moe_tp_size"), section.get("moe_ep_size"), rank)
