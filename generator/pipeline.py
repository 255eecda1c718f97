"""The whole job: `gen-repo --model PRESET|DIR` runs convert -> build -> tokenizer copy -> render.

Output layout (docs/DESIGN.md):

    <output>/hf/           only for the tiny presets: the generated HF checkpoint + tokenizer (reused on re-runs)
    <output>/checkpoint/   TensorRT-LLM checkpoint
    <output>/engine/       engine dir
    <output>/tokenizer/    tokenizer files copied from the HF dir
    <output>/triton_repo/  the Triton model repository
"""

from __future__ import annotations

import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from generator.build import DEFAULT_MAX_INPUT_LEN, DEFAULT_MAX_SEQ_LEN, BuildSettings
from generator.convert import ConvertSettings
from generator.errors import ConfigError, GenRepoError
from generator.presets import PRESETS, Preset, get_preset, resolve_checkpoint

# Files a tokenizer dir may need; anything else in the HF dir (weights, remote code) stays behind.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                   "generation_config.json", "config.json")
TOKENIZER_SUFFIXES = (".tiktoken",)


@dataclass(frozen=True)
class PipelineSettings:
    """Everything `gen-repo --model ...` needs. None means: the preset's value, else the step's default; the
    other defaults are the steps' own (ConvertSettings, BuildSettings), read from there."""

    model: str                                   # preset name or HF checkpoint dir
    output_dir: Path = Path("model_repo")
    model_dir: Path | None = None                # local checkpoint for a real preset
    dtype: str | None = None
    tensor_parallel_size: int | None = None
    pipeline_parallel_size: int | None = None
    moe_tensor_parallel_size: int | None = None
    moe_expert_parallel_size: int | None = None
    engine_backend: str = BuildSettings.engine_backend   # "pytorch" or "tensorrtllm"
    max_batch_size: int | None = None
    max_input_len: int | None = None
    max_seq_len: int | None = None
    max_num_tokens: int | None = None
    workers: int = ConvertSettings.workers      # convert and build alike
    weight_only_precision: str | None = ConvertSettings.weight_only_precision   # None | "int8" | "int4"
    int8_kv_cache: bool = ConvertSettings.int8_kv_cache
    trust_remote_code: bool = ConvertSettings.trust_remote_code
    progress: bool = ConvertSettings.progress


@dataclass(frozen=True)
class PipelineResult:
    """Where each step wrote its output."""

    output_dir: Path
    hf_dir: Path
    checkpoint_dir: Path
    engine_dir: Path
    tokenizer_dir: Path
    triton_repo: Path


def run_pipeline(settings: PipelineSettings, echo: Callable[[str], None] = click.echo) -> PipelineResult:
    """Run the whole job and return the output paths; prints one line per step."""
    check_sizes(settings)
    from generator.serving.render import check_servable_path

    check_servable_path(settings.output_dir / "triton_repo", "the output path")  # before hours of convert/build
    output = settings.output_dir.resolve()
    preset, hf_dir = _resolve_model(settings, output, echo)
    result = PipelineResult(output_dir=output, hf_dir=hf_dir, checkpoint_dir=output / "checkpoint",
                            engine_dir=output / "engine", tokenizer_dir=output / "tokenizer",
                            triton_repo=output / "triton_repo")
    echo(f"[1/4] convert  {hf_dir} -> {result.checkpoint_dir}")
    _timed(echo, lambda: _convert(settings, preset, hf_dir, result.checkpoint_dir))
    echo(f"[2/4] build    {result.checkpoint_dir} -> {result.engine_dir} ({settings.engine_backend} engine)")
    _timed(echo, lambda: _build(settings, preset, hf_dir, result.checkpoint_dir, result.engine_dir))
    echo(f"[3/4] tokenizer {hf_dir} -> {result.tokenizer_dir}")
    _timed(echo, lambda: copy_tokenizer_files(hf_dir, result.tokenizer_dir))
    echo(f"[4/4] render   {result.triton_repo}")
    _timed(echo, lambda: _render(result))
    echo("")
    echo(f"Triton repository ready: {result.triton_repo}")
    echo(f"Serve it with:  gen-repo serve --model-repository {shlex.quote(str(result.triton_repo))}")
    return result


# flag -> PipelineSettings field, for the sizes that must be at least 1 when given
_SIZE_FLAGS = {"--tp-size": "tensor_parallel_size", "--pp-size": "pipeline_parallel_size",
               "--moe-tp-size": "moe_tensor_parallel_size", "--moe-ep-size": "moe_expert_parallel_size",
               "--max-batch-size": "max_batch_size", "--max-input-len": "max_input_len",
               "--max-seq-len": "max_seq_len", "--max-num-tokens": "max_num_tokens", "--workers": "workers"}


def check_sizes(settings: PipelineSettings) -> None:
    """A size given as 0 or less is an error: never silently replaced by the preset's or the step's default."""
    for flag, field in _SIZE_FLAGS.items():
        value = getattr(settings, field)
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")


def _timed(echo: Callable[[str], None], step: Callable[[], Any]) -> None:
    start = time.monotonic()
    step()
    sys.stderr.flush()  # a step's own stderr lines (notes, bars) come before its timing, never inside it
    echo(f"      done in {time.monotonic() - start:.1f} s")


def _resolve_model(settings: PipelineSettings, output: Path,
                   echo: Callable[[str], None]) -> tuple[Preset | None, Path]:
    """(preset or None, local HF checkpoint dir); tiny presets are generated into `<output>/hf`."""
    if settings.model in PRESETS:
        preset = get_preset(settings.model)
        if preset.offline:  # a tiny preset (generator.tiny.TINY_NAMES); torch loads only when one is made
            from generator.tiny import make_tiny_model

            hf_dir = output / "hf"
            verb = "reusing" if (hf_dir / "config.json").is_file() else "creating"
            echo(f"[0/4] {verb} {preset.name} in {hf_dir}")
            with _transformers_bars(settings.progress and sys.stderr.isatty()):
                return preset, make_tiny_model(preset.name, hf_dir)
        return preset, resolve_checkpoint(preset, settings.model_dir, trust_remote_code=settings.trust_remote_code)
    path = Path(settings.model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise GenRepoError(f"{path} has no config.json: pass a Hugging Face checkpoint directory or a preset "
                               f"({', '.join(PRESETS)})")
        return None, path.resolve()
    if "/" in settings.model or settings.model.startswith("."):
        raise GenRepoError(f"{settings.model}: no such directory (presets: {', '.join(PRESETS)})")
    get_preset(settings.model)  # raises the "unknown preset" error listing the presets
    raise AssertionError("unreachable")


@contextmanager
def _transformers_bars(shown: bool) -> Iterator[None]:
    """transformers' own bars (e.g. "Writing model shards") only on a terminal, like gen-repo's."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not shown:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _fresh(path: Path) -> Path:
    """Remove a previous run's output of one step so no stale rank files survive."""
    if path.exists():
        shutil.rmtree(path)
    return path


def _convert(settings: PipelineSettings, preset: Preset | None, hf_dir: Path, checkpoint_dir: Path) -> None:
    from generator.convert.job import convert_checkpoint

    # what the user gave, else the preset's, else (left out) ConvertSettings' defaults
    from_preset = {} if preset is None else {"dtype": preset.dtype, "tensor_parallel_size": preset.tensor_parallel_size,
                                             "pipeline_parallel_size": preset.pipeline_parallel_size}
    given = _given(dtype=settings.dtype, tensor_parallel_size=settings.tensor_parallel_size,
                   pipeline_parallel_size=settings.pipeline_parallel_size,
                   moe_tensor_parallel_size=settings.moe_tensor_parallel_size,
                   moe_expert_parallel_size=settings.moe_expert_parallel_size,
                   weight_only_precision=settings.weight_only_precision)
    settings_for_convert = ConvertSettings(
        model_dir=hf_dir, output_dir=checkpoint_dir, **{**from_preset, **given},
        workers=settings.workers, trust_remote_code=settings.trust_remote_code,
        int8_kv_cache=settings.int8_kv_cache, progress=settings.progress)
    if settings.engine_backend == "tensorrtllm":
        check_trtllm_before_convert(settings_for_convert)
    _fresh(checkpoint_dir)
    convert_checkpoint(settings_for_convert)


def check_trtllm_before_convert(settings: ConvertSettings) -> None:
    """Refuse, before a long convert, a model trtllm-build cannot build: the same checks `gen-repo build
    --engine tensorrtllm` runs, on the config convert would write (read from the HF config and file headers)."""
    from generator.build.trtllm import check_trtllm_compatible
    from generator.convert.job import resolve_dtype
    from generator.convert.models import spec_for
    from generator.formats.hf_checkpoint import HFCheckpoint, read_hf_config
    from generator.formats.mapping import Mapping
    from generator.formats.weight_only import WEIGHT_ONLY_ALGOS

    hf_config = read_hf_config(settings.model_dir)
    spec = spec_for(hf_config)
    spec.check_hf_checkpoint(HFCheckpoint(settings.model_dir))  # settles variants by what the files hold
    mapping = Mapping.create(settings.tensor_parallel_size, settings.pipeline_parallel_size,
                             settings.moe_tensor_parallel_size, settings.moe_expert_parallel_size)
    precision = settings.weight_only_precision
    config = spec.trtllm_config(mapping, resolve_dtype(settings.dtype, hf_config), {
        "quant_algo": WEIGHT_ONLY_ALGOS[precision] if precision else None,
        "kv_cache_quant_algo": "INT8" if settings.int8_kv_cache else None})
    if spec.extensions():
        config["gen_repo_extensions"] = spec.extensions()
    check_trtllm_compatible(config)


def _build(settings: PipelineSettings, preset: Preset | None, hf_dir: Path, checkpoint_dir: Path,
           engine_dir: Path) -> None:
    from generator.build import build_engine

    _fresh(engine_dir)
    limits = default_limits(preset, hf_dir)
    max_batch_size = _or_default(settings.max_batch_size, limits["max_batch_size"])
    max_input_len = _or_default(settings.max_input_len, limits["max_input_len"])
    max_seq_len = _or_default(settings.max_seq_len, max(limits["max_seq_len"], max_input_len + 1))
    build_engine(BuildSettings(
        checkpoint_dir=checkpoint_dir, output_dir=engine_dir, engine_backend=settings.engine_backend,
        max_batch_size=max_batch_size, max_input_len=max_input_len, max_seq_len=max_seq_len,
        workers=settings.workers, **_given(max_num_tokens=settings.max_num_tokens)))


def _render(result: PipelineResult) -> None:
    from generator.serving.render import RenderSettings, render_repository

    _fresh(result.triton_repo)
    render_repository(RenderSettings(engine_dir=result.engine_dir, tokenizer_dir=result.tokenizer_dir,
                                     output_dir=result.triton_repo))


def default_limits(preset: Preset | None, hf_dir: Path) -> dict[str, int]:
    """Build limits: the preset's (or build's defaults), never beyond the checkpoint's max sequence length."""
    from generator.formats.hf_checkpoint import read_hf_config  # torch: only once the job runs

    config = read_hf_config(hf_dir)
    max_positions = int(config.get("max_seq_len") or config.get("max_position_embeddings") or DEFAULT_MAX_SEQ_LEN)
    if preset is not None:
        limits = {"max_batch_size": preset.max_batch_size, "max_input_len": preset.max_input_len,
                  "max_seq_len": preset.max_seq_len}
    else:
        limits = {"max_batch_size": BuildSettings.max_batch_size, "max_input_len": DEFAULT_MAX_INPUT_LEN,
                  "max_seq_len": DEFAULT_MAX_SEQ_LEN}
    if limits["max_seq_len"] > max_positions:
        # a small checkpoint behind a big preset: keep half the sequence for the prompt
        limits["max_seq_len"] = max_positions
        limits["max_input_len"] = max(1, min(limits["max_input_len"], max_positions // 2))
    limits["max_input_len"] = min(limits["max_input_len"], limits["max_seq_len"] - 1)
    return limits


def copy_tokenizer_files(hf_dir: Path, tokenizer_dir: Path) -> list[Path]:
    """Copy the tokenizer files (never weights or remote code) of `hf_dir` into `tokenizer_dir`."""
    _fresh(tokenizer_dir).mkdir(parents=True)
    copied = []
    for path in sorted(hf_dir.iterdir()):
        if path.is_file() and (path.name in TOKENIZER_FILES or path.name.endswith(TOKENIZER_SUFFIXES)):
            copied.append(Path(shutil.copy2(path, tokenizer_dir / path.name)))
    if not any(p.name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json") for p in copied):
        raise GenRepoError(f"{hf_dir} has no tokenizer files (tokenizer.json / tokenizer_config.json / ...): "
                           "the Triton preprocessing model needs one")
    return copied


def _or_default(value: int | None, default: int) -> int:
    """`value` unless it is None (0 is a value: check_sizes refuses it, it never means "the default")."""
    return default if value is None else value


def _given(**values: Any) -> dict[str, Any]:
    """The keyword arguments that are set: None leaves a field to its settings dataclass's default."""
    return {name: value for name, value in values.items() if value is not None}
