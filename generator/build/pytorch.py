"""The `pytorch` engine dir of docs/DESIGN.md: `config.json` (`version`, `engine_backend`, the checkpoint's
config verbatim as `pretrained_config`, `build_config` with the limits) and `rank{r}.safetensors`: hard links to
the checkpoint's files (copied when a link is impossible, e.g. across file systems), or, for a weight-only
checkpoint (float weights + quant_algo W8A16/W4A16), the weights quantized into the engine's own plain layout
(`generator.formats.weight_only`: int8 / packed int4 `[in, out]` + `per_channel_scale`), as trtllm-build quantizes
into its GPU's layout.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from generator import __version__
from generator.build.settings import BuildSettings, build_config_section, resolve_limits
from generator.engine.config import parse_pretrained_config
from generator.errors import ConfigError, GenRepoError
from generator.formats.safetensors import SafetensorsWriter, header_budget, read_safetensors_header
from generator.formats.trtllm_checkpoint import missing_rank_files, rank_files, read_checkpoint_config
from generator.formats.weight_only import (
    is_weight_only_target,
    per_channel_scale_name,
    quantize_weight,
    weight_only_precision,
)


def _link_or_copy(source: Path, target: Path) -> None:
    if target.exists() or target.is_symlink():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:  # other file system, or links not allowed
        shutil.copy2(source, target)


def quantize_rank_file(source: Path, target: Path, precision: str) -> None:
    """Write `source`'s tensors to `target` with every float weight-only GEMM weight quantized.

    Tensors are read one at a time (memory holds about one tensor); weights that are already int8 (a
    checkpoint in the older pre-quantized layout) are copied as they are. The file appears only when complete.
    """
    from safetensors import safe_open

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


def pytorch_engine_config(settings: BuildSettings, pretrained: dict[str, Any]) -> dict[str, Any]:
    """The engine dir's `config.json` for checkpoint config `pretrained` (ConfigError for what the engine cannot
    run). Also what a caller holding the weights in memory writes alone (`gen-repo bench --weights-on-device`)."""
    parse_pretrained_config(pretrained)
    if settings.max_beam_width != 1:
        raise ConfigError("the pytorch engine supports max_beam_width 1 only")
    limits = resolve_limits(settings, pretrained)
    return {
        "version": f"gen-repo {__version__}",
        "engine_backend": "pytorch",
        "pretrained_config": pretrained,
        "build_config": build_config_section(settings, limits, str(pretrained.get("dtype", "float32"))),
    }


def build_pytorch_engine(settings: BuildSettings) -> Path:
    """Write the pytorch engine dir; returns it."""
    checkpoint_dir, output_dir = Path(settings.checkpoint_dir), Path(settings.output_dir)
    pretrained = read_checkpoint_config(checkpoint_dir)
    engine_config = pytorch_engine_config(settings, pretrained)
    config = parse_pretrained_config(pretrained)
    world_size = config.world_size
    sources = rank_files(checkpoint_dir, world_size)
    missing = missing_rank_files(checkpoint_dir, world_size)
    if missing:
        raise GenRepoError(f"checkpoint {checkpoint_dir} lacks {', '.join(missing)} (world size {world_size})")
    for source in sources:  # a truncated or corrupt rank file fails here, not when the server loads it
        read_safetensors_header(source)
    precision = weight_only_precision(config.quant_algo)
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
