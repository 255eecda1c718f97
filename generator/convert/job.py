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

import fcntl
import json
import os
import re
import shutil
import struct
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from tqdm import tqdm

from generator.convert.calibrate import WEIGHT_ONLY_ALGOS, calibrate_kv_cache_scales, default_calibration_text
from generator.convert.models import ModelSpec, spec_for
from generator.convert.models.base import shard_tensor
from generator.convert.settings import ConvertSettings
from generator.errors import ConfigError, GenRepoError
from generator.formats.hf_checkpoint import HFCheckpoint, read_hf_config
from generator.formats.mapping import Mapping

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
        with _StagingLock(output_dir):
            staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
            try:
                staging.chmod(0o755)  # mkdtemp makes it private; the output is an ordinary directory
                kv_scales = None
                if calib_text is not None:
                    kv_scales = calibrate_kv_cache_scales(model_dir, spec, calib_text, settings.trust_remote_code)
                (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
                job = _RankJob(spec, checkpoint, DTYPES[dtype], kv_scales, settings.progress)
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


# `.NAME.tmp-XXXX` (a run's staging dir) and `.NAME.old-XXXX` (the output it replaces, while it is moved)
_STAGING_PATTERN = re.compile(r"^\..+\.(tmp|old)-[A-Za-z0-9_]+$")


def is_staging_dir(path: Path) -> bool:
    """Whether `path` is a convert run's hidden staging directory (never a finished checkpoint)."""
    return bool(_STAGING_PATTERN.match(Path(path).name))


class _StagingLock:
    """Holds a shared flock on the output's parent dir for a run; first removes stale staging dirs.

    A run that gets the lock exclusively knows no other convert is writing into that parent, so every
    `.NAME.tmp-*` / `.NAME.old-*` beside the output was left by a killed run (SIGKILL skips the cleanup) and is
    removed. Otherwise another run is busy there and nothing is touched. No lock file is left behind.
    """

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self._fd: int | None = None

    def __enter__(self) -> _StagingLock:
        try:
            self._fd = os.open(self.output_dir.parent, os.O_RDONLY)
        except OSError:
            return self  # no lock on this file system: skip the cleanup, convert anyway
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another run holds it: leave its staging dirs alone
            self._lock_shared()
            return self
        except OSError:
            return self  # this file system has no flock (e.g. some network mounts): no cleanup
        remove_stale_staging(self.output_dir)
        self._lock_shared()  # not atomic, but this run's staging dir does not exist yet
        return self

    def _lock_shared(self) -> None:
        assert self._fd is not None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH)
        except OSError:
            pass  # the cleanup is best effort; the convert itself does not need the lock

    def __exit__(self, *_: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock


def remove_stale_staging(output_dir: Path) -> list[Path]:
    """Remove the staging dirs of `output_dir` that earlier runs left (call only under the exclusive lock)."""
    removed = []
    prefixes = (f".{output_dir.name}.tmp-", f".{output_dir.name}.old-")
    for path in output_dir.parent.iterdir():
        if path.name.startswith(prefixes) and is_staging_dir(path) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            print(f"note: removed {path}, left by an interrupted convert", file=sys.stderr)
            removed.append(path)
    return removed


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
        return declared if declared in DTYPES else "float32"
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)} or auto, got {dtype!r}")
    return dtype


def _calibration_text(path: Path | None) -> str:
    if path is None:
        return default_calibration_text()
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise GenRepoError(f"cannot read --calib-text {path}: {error}") from error


def check_output_dir(output_dir: Path) -> None:
    """Refuse to replace a directory that is neither empty nor a TensorRT-LLM checkpoint."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise GenRepoError(f"output {output_dir} exists and is not a directory")
    if any(output_dir.iterdir()) and not (output_dir / "config.json").is_file():
        raise GenRepoError(f"output {output_dir} exists and is not a TensorRT-LLM checkpoint; refusing to replace it")


def replace_dir(staging: Path, output_dir: Path) -> None:
    """Move a finished staging directory to `output_dir`, replacing what was there."""
    old = None
    if output_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
        os.replace(output_dir, old / "checkpoint")
    os.replace(staging, output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
                writer.add(name, shard.to(torch.float32 if tensor.keep_float32 else self.dtype))
                del shard
                bar.update()
            if self.kv_scales is not None:
                for local, layer in enumerate(layers):
                    writer.add(f"transformer.layers.{local}.attention.kv_cache_scaling_factor",
                               torch.tensor([self.kv_scales[layer]], dtype=torch.float32))


def show_progress(wanted: bool) -> bool:
    """Bars only on a terminal: in a log or pipe their carriage returns leave half-drawn lines behind."""
    return wanted and sys.stderr.isatty()


_SAFETENSORS_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def header_budget(names: list[str]) -> int:
    """Bytes to reserve for the safetensors header of these tensors (and their weight-only scales)."""
    # one entry: "name":{"dtype":"BF16","shape":[a,b,c],"data_offsets":[x,y]}, at most ~110 bytes besides the name
    return 256 + sum(2 * (len(name) + 160) for name in names)


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor, without holding the tensors in memory.

    Tensor data goes straight into the file after `header_reserve` bytes kept for the header, which `close`
    fills in (the format allows the JSON header to be padded with spaces). If the header outgrows the
    reservation, `close` rewrites the file once. Tensors whose byte size is not a multiple of 8 are kept back
    and written last, largest element size first, so every tensor stays aligned to its element size
    (safetensors readers view the bytes in place).
    """

    def __init__(self, path: Path, header_reserve: int = 4096) -> None:
        self.path = Path(path)
        self._reserve = header_reserve + (-header_reserve % 8)
        self._file: BinaryIO = self.path.open("wb")
        self._file.seek(8 + self._reserve)
        self._entries: dict[str, dict[str, Any]] = {}
        self._deferred: list[tuple[str, torch.Tensor]] = []
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._entries or any(name == deferred for deferred, _ in self._deferred):
            raise GenRepoError(f"tensor {name} written twice to {self.path}")
        tensor = tensor.detach().contiguous()
        if tensor.dtype not in _SAFETENSORS_NAMES:
            raise GenRepoError(f"tensor {name} has dtype {tensor.dtype}, which safetensors cannot hold")
        if tensor.numel() * tensor.element_size() % 8:
            self._deferred.append((name, tensor))
        else:
            self._write(name, tensor)

    def _write(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.numel():
            self._file.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
        size = tensor.numel() * tensor.element_size()
        self._entries[name] = {"dtype": _SAFETENSORS_NAMES[tensor.dtype], "shape": list(tensor.shape),
                               "data_offsets": [self._offset, self._offset + size]}
        self._offset += size

    def close(self) -> None:
        for name, tensor in sorted(self._deferred, key=lambda item: -item[1].element_size()):
            self._write(name, tensor)
        self._deferred.clear()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":")).encode()
        if len(header) <= self._reserve:
            self._file.seek(0)
            self._file.write(struct.pack("<Q", self._reserve) + header + b" " * (self._reserve - len(header)))
            self._file.close()
            return
        self._file.close()  # the header outgrew its reservation: rewrite once with a larger one
        header += b" " * (-len(header) % 8)
        moved = self.path.with_name(self.path.name + ".data")
        os.replace(self.path, moved)
        with self.path.open("wb") as out, moved.open("rb") as data:
            out.write(struct.pack("<Q", len(header)) + header)
            data.seek(8 + self._reserve)
            shutil.copyfileobj(data, out, length=16 << 20)
        moved.unlink()

    def abort(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
