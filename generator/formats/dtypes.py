"""The one dtype table: each dtype's name, torch dtype, safetensors code, Triton type, numpy type and size.

Checkpoint and engine `config.json` files name a model's dtype as TensorRT-LLM does (`float16`, `bfloat16`,
`float32`); safetensors headers use codes (`F16`, `BF16`, ...); Triton model configs use `TYPE_FP16`, ... .
Every translation between them reads this table, and the CLI's `--dtype` choices come from `MODEL_DTYPES`.
torch and numpy are imported only when a row's `torch` / `numpy` is asked for, so the CLI can read the table
without loading them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from generator.errors import ConfigError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    """One dtype under all the names the on-disk formats give it."""

    name: str                 # TensorRT-LLM's, torch's and numpy's name: "bfloat16"
    safetensors: str          # the safetensors header code: "BF16"
    triton: str               # the Triton model config type: "TYPE_BF16"
    itemsize: int             # bytes per element
    aliases: tuple[str, ...] = ()
    in_numpy: bool = True     # numpy has no bfloat16

    @property
    def torch(self) -> torch.dtype:
        import torch

        dtype: torch.dtype = getattr(torch, self.name)
        return dtype

    @property
    def numpy(self) -> Any:
        """The numpy scalar type; None where numpy has none (bfloat16)."""
        import numpy as np

        return np.dtype(self.name).type if self.in_numpy else None


DTYPES: tuple[DType, ...] = (
    DType("float64", "F64", "TYPE_FP64", 8, ("fp64", "double")),
    DType("float32", "F32", "TYPE_FP32", 4, ("fp32", "float")),
    DType("float16", "F16", "TYPE_FP16", 2, ("fp16", "half")),
    DType("bfloat16", "BF16", "TYPE_BF16", 2, ("bf16",), in_numpy=False),
    DType("int64", "I64", "TYPE_INT64", 8),
    DType("int32", "I32", "TYPE_INT32", 4),
    DType("int16", "I16", "TYPE_INT16", 2),
    DType("int8", "I8", "TYPE_INT8", 1),
    DType("uint8", "U8", "TYPE_UINT8", 1),
    DType("bool", "BOOL", "TYPE_BOOL", 1),
)

#: The dtypes a model (checkpoint, engine) can be in: what `--dtype` takes besides `auto`, and what
#: trtllm-build's plugins take.
MODEL_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
#: `--dtype` / `--hf-dtype` choices: `auto` (the checkpoint's or engine's own dtype) or a model dtype.
DTYPE_CHOICES: tuple[str, ...] = ("auto", *MODEL_DTYPES)

_BY_NAME = {name: dtype for dtype in DTYPES for name in (dtype.name, *dtype.aliases)}
_BY_SAFETENSORS = {dtype.safetensors: dtype for dtype in DTYPES}


def dtype_named(name: str) -> DType:
    """The dtype of a name or alias (`bfloat16`, `bf16`); ConfigError for any other."""
    if name not in _BY_NAME:
        raise ConfigError(f"dtype {name!r} is unknown (use one of {', '.join(d.name for d in DTYPES)})")
    return _BY_NAME[name]


def model_dtype(name: str) -> DType:
    """A model dtype (float32, float16, bfloat16 or an alias of one); ConfigError for any other."""
    dtype = _BY_NAME.get(name)
    if dtype is None or dtype.name not in MODEL_DTYPES:
        raise ConfigError(f"dtype {name!r} is not supported (use one of {', '.join(MODEL_DTYPES)})")
    return dtype


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a name or alias."""
    return dtype_named(name).torch


def is_model_dtype(name: str) -> bool:
    return name in _BY_NAME and _BY_NAME[name].name in MODEL_DTYPES


def from_safetensors(code: str) -> DType | None:
    """The dtype of a safetensors header code (`BF16`), None for codes gen-repo does not read (e.g. F8_E4M3)."""
    return _BY_SAFETENSORS.get(code)


def from_torch(dtype: torch.dtype) -> DType | None:
    """The table's row of a torch dtype, None when safetensors (and so gen-repo's files) cannot hold it."""
    return _BY_NAME.get(str(dtype).removeprefix("torch."))


def triton_type(name: str, default: str | None = None) -> str:
    """The Triton config type (`TYPE_BF16`) of a dtype name; `default` (or ConfigError) for unknown names."""
    dtype = _BY_NAME.get(name)
    if dtype is not None:
        return dtype.triton
    if default is not None:
        return default
    raise ConfigError(f"dtype {name!r} has no Triton type (use one of {', '.join(d.name for d in DTYPES)})")


#: TensorRT-LLM keeps these tensors in float32 whatever the model dtype: the MoE router (top-k over float32
#: logits) and the INT8 KV-cache scaling factors.
_FLOAT32_SUFFIXES = ("mlp.router.weight",)
_FLOAT32_MARKERS = ("kv_cache_",)


def keeps_float32(name: str) -> bool:
    """Whether the TensorRT-LLM tensor `name` stays float32 in a checkpoint of any dtype."""
    return name.endswith(_FLOAT32_SUFFIXES) or any(marker in name for marker in _FLOAT32_MARKERS)


def stored_dtype(name: str, model: torch.dtype) -> torch.dtype:
    """The dtype tensor `name` is written and loaded in for a model in `model` dtype."""
    import torch

    return torch.float32 if keeps_float32(name) else model
