"""`describe_checkpoint` / `unshard_checkpoint`: every sharded layout merges back into the TP1 conversion."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from generator.cli import main
from generator.convert.inspect import describe_checkpoint, unshard_checkpoint
from generator.errors import ConfigError
from tests.factories import make_dbrx, make_mpt
from tests.test_convert import convert, make_gqa_mpt, rank_tensors, read_config


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    mha = make_mpt(root / "mpt", vocab_size=510)  # 510 is not a multiple of 4: lm_head gets padded at TP4
    return {"mpt": mha, "mpt_gqa2": make_gqa_mpt(mha, root / "mpt_gqa2", 2),
            "mpt_mqa": make_gqa_mpt(mha, root / "mpt_mqa", 1),
            "dbrx": make_dbrx(root / "dbrx", vocab_size=509, n_layers=3)}


LAYOUTS = [
    ("mpt", {"tensor_parallel_size": 2}),
    ("mpt", {"pipeline_parallel_size": 2}),
    ("mpt", {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}),
    ("mpt", {"tensor_parallel_size": 4}),
    ("mpt_gqa2", {"tensor_parallel_size": 4}),
    ("mpt_mqa", {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}),
    ("dbrx", {"tensor_parallel_size": 2}),
    ("dbrx", {"tensor_parallel_size": 2, "moe_tensor_parallel_size": 1, "moe_expert_parallel_size": 2}),
    ("dbrx", {"tensor_parallel_size": 4, "moe_tensor_parallel_size": 2, "moe_expert_parallel_size": 2}),
    ("dbrx", {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "moe_expert_parallel_size": 2}),
]


@pytest.mark.parametrize(("model", "layout"), LAYOUTS, ids=lambda value: str(value))
def test_unshard_equals_tp1_conversion(models: dict[str, Path], tmp_path: Path, model: str,
                                       layout: dict[str, int]) -> None:
    reference = convert(models[model], tmp_path / "tp1")
    sharded = convert(models[model], tmp_path / "sharded", workers=2, **layout)
    world = layout.get("tensor_parallel_size", 1) * layout.get("pipeline_parallel_size", 1)
    assert sorted(p.name for p in sharded.iterdir()) == ["config.json"] + [f"rank{r}.safetensors" for r in range(world)]
    merged = unshard_checkpoint(sharded, tmp_path / "merged")
    assert read_config(merged) == read_config(reference)
    expected, actual = rank_tensors(reference, 0), rank_tensors(merged, 0)
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and torch.equal(actual[name], tensor), name


def test_describe_reports_ranks_and_tensors(models: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = convert(models["dbrx"], tmp_path / "ckpt", tensor_parallel_size=2, pipeline_parallel_size=2,
                         dtype="bfloat16")
    description = describe_checkpoint(checkpoint)
    assert description["architecture"] == "DbrxForCausalLM"
    assert description["mapping"]["world_size"] == 4
    assert [(r["rank"], r["tp_rank"], r["pp_rank"], r["layers"]) for r in description["ranks"]] == [
        (0, 0, 0, [0, 1]), (1, 1, 0, [0, 1]), (2, 0, 1, [2]), (3, 1, 1, [2])]
    tensors = {t["name"]: t for t in description["ranks"][3]["tensors"]}
    assert tensors["lm_head.weight"] == {"name": "lm_head.weight", "shape": [255, 64], "dtype": "BF16",
                                         "bytes": 255 * 64 * 2}
    assert tensors["transformer.layers.0.mlp.router.weight"]["dtype"] == "F32"
    assert "transformer.vocab_embedding.weight" not in tensors
    assert description["ranks"][3]["bytes"] == sum(t["bytes"] for t in tensors.values())


def test_cli_inspect_and_unshard(models: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = convert(models["mpt"], tmp_path / "ckpt", tensor_parallel_size=2)
    result = CliRunner().invoke(main, ["inspect", str(checkpoint), "--unshard", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert "rank 1 (tp 1, pp 0, layers 0-1)" in result.output
    assert "lm_head.weight" in result.output
    assert read_config(tmp_path / "merged")["mapping"]["tp_size"] == 1


def test_unshard_weight_only_equals_the_tp1_conversion(models: dict[str, Path], tmp_path: Path) -> None:
    """Weight-only checkpoints hold float weights + quant_algo, so they merge like float ones."""
    checkpoint = convert(models["mpt"], tmp_path / "ckpt", tensor_parallel_size=2, weight_only_precision="int8")
    merged = unshard_checkpoint(checkpoint, tmp_path / "merged")
    tp1 = convert(models["mpt"], tmp_path / "tp1", weight_only_precision="int8")
    assert read_config(merged) == read_config(tp1)
    merged_tensors, tp1_tensors = load_file(merged / "rank0.safetensors"), load_file(tp1 / "rank0.safetensors")
    assert merged_tensors.keys() == tp1_tensors.keys()
    assert all(torch.equal(merged_tensors[name], tp1_tensors[name]) for name in tp1_tensors)


def test_unshard_rejects_pre_quantized_weights(models: dict[str, Path], tmp_path: Path) -> None:
    from generator.build import BuildSettings, build_engine

    checkpoint = convert(models["mpt"], tmp_path / "ckpt", tensor_parallel_size=2, weight_only_precision="int8")
    engine = build_engine(BuildSettings(checkpoint, tmp_path / "engine", max_batch_size=2))
    for rank in range(2):  # the int8 layout gen-repo's checkpoints held before
        (checkpoint / f"rank{rank}.safetensors").unlink()
        (checkpoint / f"rank{rank}.safetensors").write_bytes((engine / f"rank{rank}.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="pre-quantized int8 weights"):
        unshard_checkpoint(checkpoint, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
