"""Lazy reader of a Hugging Face checkpoint's weights.

Supports `model.safetensors`, sharded `model-*.safetensors` with `model.safetensors.index.json`, and (when no
safetensors file exists) `pytorch_model.bin` / sharded `pytorch_model-*.bin` with its index. Safetensors files
are opened with `safe_open` one tensor at a time, so reading a tensor costs only that tensor's memory; their
headers are parsed up front, which is how missing, truncated and corrupt files are found before any work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from generator.errors import GenRepoError
from generator.formats.dtypes import from_safetensors
from generator.formats.safetensors import read_safetensors_header


class HFCheckpoint:
    """Names, shapes and tensors of one HF checkpoint directory, read on demand."""

    def __init__(self, model_dir: Path | str) -> None:
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise GenRepoError(f"model directory {self.model_dir} does not exist")
        self._file_of: dict[str, Path] = {}
        self._shape_of: dict[str, tuple[int, ...]] = {}
        self._dtype_of: dict[str, torch.dtype] = {}
        self._bin_cache: dict[Path, dict[str, torch.Tensor]] = {}
        files = self._weight_files()
        for path in files:
            if path.suffix == ".safetensors":
                self._index_safetensors(path)
            else:
                self._index_bin(path)

    def _weight_files(self) -> list[Path]:
        """The weight files the checkpoint declares, checking that every one of them exists."""
        for index_name, single_name in (("model.safetensors.index.json", "model.safetensors"),
                                        ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            index_path = self.model_dir / index_name
            if index_path.is_file():
                try:
                    weight_map = json.loads(index_path.read_text())["weight_map"]
                except (ValueError, KeyError) as error:
                    raise GenRepoError(f"{index_path} is not a valid weight index: {error}") from error
                names = sorted(set(weight_map.values()))
                missing = [name for name in names if not (self.model_dir / name).is_file()]
                if missing:
                    raise GenRepoError(f"weight file(s) listed in {index_path.name} are missing from "
                                       f"{self.model_dir}: {', '.join(missing)}")
                return [self.model_dir / name for name in names]
            if (self.model_dir / single_name).is_file():
                return [self.model_dir / single_name]
        raise GenRepoError(f"no weights in {self.model_dir}: expected model.safetensors, "
                           "model.safetensors.index.json or pytorch_model.bin")

    def _index_safetensors(self, path: Path) -> None:
        for name, entry in read_safetensors_header(path).items():
            dtype = from_safetensors(entry["dtype"])
            if dtype is None:
                raise GenRepoError(f"tensor {name} in {path} has unsupported dtype {entry['dtype']}")
            self._add(name, path, tuple(entry["shape"]), dtype.torch)

    def _index_bin(self, path: Path) -> None:
        for name, tensor in self._load_bin(path).items():
            self._add(name, path, tuple(tensor.shape), tensor.dtype)

    def _add(self, name: str, path: Path, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        if name in self._file_of:
            raise GenRepoError(f"tensor {name} appears in both {self._file_of[name]} and {path}")
        self._file_of[name] = path
        self._shape_of[name] = shape
        self._dtype_of[name] = dtype

    def _load_bin(self, path: Path) -> dict[str, torch.Tensor]:
        # mmap keeps a .bin shard on disk; only the tensors actually used are paged in
        if path not in self._bin_cache:
            try:
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError as error:
                if "zipfile" not in str(error):
                    raise GenRepoError(f"cannot read weight file {path} (truncated or corrupt?): {error}") from error
                state = self._load_legacy_bin(path)  # pre-zip torch.save format: mmap is impossible
            except Exception as error:  # torch raises EOFError/UnpicklingError/... for broken archives
                raise GenRepoError(f"cannot read weight file {path} (truncated or corrupt?): {error}") from error
            self._bin_cache[path] = state.get("state_dict", state) if isinstance(state, dict) else state
        return self._bin_cache[path]

    @staticmethod
    def _load_legacy_bin(path: Path) -> Any:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise GenRepoError(f"cannot read weight file {path} (truncated or corrupt?): {error}") from error

    def names(self) -> list[str]:
        """Every tensor name in the checkpoint, sorted."""
        return sorted(self._file_of)

    def __contains__(self, name: object) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        self._require(name)
        return self._shape_of[name]

    def dtype(self, name: str) -> torch.dtype:
        self._require(name)
        return self._dtype_of[name]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into memory (a fresh tensor, safe to modify)."""
        from safetensors import safe_open

        self._require(name)
        path = self._file_of[name]
        if path.suffix != ".safetensors":
            return self._load_bin(path)[name].clone()
        try:
            with safe_open(str(path), framework="pt") as handle:
                return handle.get_tensor(name)
        except Exception as error:  # safetensors raises its own SafetensorError
            raise GenRepoError(f"cannot read tensor {name} from {path}: {error}") from error

    def _require(self, name: str) -> None:
        if name not in self._file_of:
            raise GenRepoError(f"tensor {name} is missing from the checkpoint in {self.model_dir}")


def read_hf_config(model_dir: Path | str) -> dict[str, Any]:
    """The checkpoint's config.json as plain JSON (never through AutoConfig)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise GenRepoError(f"{path} does not exist")
    try:
        config = json.loads(path.read_text())
    except ValueError as error:
        raise GenRepoError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise GenRepoError(f"{path} does not hold a JSON object")
    return config
