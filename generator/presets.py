"""Built-in model presets: Hugging Face ids, the real config.json dimensions and default build limits.

The dimensions are those of each model's published `config.json`; they let `gen-repo models` say how big a
model is and which parallel layouts fit, without downloading anything. The default build limits follow the
build commands of TensorRT-LLM's examples for each architecture.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from generator.build import DEFAULT_MAX_INPUT_LEN, DEFAULT_MAX_SEQ_LEN, BuildSettings
from generator.convert import ConvertSettings
from generator.errors import GenRepoError
from generator.formats.dtypes import MODEL_DTYPES, dtype_named

GIB = 1024**3
DEFAULT_GPU_MEMORY_GIB = 80.0  # `gen-repo models --gpu-memory`: an 80 GB H100 / A100

# Bytes per weight for each storage format. Weight-only formats keep norms and embeddings in 16 bits; the
# estimate below ignores that (it is a few percent for these models).
BYTES_PER_WEIGHT: dict[str, float] = {
    **{name: float(dtype_named(name).itemsize) for name in MODEL_DTYPES}, "int8_wo": 1.0, "int4_wo": 0.5,
}


@dataclass(frozen=True)
class Preset:
    """One model gen-repo knows by name: its dimensions, the dtype it converts to, and the build limits and
    parallel layout where they differ from the steps' defaults (BuildSettings, ConvertSettings)."""

    name: str
    hf_id: str | None                # None for the offline tiny models
    architecture: str                # a registered architecture (generator.convert.models), by its TensorRT-LLM name
    description: str
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    vocab_size: int
    intermediate_size: int           # MPT: expansion_ratio * d_model; DBRX: one expert's ffn_hidden_size
    max_position_embeddings: int
    position_embedding_type: str     # "alibi" or "rope_gpt_neox"
    dtype: str                       # checkpoint dtype of the whole job (convert's own default keeps the HF one)
    bias: bool = False
    tie_word_embeddings: bool = True
    num_experts: int = 0
    experts_per_token: int = 0
    clip_qkv: float | None = None
    rope_theta: float | None = None
    # Build limits (engine dir `build_config`).
    max_batch_size: int = BuildSettings.max_batch_size
    max_input_len: int = DEFAULT_MAX_INPUT_LEN
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    # Parallel layout of the conversion.
    tensor_parallel_size: int = ConvertSettings.tensor_parallel_size
    pipeline_parallel_size: int = ConvertSettings.pipeline_parallel_size
    offline: bool = False            # built by generator.tiny, needs no checkpoint

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def family(self) -> str:
        """The registered architecture's short name ("mpt"), for messages and `gen-repo models`."""
        from generator.convert.models import spec_class  # imports torch: only when asked

        return spec_class(self.architecture).name

    @property
    def hf_model_types(self) -> tuple[str, ...]:
        """HF `model_type` values of the registered architecture."""
        from generator.convert.models import spec_class

        return spec_class(self.architecture).hf_model_types

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def parameter_count(self) -> int:
        """Number of weights, counted from the dimensions the way the checkpoint stores them."""
        d, layers = self.hidden_size, self.num_hidden_layers
        qkv = d * (d + 2 * self.num_key_value_heads * self.head_dim)
        attention = qkv + d * d
        if self.is_moe:
            # router + per expert: gate (w1), up (v1), down (w2)
            mlp = self.num_experts * d + self.num_experts * 3 * self.intermediate_size * d
        else:
            mlp = 2 * self.intermediate_size * d
        norms = 2 * d
        biases = (d + 2 * self.num_key_value_heads * self.head_dim + d + self.intermediate_size + d) if self.bias else 0
        embeddings = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return layers * (attention + mlp + norms + biases) + embeddings + d

    def weight_bytes(self, weight_format: str) -> int:
        """Bytes of weights in one of `BYTES_PER_WEIGHT`'s formats."""
        return int(self.parameter_count() * BYTES_PER_WEIGHT[weight_format])

    def fitting_layouts(self, weight_format: str, gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB,
                        usable_fraction: float = 0.9, world_sizes: tuple[int, ...] = (1, 2, 4, 8)) -> list[int]:
        """World sizes (TP, or TP x PP) whose per-GPU share of the weights fits in `usable_fraction` of a GPU.

        The rest of the memory is left to activations and the KV cache; this is a lower bound on what a layout
        needs, not a promise that any batch size fits.
        """
        per_gpu_budget = gpu_memory_gib * GIB * usable_fraction
        return [n for n in world_sizes if self.weight_bytes(weight_format) / n <= per_gpu_budget]


# TensorRT-LLM's MPT example builds with --max_batch_size 32 --max_input_len 1024 --max_seq_len 1536
# (MPT-30B: float16 at TP 4).
_MPT_7B = Preset(
    name="mpt-7b", hf_id="mosaicml/mpt-7b", architecture="MPTForCausalLM", description="MosaicML MPT-7B base",
    hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, num_hidden_layers=32, vocab_size=50432,
    intermediate_size=4 * 4096, max_position_embeddings=2048, position_embedding_type="alibi",
    max_batch_size=32, max_input_len=1024, max_seq_len=1536, dtype="float16")
_MPT_30B = replace(
    _MPT_7B, name="mpt-30b", hf_id="mosaicml/mpt-30b", description="MosaicML MPT-30B base",
    hidden_size=7168, num_attention_heads=64, num_key_value_heads=64, num_hidden_layers=48,
    intermediate_size=4 * 7168, max_position_embeddings=8192, tensor_parallel_size=4)
# MPT architecture with grouped-query attention; the build limits are those of the FasterTransformer-era
# Replit example (batch 16, input 512, 64 new tokens).
_REPLIT = replace(
    _MPT_7B, name="replit-code-v1.5-3b", hf_id="replit/replit-code-v1_5-3b",
    description="Replit Code v1.5 3B (MPT with GQA)", hidden_size=3072, num_attention_heads=24,
    num_key_value_heads=8, num_hidden_layers=32, vocab_size=32768, intermediate_size=4 * 3072,
    max_position_embeddings=4096, max_batch_size=16, max_input_len=512, max_seq_len=512 + 64, dtype="bfloat16")
# TensorRT-LLM's DBRX example passes no limits to trtllm-build (its defaults: max_batch_size 256,
# max_input_len 1024, max_seq_len = the model's max_position_embeddings) and converts bf16 at TP 8.
_DBRX_BASE = Preset(
    name="dbrx-base", hf_id="databricks/dbrx-base", architecture="DbrxForCausalLM",
    description="Databricks DBRX base (132B MoE)", hidden_size=6144, num_attention_heads=48,
    num_key_value_heads=8, num_hidden_layers=40, vocab_size=100352, intermediate_size=10752,
    max_position_embeddings=32768, position_embedding_type="rope_gpt_neox", tie_word_embeddings=False,
    num_experts=16, experts_per_token=4, clip_qkv=8.0, rope_theta=500000.0,
    max_batch_size=256, max_input_len=1024, max_seq_len=32768, dtype="bfloat16", tensor_parallel_size=8)
_DBRX_INSTRUCT = replace(_DBRX_BASE, name="dbrx-instruct", hf_id="databricks/dbrx-instruct",
                         description="Databricks DBRX instruct (132B MoE)")
_TINY_MPT = Preset(
    name="tiny-mpt", hf_id=None, architecture="MPTForCausalLM", offline=True,
    description="tiny random MPT (ALiBi, no bias) + byte-level BPE tokenizer, built offline",
    hidden_size=128, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2, vocab_size=1000,
    intermediate_size=512, max_position_embeddings=256, position_embedding_type="alibi",
    max_batch_size=4, max_input_len=64, max_seq_len=128, dtype="float32")
_TINY_DBRX = replace(
    _DBRX_BASE, name="tiny-dbrx", hf_id=None, offline=True,
    description="tiny random DBRX (GQA, 4 experts top 2, clip_qkv) + tiktoken tokenizer, built offline",
    hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, vocab_size=1000,
    intermediate_size=128, max_position_embeddings=256, num_experts=4, experts_per_token=2,
    max_batch_size=4, max_input_len=64, max_seq_len=128, dtype="float32", tensor_parallel_size=1)

PRESETS: dict[str, Preset] = {p.name: p for p in (_TINY_MPT, _TINY_DBRX, _MPT_7B, _MPT_30B, _REPLIT, _DBRX_BASE,
                                                  _DBRX_INSTRUCT)}


def get_preset(name: str) -> Preset:
    """The preset called `name`; a `GenRepoError` listing the known presets otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise GenRepoError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)} "
                           "(or pass a local Hugging Face checkpoint directory)") from None


def resolve_checkpoint(preset: Preset, model_dir: Path | None = None, *, trust_remote_code: bool = False,
                       download_timeout_s: float = 30.0) -> Path:
    """The local Hugging Face checkpoint dir for a real (non-tiny) preset.

    Uses `model_dir` when given; otherwise tries the hub (only when HF_HUB_OFFLINE is not set) and fails with a
    message saying how to pass a local directory. Remote code is never fetched unless `trust_remote_code`.
    """
    if model_dir is not None:
        if not (model_dir / "config.json").is_file():
            raise GenRepoError(f"{model_dir} has no config.json: pass a Hugging Face checkpoint directory")
        from generator.formats.hf_checkpoint import read_hf_config  # torch: only when a checkpoint is read

        model_type = read_hf_config(model_dir).get("model_type")
        expected = preset.family
        if model_type is not None and model_type not in preset.hf_model_types:
            raise GenRepoError(f"{model_dir} holds a {model_type!r} checkpoint, but preset {preset.name} is "
                               f"{expected!r}: pick the matching preset or pass the directory as --model DIR")
        return model_dir
    how = (f"download {preset.hf_id} elsewhere (e.g. `hf download {preset.hf_id} --local-dir DIR`) "
           f"and pass it with `gen-repo --model {preset.name} --model-dir DIR` or `gen-repo --model DIR`")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise GenRepoError(f"preset {preset.name} needs its checkpoint and HF_HUB_OFFLINE is set: {how}")
    assert preset.hf_id is not None
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise GenRepoError(f"preset {preset.name} needs its checkpoint and huggingface_hub is missing: {how}") from None
    patterns = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt"]
    if trust_remote_code:
        patterns.append("*.py")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(download_timeout_s)))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(download_timeout_s)))
    try:
        return Path(snapshot_download(preset.hf_id, allow_patterns=patterns))
    except Exception as error:  # network, auth (DBRX is gated), disk: all end the same way for the user
        raise GenRepoError(f"could not fetch {preset.hf_id} from the Hugging Face hub "
                           f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}): {how}") from None


def models_table(gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB) -> str:
    """The text `gen-repo models` prints: size, bytes per weight format and fitting layouts for each preset."""
    formats = list(BYTES_PER_WEIGHT)
    header = (f"{'preset':<22} {'hf id':<28} {'arch':<6} {'params':>9}  "
              + "  ".join(f"{f:>9}" for f in formats))
    lines = [header, "-" * len(header)]
    for preset in PRESETS.values():
        arch = preset.family
        sizes = "  ".join(f"{_human_bytes(preset.weight_bytes(f)):>9}" for f in formats)
        lines.append(f"{preset.name:<22} {preset.hf_id or '(offline)':<28} {arch:<6} "
                     f"{_human_count(preset.parameter_count()):>9}  {sizes}")
    lines.append("")
    lines.append(f"World sizes (TP, or TP x PP) whose weights fit in 90% of {gpu_memory_gib:g} GiB GPUs:")
    lines.append(f"{'preset':<22} " + "  ".join(f"{f:>9}" for f in formats) + "   default build")
    for preset in PRESETS.values():
        cells = []
        for weight_format in formats:
            sizes_ok = preset.fitting_layouts(weight_format, gpu_memory_gib)
            cells.append(f"{','.join(map(str, sizes_ok)) or '-':>9}")
        lines.append(f"{preset.name:<22} " + "  ".join(cells)
                     + f"   {preset.dtype} TP{preset.tensor_parallel_size}, batch {preset.max_batch_size}, "
                     f"input {preset.max_input_len}, seq {preset.max_seq_len}")
    return "\n".join(lines)


def _human_count(count: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


def _human_bytes(count: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return f"{count:.0f}B"
