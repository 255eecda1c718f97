"""HF checkpoint -> TensorRT-LLM checkpoint (config.json + rank{r}.safetensors), streaming.

Every check that can fail (config, layout, weight files, tensor names and shapes) runs before any tensor is
read. Tensors are then read one at a time from the HF checkpoint, split for the rank, optionally quantized and
appended to that rank's file, so memory holds about one HF tensor per worker. Everything is written into a
temporary directory beside the output and renamed at the end: a failure leaves no partial output, and the
staging directories a killed run left behind are removed by the next run into the same output.

Weight-only quantization (`--use-weight-only`) writes what TensorRT-LLM's loader expects of a W8A16/W4A16
checkpoint it quantizes itself: float weights plus `quantization.quant_algo` (trtllm-build then quantizes them
in its GPU's layout). The pytorch engine's build step writes its own quantized layout into the engine dir.
"""

from __future__ import annotations

import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from generator.convert.calibrate import calibrate_kv_cache_scales, default_calibration_text
from generator.convert.models import ModelSpec, spec_for
from generator.convert.models.base import shard_tensor
from generator.convert.settings import ConvertSettings
from generator.errors import ConfigError, GenRepoError
from generator.formats.dtypes import MODEL_DTYPES, is_model_dtype, model_dtype, stored_dtype
from generator.formats.hf_checkpoint import HFCheckpoint, read_hf_config
from generator.formats.mapping import Mapping
from generator.formats.safetensors import SafetensorsWriter, header_budget
from generator.formats.staging import StagingLock, check_output_dir, new_staging_dir, replace_dir
from generator.formats.weight_only import WEIGHT_ONLY_ALGOS


def convert_checkpoint(settings: ConvertSettings) -> Path:
    """Convert an HF MPT/DBRX checkpoint; returns the output directory."""
    model_dir, output_dir = Path(settings.model_dir), Path(settings.output_dir)
    if settings.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {settings.workers}")
    if settings.weight_only_precision not in (None, *WEIGHT_ONLY_ALGOS):
        raise ConfigError(f"--weight-only-precision must be int8 or int4, got {settings.weight_only_precision!r}")
    hf_config = read_hf_config(model_dir)
    spec = spec_for(hf_config)
    dtype = resolve_dtype(settings.dtype, hf_config)
    mapping = Mapping.create(settings.tensor_parallel_size, settings.pipeline_parallel_size,
                             settings.moe_tensor_parallel_size, settings.moe_expert_parallel_size)
    spec.check_mapping(mapping)
    checkpoint = HFCheckpoint(model_dir)
    spec.check_hf_checkpoint(checkpoint)
    check_output_dir(output_dir)
    calib_text = _calibration_text(settings.calib_text) if settings.int8_kv_cache else None

    quantization = {
        "quant_algo": WEIGHT_ONLY_ALGOS[settings.weight_only_precision] if settings.weight_only_precision else None,
        "kv_cache_quant_algo": "INT8" if settings.int8_kv_cache else None,
    }
    config = spec.trtllm_config(mapping, dtype, quantization)
    extensions = spec.extensions()
    if extensions:
        # Present only when used, so standard checkpoints stay exactly what TensorRT-LLM's converters write.
        config["gen_repo_extensions"] = extensions
        print(f"note: this checkpoint uses {', '.join(extensions)}, which TensorRT-LLM's own model does not read; "
              "build it with the pytorch engine backend", file=sys.stderr)

    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        with StagingLock(output_dir):
            staging = new_staging_dir(output_dir)
            try:
                kv_scales = None
                if calib_text is not None:
                    kv_scales = calibrate_kv_cache_scales(model_dir, spec, calib_text, settings.trust_remote_code)
                (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
                job = _RankJob(spec, checkpoint, model_dtype(dtype).torch, kv_scales, settings.progress)
                _convert_ranks(job, mapping, staging, settings.workers)
                replace_dir(staging, output_dir)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    except OSError as error:  # read-only or full disk: one line naming the path, not a traceback
        raise GenRepoError(f"cannot write the checkpoint {output_dir}: {_os_error_text(error)}") from error
    return output_dir


def _os_error_text(error: OSError) -> str:
    where = f" ({error.filename})" if error.filename else ""
    return f"{error.strerror or error}{where}"


def _convert_ranks(job: _RankJob, mapping: Mapping, out_dir: Path, workers: int) -> None:
    """Write every rank's file, `workers` ranks at a time (threads: torch and file I/O release the GIL)."""
    ranks = [mapping.with_rank(rank) for rank in range(mapping.world_size)]
    if workers == 1:
        for rank_mapping in ranks:
            job.convert(rank_mapping, out_dir, position=0)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(job.convert, m, out_dir, i % workers) for i, m in enumerate(ranks)]
        try:
            for future in futures:
                future.result()
        finally:  # on the first failure, ranks not started yet are dropped
            for future in futures:
                future.cancel()


def resolve_dtype(dtype: str, hf_config: dict[str, Any]) -> str:
    """The output dtype name; "auto" takes the HF config's `torch_dtype`/`dtype` (float32 if unset)."""
    if dtype == "auto":
        declared = str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32")
        return declared if declared in MODEL_DTYPES else "float32"
    if not is_model_dtype(dtype):
        raise ConfigError(f"--dtype must be one of {', '.join(MODEL_DTYPES)} or auto, got {dtype!r}")
    return model_dtype(dtype).name


def _calibration_text(path: Path | None) -> str:
    if path is None:
        return default_calibration_text()
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise GenRepoError(f"cannot read --calib-text {path}: {error}") from error


@dataclass(frozen=True)
class _RankJob:
    """Writes one rank's file; shared by the worker threads (it holds no per-rank state)."""

    spec: ModelSpec
    checkpoint: HFCheckpoint
    dtype: torch.dtype
    kv_scales: list[float] | None
    progress: bool

    def convert(self, mapping: Mapping, out_dir: Path, position: int) -> None:
        layout = self.spec.shard_layout()
        tensors = list(self.spec.rank_tensors(mapping))
        layers = mapping.pp_layers(self.spec.num_layers)
        names = [name for name, _ in tensors] + [f"transformer.layers.{i}.attention.kv_cache_scaling_factor"
                                                 for i in range(len(layers))]
        with SafetensorsWriter(out_dir / f"rank{mapping.rank}.safetensors", header_budget(names)) as writer, \
                tqdm(total=len(tensors), desc=f"rank {mapping.rank}", unit="tensor", position=position,
                     leave=False, disable=not show_progress(self.progress), file=sys.stderr) as bar:
            for name, tensor in tensors:
                shard = shard_tensor(tensor.source(self.checkpoint), tensor.rule, layout, mapping)
                writer.add(name, shard.to(stored_dtype(name, self.dtype)))
                del shard
                bar.update()
            if self.kv_scales is not None:
                for local, layer in enumerate(layers):
                    name = f"transformer.layers.{local}.attention.kv_cache_scaling_factor"
                    writer.add(name, torch.tensor([self.kv_scales[layer]], dtype=stored_dtype(name, self.dtype)))


def show_progress(wanted: bool) -> bool:
    """Bars only on a terminal: in a log or pipe their carriage returns leave half-drawn lines behind."""
    return wanted and sys.stderr.isatty()
