"""Build an engine dir from a TensorRT-LLM checkpoint.

- `pytorch`: the engine dir of docs/DESIGN.md: `config.json` (`version`, `engine_backend`, the checkpoint's
  config verbatim as `pretrained_config`, `build_config` with the limits) and `rank{r}.safetensors`: hard links
  to the checkpoint's files (copied when a link is impossible, e.g. across file systems), or, for a weight-only
  checkpoint (float weights + quant_algo W8A16/W4A16), the weights quantized into the engine's own plain layout
  (`generator.quantize`: int8 / packed int4 `[in, out]` + `per_channel_scale`), as trtllm-build quantizes into
  its GPU's layout.
- `tensorrtllm`: the real `trtllm-build`, through `generator.trtllm_build.build_with_trtllm`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from generator import __version__
from generator.engine.config import parse_pretrained_config, read_config_json
from generator.errors import ConfigError, GenRepoError
from generator.hf_checkpoint import read_safetensors_header

ENGINE_BACKENDS = ("pytorch", "tensorrtllm")
DEFAULT_MAX_NUM_TOKENS = 8192  # trtllm-build's default
DEFAULT_MAX_INPUT_LEN = 1024  # trtllm-build's default
DEFAULT_MAX_SEQ_LEN = 2048  # trtllm-build's, for a checkpoint without max_position_embeddings
WEIGHT_ONLY_PRECISIONS = {"W8A16": "int8", "W4A16": "int4"}


@dataclass(frozen=True)
class BuildSettings:
    """Inputs of `build_engine`; limits are per engine, as trtllm-build takes them.

    `max_seq_len` None: the checkpoint's max_position_embeddings (2048 when unset, as trtllm-build does).
    `max_input_len` None: min(1024, max_seq_len / 2), the whole job's rule, so defaults fit any checkpoint.
    `max_num_tokens` None: min(8192, max_batch_size x max_input_len), at least max_input_len.
    Plugin flags and `paged_kv_cache` / `remove_input_padding` only matter to trtllm-build; the pytorch
    backend records them in `build_config`.
    """

    checkpoint_dir: Path
    output_dir: Path
    engine_backend: str = "pytorch"
    max_batch_size: int = 8
    max_input_len: int | None = None
    max_seq_len: int | None = None
    max_num_tokens: int | None = None
    max_beam_width: int = 1
    workers: int = 1
    gpt_attention_plugin: str = "auto"
    gemm_plugin: str = "auto"
    moe_plugin: str = "auto"
    paged_kv_cache: bool = True
    remove_input_padding: bool = True
    dry_run: bool = False


@dataclass(frozen=True)
class EngineLimits:
    """The resolved limits written to `build_config`."""

    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int
    max_beam_width: int


def default_max_input_len(max_seq_len: int) -> int:
    """The prompt limit when none is given: 1024 (trtllm-build's), at most half of `max_seq_len`."""
    return max(1, min(DEFAULT_MAX_INPUT_LEN, max_seq_len // 2))


def resolve_limits(settings: BuildSettings, pretrained: dict[str, Any]) -> EngineLimits:
    """Fill in the defaults and check the limits against each other and against the checkpoint.

    A limit given as 0 or less is an error, never replaced by a default.
    """
    for name, given in (("max_batch_size", settings.max_batch_size), ("max_input_len", settings.max_input_len),
                        ("max_seq_len", settings.max_seq_len), ("max_num_tokens", settings.max_num_tokens),
                        ("max_beam_width", settings.max_beam_width)):
        if given is not None and given < 1:
            raise ConfigError(f"{name} must be at least 1, got {given}")
    max_positions = _positive_int_or_none(pretrained.get("max_position_embeddings"), "max_position_embeddings")
    max_seq_len = settings.max_seq_len if settings.max_seq_len is not None else (max_positions or DEFAULT_MAX_SEQ_LEN)
    max_input_len = settings.max_input_len if settings.max_input_len is not None else (
        default_max_input_len(max_seq_len))
    if max_positions and max_seq_len > max_positions:
        raise ConfigError(f"max_seq_len {max_seq_len} is larger than the checkpoint's max_position_embeddings "
                          f"{max_positions}")
    if max_input_len >= max_seq_len:
        raise ConfigError(f"max_input_len ({max_input_len}) must be smaller than max_seq_len "
                          f"({max_seq_len}) to leave room for at least one output token")
    max_num_tokens = settings.max_num_tokens if settings.max_num_tokens is not None else max(
        max_input_len, min(DEFAULT_MAX_NUM_TOKENS, settings.max_batch_size * max_input_len))
    if max_num_tokens < max_input_len:
        raise ConfigError(f"max_num_tokens ({max_num_tokens}) must be at least max_input_len "
                          f"({max_input_len}): a whole prompt runs in one context step")
    return EngineLimits(settings.max_batch_size, max_input_len, max_seq_len, max_num_tokens,
                        settings.max_beam_width)


def _positive_int_or_none(value: Any, name: str) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"checkpoint config {name} {value!r} is not an integer") from None
    if number < 1:
        raise ConfigError(f"checkpoint config {name} must be at least 1, got {number}")
    return number


def check_checkpoint_dir(checkpoint_dir: Path) -> None:
    """Refuse a convert run's hidden staging dir: it may be half written (a killed run leaves it behind)."""
    from generator.convert import is_staging_dir  # convert imports torch-heavy code only when it is used

    if is_staging_dir(checkpoint_dir):
        raise ConfigError(f"{checkpoint_dir} is the staging dir of an unfinished `gen-repo convert` (interrupted "
                          "or still running); pass the finished checkpoint dir. The next convert into the same "
                          "output removes it.")


def _plugin(value: str, dtype: str) -> str:
    return dtype if value == "auto" else value


def build_config_section(settings: BuildSettings, limits: EngineLimits, dtype: str) -> dict[str, Any]:
    """`build_config` as trtllm-build writes it (the plugin part is informative for the pytorch backend)."""
    return {
        **asdict(limits),
        "kv_cache_type": "PAGED" if settings.paged_kv_cache else "CONTINUOUS",
        "plugin_config": {
            "gpt_attention_plugin": _plugin(settings.gpt_attention_plugin, dtype),
            "gemm_plugin": _plugin(settings.gemm_plugin, dtype),
            "moe_plugin": _plugin(settings.moe_plugin, dtype),
            "paged_kv_cache": settings.paged_kv_cache,
            "remove_input_padding": settings.remove_input_padding,
            "context_fmha": True,
        },
    }


def _link_or_copy(source: Path, target: Path) -> None:
    if target.exists() or target.is_symlink():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:  # other file system, or links not allowed
        shutil.copy2(source, target)


def _weight_only_precision(pretrained: dict[str, Any]) -> str | None:
    quant_algo = (pretrained.get("quantization") or {}).get("quant_algo")
    return WEIGHT_ONLY_PRECISIONS.get(str(quant_algo)) if quant_algo else None


def quantize_rank_file(source: Path, target: Path, precision: str) -> None:
    """Write `source`'s tensors to `target` with every float weight-only GEMM weight quantized.

    Tensors are read one at a time (memory holds about one tensor); weights that are already int8 (a
    checkpoint in the older pre-quantized layout) are copied as they are. The file appears only when complete.
    """
    from safetensors import safe_open

    from generator.convert import SafetensorsWriter, header_budget
    from generator.quantize import is_weight_only_target, per_channel_scale_name, quantize_weight

    partial = target.with_name(target.name + ".partial")
    try:
        with safe_open(str(source), framework="pt") as handle:
            names = list(handle.keys())
            with SafetensorsWriter(partial, header_budget(names)) as writer:
                for name in names:
                    tensor = handle.get_tensor(name)
                    if (is_weight_only_target(name) and tensor.is_floating_point()
                            and per_channel_scale_name(name) not in names):
                        quantized, scale = quantize_weight(tensor, precision)
                        writer.add(name, quantized)
                        writer.add(per_channel_scale_name(name), scale)
                    else:
                        writer.add(name, tensor)
                    del tensor
        os.replace(partial, target)
    except (OSError, GenRepoError):
        partial.unlink(missing_ok=True)
        raise
    except Exception as error:  # safetensors raises its own SafetensorError for truncated files
        partial.unlink(missing_ok=True)
        raise GenRepoError(f"cannot read {source}: {error}") from error


def build_pytorch_engine(settings: BuildSettings) -> Path:
    """Write the pytorch engine dir; returns it."""
    checkpoint_dir, output_dir = Path(settings.checkpoint_dir), Path(settings.output_dir)
    check_checkpoint_dir(checkpoint_dir)
    pretrained = read_config_json(checkpoint_dir)
    if "pretrained_config" in pretrained:
        raise ConfigError(f"{checkpoint_dir} is already an engine dir; pass the TensorRT-LLM checkpoint dir")
    config = parse_pretrained_config(pretrained)  # raises ConfigError for what the engine cannot run
    if settings.max_beam_width != 1:
        raise ConfigError("the pytorch engine supports max_beam_width 1 only")
    limits = resolve_limits(settings, pretrained)
    world_size = config.world_size
    sources = [checkpoint_dir / f"rank{r}.safetensors" for r in range(world_size)]
    missing = [p.name for p in sources if not p.is_file()]
    if missing:
        raise GenRepoError(f"checkpoint {checkpoint_dir} lacks {', '.join(missing)} (world size {world_size})")
    for source in sources:  # a truncated or corrupt rank file fails here, not when the server loads it
        read_safetensors_header(source)
    precision = _weight_only_precision(pretrained)
    engine_config = {
        "version": f"gen-repo {__version__}",
        "engine_backend": "pytorch",
        "pretrained_config": pretrained,
        "build_config": build_config_section(settings, limits, str(pretrained.get("dtype", "float32"))),
    }
    if settings.dry_run:
        print(f"would write {output_dir / 'config.json'}:")
        print(json.dumps(engine_config["build_config"], indent=2))
        for source in sources:
            if precision:
                print(f"would quantize {source} ({precision} weight-only) into {output_dir / source.name}")
            else:
                print(f"would link {output_dir / source.name} -> {source}")
        return output_dir
    if output_dir.resolve() == checkpoint_dir.resolve():
        raise ConfigError("the engine dir must differ from the checkpoint dir")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        for stale in [*output_dir.glob("rank*.safetensors"), *output_dir.glob("rank*.engine"),
                      *output_dir.glob("rank*.safetensors.partial"), output_dir / "config.json"]:
            stale.unlink(missing_ok=True)
        if precision:
            _quantize_ranks(sources, output_dir, precision, settings.workers)
        else:
            for source in sources:
                _link_or_copy(source, output_dir / source.name)
        # written last: an engine dir with a config.json is complete
        (output_dir / "config.json").write_text(json.dumps(engine_config, indent=2) + "\n")
    except OSError as error:
        where = f" ({error.filename})" if error.filename else ""
        raise GenRepoError(f"cannot write the engine dir {output_dir}: {error.strerror or error}{where}") from error
    return output_dir


def _quantize_ranks(sources: list[Path], output_dir: Path, precision: str, workers: int) -> None:
    """Quantize every rank file into the engine dir, `workers` at a time (torch and I/O release the GIL)."""
    if workers == 1 or len(sources) == 1:
        for source in sources:
            quantize_rank_file(source, output_dir / source.name, precision)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(quantize_rank_file, s, output_dir / s.name, precision) for s in sources]:
            future.result()


def build_engine(settings: BuildSettings) -> Path:
    """Build the engine dir with the chosen backend; returns it."""
    if settings.engine_backend not in ENGINE_BACKENDS:
        raise ConfigError(f"engine backend {settings.engine_backend!r} is unknown (use {' or '.join(ENGINE_BACKENDS)})")
    if settings.workers < 1:
        raise ConfigError(f"workers must be at least 1, got {settings.workers}")
    if settings.engine_backend == "tensorrtllm":
        from generator.trtllm_build import build_with_trtllm  # needs nothing from TensorRT-LLM until it runs

        return build_with_trtllm(settings)
    return build_pytorch_engine(settings)
