"""generator/formats: the one reader (and writer) of each on-disk format between the stages."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from generator.errors import ConfigError, GenRepoError
from generator.formats import dtypes
from generator.formats.engine_dir import EngineLimits, engine_limits, read_engine_dir
from generator.formats.safetensors import SafetensorsWriter, read_safetensors_header, tensor_bytes
from generator.formats.staging import (
    StagingLock,
    check_output_dir,
    is_staging_dir,
    new_staging_dir,
    replace_dir,
)
from generator.formats.trtllm_checkpoint import (
    missing_rank_files,
    rank_file_name,
    read_checkpoint_config,
    read_config_json,
    read_mapping,
)
from generator.formats.weight_only import (
    WEIGHT_ONLY_ALGOS,
    dequantize_weight,
    quantize_weight,
    weight_only_precision,
)

FORMATS = Path(__file__).resolve().parent.parent / "generator" / "formats"


def test_formats_import_only_errors_and_formats() -> None:
    """The bottom layer: nothing of gen-repo above generator.errors."""
    for path in FORMATS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                if name.startswith("generator"):
                    assert name == "generator.errors" or name.startswith("generator.formats"), (path.name, name)


# --- dtypes -------------------------------------------------------------------------------------------------


def test_dtype_table_agrees_with_torch_numpy_and_safetensors(tmp_path: Path) -> None:
    for row in dtypes.DTYPES:
        assert torch.empty(0, dtype=row.torch).element_size() == row.itemsize
        assert row.triton.startswith("TYPE_")
        if row.numpy is not None:
            assert np.dtype(row.numpy).itemsize == row.itemsize
        # the safetensors library writes the code the table gives
        save_file({"t": torch.zeros(2, dtype=row.torch)}, tmp_path / f"{row.name}.safetensors")
        entry = read_safetensors_header(tmp_path / f"{row.name}.safetensors")["t"]
        assert entry["dtype"] == row.safetensors and tensor_bytes(entry) == 2 * row.itemsize


def test_dtype_names_and_aliases() -> None:
    assert dtypes.torch_dtype("bf16") is torch.bfloat16 and dtypes.torch_dtype("fp16") is torch.float16
    assert dtypes.model_dtype("bfloat16").triton == "TYPE_BF16"
    assert dtypes.DTYPE_CHOICES == ("auto", "float32", "float16", "bfloat16")
    assert dtypes.is_model_dtype("half") and not dtypes.is_model_dtype("int8")
    with pytest.raises(ConfigError, match="'int8' is not supported"):
        dtypes.model_dtype("int8")
    with pytest.raises(ConfigError, match="unknown"):
        dtypes.dtype_named("float8")
    assert dtypes.triton_type("float8", "TYPE_FP16") == "TYPE_FP16"
    assert dtypes.from_safetensors("F8_E4M3") is None


def test_keeps_float32() -> None:
    assert dtypes.keeps_float32("transformer.layers.3.mlp.router.weight")
    assert dtypes.keeps_float32("transformer.layers.0.attention.kv_cache_scaling_factor")
    assert not dtypes.keeps_float32("transformer.layers.0.mlp.fc.weight")
    assert dtypes.stored_dtype("lm_head.weight", torch.bfloat16) is torch.bfloat16


# --- safetensors --------------------------------------------------------------------------------------------


def test_writer_round_trip_and_header_checks(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    tensors = {"a": torch.arange(3, dtype=torch.int8), "b": torch.randn(2, 3).bfloat16()}
    with SafetensorsWriter(path, header_reserve=8) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    loaded = load_file(path)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())
    header = read_safetensors_header(path, exact=True)
    assert {name: entry["dtype"] for name, entry in header.items()} == {"a": "I8", "b": "BF16"}
    path.write_bytes(path.read_bytes() + b"\0")
    read_safetensors_header(path)  # trailing bytes: still whole
    with pytest.raises(GenRepoError, match="header describes"):
        read_safetensors_header(path, exact=True)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(GenRepoError, match="truncated"):
        read_safetensors_header(path)
    with pytest.raises(GenRepoError, match="cannot hold"), SafetensorsWriter(tmp_path / "y.safetensors") as writer:
        writer.add("c", torch.zeros(2, dtype=torch.complex64))
    assert not (tmp_path / "y.safetensors").exists()


# --- staging ------------------------------------------------------------------------------------------------


def test_staging_dir_replaces_output_atomically(tmp_path: Path) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / "config.json").write_text("{}")
    stale = tmp_path / ".out.tmp-abc123"
    stale.mkdir()
    with StagingLock(output):
        assert not stale.exists()  # the lock's holder removes what a killed run left
        staging = new_staging_dir(output)
        assert is_staging_dir(staging) and not is_staging_dir(output)
        (staging / "new").write_text("x")
        check_output_dir(output)
        replace_dir(staging, output)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (output / "new").is_file()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file").write_text("x")
    with pytest.raises(GenRepoError, match="not a TensorRT-LLM checkpoint"):
        check_output_dir(tmp_path / "other")


# --- TensorRT-LLM checkpoint --------------------------------------------------------------------------------


def test_checkpoint_config_and_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config.json not found"):
        read_config_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_config_json(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"pretrained_config": {}}))
    with pytest.raises(ConfigError, match="already an engine dir"):
        read_checkpoint_config(tmp_path)
    staging = tmp_path / ".ckpt.tmp-x1"
    staging.mkdir()
    with pytest.raises(ConfigError, match="staging dir of an unfinished"):
        read_checkpoint_config(staging)
    assert read_mapping({}).world_size == 1
    assert read_mapping({"mapping": {"tp_size": 2, "pp_size": 2, "world_size": 4}}).world_size == 4
    with pytest.raises(ConfigError, match="world_size 2 is not tp_size 2 x pp_size 2"):
        read_mapping({"mapping": {"tp_size": 2, "pp_size": 2, "world_size": 2}})
    with pytest.raises(ConfigError, match="malformed"):
        read_mapping({"mapping": {"tp_size": "two"}})
    assert rank_file_name(3) == "rank3.safetensors" and rank_file_name(0, ".engine") == "rank0.engine"
    (tmp_path / "rank0.safetensors").write_bytes(b"")
    assert missing_rank_files(tmp_path, 2) == ["rank1.safetensors"]


# --- engine dir ---------------------------------------------------------------------------------------------


def _engine(path: Path, config: dict[str, object]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_engine_dir_reads_both_builders(tmp_path: Path) -> None:
    pretrained = {"architecture": "DbrxForCausalLM", "dtype": "bfloat16", "vocab_size": 100,
                  "quantization": {"quant_algo": "W8A16", "kv_cache_quant_algo": "INT8"},
                  "mapping": {"world_size": 4, "tp_size": 2, "pp_size": 2}}
    build = {"max_batch_size": 16, "max_input_len": 100, "max_seq_len": 200, "max_num_tokens": 1000,
             "max_beam_width": 1, "plugin_config": {"use_paged_context_fmha": True, "tokens_per_block": 64}}
    trtllm = read_engine_dir(_engine(tmp_path / "trt", {"version": "1.2.1", "pretrained_config": pretrained,
                                                          "build_config": build}))
    assert (trtllm.engine_backend, trtllm.world_size, trtllm.rank_suffix) == ("tensorrtllm", 4, ".engine")
    assert trtllm.limits == EngineLimits(16, 100, 200, 1000, 1) and trtllm.max_input_len == 100
    assert (trtllm.dtype, trtllm.logits_dtype, trtllm.vocab_size) == ("bfloat16", "float32", 100)
    assert (trtllm.quant_algo, trtllm.kv_cache_quant_algo) == ("W8A16", "INT8")
    assert trtllm.paged_context_fmha and trtllm.tokens_per_block == 64
    assert trtllm.missing_rank_files() == [f"rank{r}.engine" for r in range(4)]
    assert trtllm.require_built() is trtllm
    pytorch = read_engine_dir(_engine(tmp_path / "pt", {"engine_backend": "pytorch", "pretrained_config": pretrained,
                                                         "build_config": build}))
    assert pytorch.engine_backend == "pytorch" and pytorch.rank_files()[3].name == "rank3.safetensors"


def test_engine_dir_defaults_and_refusals(tmp_path: Path) -> None:
    bare = read_engine_dir(_engine(tmp_path / "ckpt", {"architecture": "MPTForCausalLM", "dtype": "float16",
                                                        "max_position_embeddings": 512}))
    assert not bare.built and bare.engine_backend == "pytorch" and bare.world_size == 1
    assert bare.limits == EngineLimits(8, 511, 512, 2048, 1) and bare.tokens_per_block == 32
    with pytest.raises(ConfigError, match="build_config lacks 'max_batch_size'"):
        bare.require_built()
    partial = read_engine_dir(_engine(tmp_path / "old", {"pretrained_config": {},
                                                         "build_config": {"max_input_len": 30, "max_output_len": 10}}))
    assert partial.max_seq_len == 40 and partial.max_batch_size == 8
    with pytest.raises(ConfigError, match="build_config lacks 'max_batch_size'"):
        partial.require_built()
    assert engine_limits({}, {}) == EngineLimits(8, 1024, 2048, 2048, 1)
    with pytest.raises(ConfigError, match="engine_backend 'onnx'"):
        read_engine_dir(_engine(tmp_path / "x", {"engine_backend": "onnx", "pretrained_config": {}}))
    with pytest.raises(ConfigError, match="malformed limit"):
        read_engine_dir(_engine(tmp_path / "y", {"pretrained_config": {}, "build_config": {"max_seq_len": "long"}}))


# --- weight-only --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_weight_only_round_trip(precision: str) -> None:
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    stored, scale = quantize_weight(weight, precision)
    assert stored.dtype == torch.int8 and stored.shape == (16, 8 if precision == "int8" else 4)
    restored = dequantize_weight(stored, scale, precision)
    assert restored.shape == weight.shape
    # half a step off, a whole step where +2^(bits-1) is clamped to 2^(bits-1) - 1
    assert bool(((restored - weight).abs() <= scale[:, None] + 1e-6).all())
    assert weight_only_precision(WEIGHT_ONLY_ALGOS[precision]) == precision
    assert weight_only_precision(None) is None and weight_only_precision("FP8") is None
