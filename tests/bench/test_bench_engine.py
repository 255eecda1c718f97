"""`gen-repo bench`'s random models: the layout `convert` writes, weights handed to the engine in memory
(`--weights-on-device`) running exactly like the same tensors read from a rank file, and DBRX over two ranks."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from generator.bench import random_weights
from generator.bench.engine import main as bench_main
from generator.build import BuildSettings, build_engine
from generator.build.pytorch import pytorch_engine_config
from generator.convert.job import ConvertSettings, convert_checkpoint
from generator.convert.models import ModelSpec
from generator.engine.executor import Executor
from generator.engine.sampling import SamplingConfig
from generator.errors import ConfigError
from generator.formats.mapping import Mapping
from generator.formats.safetensors import read_safetensors_header
from tests.factories import make_dbrx

PROMPTS = [[1, 2, 3, 4, 5], [7, 100, 20, 3]]
TINY: dict[str, dict[str, Any]] = {
    "mpt": {"hidden": 64, "layers": 2, "heads": 4, "vocab": 128, "max_seq_len": 32},
    "dbrx": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 128, "max_seq_len": 32,
             "experts": 4, "top_k": 2, "intermediate": 96, "clip_qkv": 8.0},
}


def engine_config(arch: str, dtype: str, weight_only: str | None, root: Path, **sizes: Any
                  ) -> tuple[ModelSpec, dict[str, Any], BuildSettings]:
    spec = random_weights.model_spec(arch, **{**TINY[arch], **sizes})
    pretrained = random_weights.checkpoint_config(spec, Mapping(), dtype, weight_only)
    settings = BuildSettings(root / "checkpoint", root / "engine", max_batch_size=4, max_input_len=8,
                             max_seq_len=spec.max_seq_len)
    return spec, pretrained, settings


def greedy(executor: Executor, new_tokens: int = 6) -> list[list[int]]:
    return [executor.generate(p, SamplingConfig(max_new_tokens=new_tokens), timeout=120).token_ids for p in PROMPTS]


@pytest.mark.parametrize(("arch", "dtype", "weight_only"), [
    ("mpt", "float32", None), ("dbrx", "float32", None), ("dbrx", "bfloat16", None),
    ("mpt", "float32", "int8"), ("dbrx", "float32", "int8"), ("dbrx", "bfloat16", "int4")])
def test_weights_in_memory_run_like_the_built_rank_file(tmp_path: Path, arch: str, dtype: str,
                                                        weight_only: str | None) -> None:
    spec, pretrained, settings = engine_config(arch, dtype, weight_only, tmp_path)
    tensors = dict(random_weights.random_rank_weights(spec, Mapping(), getattr(torch, dtype), weight_only,
                                                      torch.device("cpu"), seed=3))
    if weight_only:
        assert any(t.dtype == torch.int8 for t in tensors.values())
    # on disk: the checkpoint the bench writes, through the pytorch build (int8 weights pass through as they are)
    settings.checkpoint_dir.mkdir()
    (settings.checkpoint_dir / "config.json").write_text(json.dumps(pretrained))
    save_file(tensors, str(settings.checkpoint_dir / "rank0.safetensors"))
    built = build_engine(settings)
    with Executor(built, device="cpu") as executor:
        expected = greedy(executor)
    # in memory: an engine dir of config.json alone
    in_memory = tmp_path / "in-memory"
    in_memory.mkdir()
    (in_memory / "config.json").write_text(json.dumps(pytorch_engine_config(settings, pretrained)))
    given = {name: tensor.clone() for name, tensor in tensors.items()}
    storage = {name: tensor.data_ptr() for name, tensor in given.items() if tensor.is_floating_point()}
    with Executor(in_memory, device="cpu", weights=given) as executor:
        assert greedy(executor) == expected
        assert given == {}  # taken over by the engine
        held = executor._model.tensors
        assert all(held[name].data_ptr() == pointer for name, pointer in storage.items() if name in held
                   and held[name].device.type != "meta")  # not copied
    assert [path.name for path in in_memory.iterdir()] == ["config.json"]
    assert len({tuple(tokens) for tokens in expected}) == len(PROMPTS)  # not a degenerate model


def test_random_dbrx_has_the_converted_layout(tmp_path: Path) -> None:
    """Names, shapes, dtypes and config.json of a TP2 rank equal what `convert` writes for that DBRX."""
    hf_dir = make_dbrx(tmp_path / "hf", d_model=64, n_heads=4, kv_n_heads=2, n_layers=2, vocab_size=130,
                       max_seq_len=32, num_experts=4, top_k=2, ffn_hidden_size=96)
    converted = convert_checkpoint(ConvertSettings(hf_dir, tmp_path / "converted", dtype="bfloat16",
                                                   tensor_parallel_size=2, progress=False))
    spec = random_weights.model_spec("dbrx", **{**TINY["dbrx"], "vocab": 130})
    mapping = Mapping.create(2, rank=1)
    config = random_weights.checkpoint_config(spec, mapping, "bfloat16", None)
    assert config == json.loads((converted / "config.json").read_text())
    header = read_safetensors_header(converted / "rank1.safetensors")
    ours = dict(random_weights.random_rank_weights(spec, mapping, torch.bfloat16, None, torch.device("cpu"), 0))
    assert list(ours) == list(header)
    for name, tensor in ours.items():
        assert list(tensor.shape) == header[name]["shape"], name
        assert {torch.bfloat16: "BF16", torch.float32: "F32"}[tensor.dtype] == header[name]["dtype"], name


def test_forty_random_layers_keep_bfloat16_logits_finite(tmp_path: Path) -> None:
    """The std fan_in ** -0.5 keeps activations in range at DBRX's depth (weights-only int8 alike)."""
    for weight_only in (None, "int8"):
        spec, pretrained, settings = engine_config("dbrx", "bfloat16", weight_only, tmp_path / str(weight_only),
                                                   layers=40)
        settings.output_dir.mkdir(parents=True)
        (settings.output_dir / "config.json").write_text(json.dumps(pytorch_engine_config(settings, pretrained)))
        weights = dict(random_weights.random_rank_weights(spec, Mapping(), torch.bfloat16, weight_only,
                                                          torch.device("cpu"), seed=0))
        with Executor(settings.output_dir, device="cpu", weights=weights) as executor:
            result = executor.generate(PROMPTS[0], SamplingConfig(max_new_tokens=4, return_log_probs=True),
                                       timeout=120)
        assert result.log_probs is not None and len(result.log_probs) == 4
        assert all(math.isfinite(p) for p in result.log_probs)
        assert max(result.log_probs) < -0.01  # logits neither exploded (one token certain) nor all equal
        assert min(result.log_probs) > -math.log(128) - 5


def test_dbrx_on_two_ranks_with_weights_on_device(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    sizes = TINY["dbrx"]
    argv = ["--arch", "dbrx", "--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2",
            "--experts", "4", "--top-k", "2", "--intermediate", str(sizes["intermediate"]), "--vocab", "128",
            "--batch-sizes", "1,3", "--input-len", "8", "--output-len", "4", "--max-seq-len", "64",
            "--max-batch-size", "8", "--weights-on-device", "--nproc", "2", "--work-dir", str(tmp_path / "work"),
            "--json", str(report)]
    assert bench_main(argv) == 0
    summary = json.loads(report.read_text())
    assert summary["world_size"] == 2
    assert [r["generated_tokens"] for r in summary["results"]] == [4, 12]
    assert sorted(p.name for p in (tmp_path / "work" / "engine").iterdir()) == ["config.json"]
    assert not list((tmp_path / "work" / "checkpoint").iterdir())
    build = json.loads((tmp_path / "work" / "engine" / "config.json").read_text())["build_config"]
    assert (build["max_batch_size"], build["max_seq_len"]) == (8, 64)


def test_closed_loop_keeps_the_batch_in_flight_until_every_request_was_sent(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "bench.json"
    argv = ["--hidden", "64", "--layers", "2", "--heads", "4", "--vocab", "128", "--batch-sizes", "2,3",
            "--input-len", "6", "--output-len", "4", "--closed-loop", "7", "--prefill-wait-steps", "2",
            "--json", str(report)]
    assert bench_main(argv) == 0
    summary = json.loads(report.read_text())
    assert summary["prefill_wait_steps"] == 2
    results = summary["results"]
    assert [(r["batch"], r["mode"], r["requests"], r["generated_tokens"]) for r in results] == [
        (2, "closed-loop", 7, 28), (3, "closed-loop", 7, 28)]
    for result in results:
        assert result["tokens_per_s"] > 0 and result["mean_ttft_s"] > 0
        assert 0 < result["itl_p50_ms"] <= result["itl_p99_ms"] and result["decode_step_ms"] > 0
        steps = result["steps"]
        assert steps["graph_steps"] == 0 and steps["eager_steps"] >= 4  # CPU: every step eager
        assert 0 <= steps["mixed_steps"] < steps["eager_steps"]
        # each request's 3 decodes after its prompt, and with the executor's lookahead maybe a wasted 4th
        assert 7 * 3 <= steps["decode_rows_in_eager"] <= 7 * 4
        assert steps["eager_tokens"] == 7 * 6 + steps["decode_rows_in_eager"]
    out = capsys.readouterr().out
    assert "batch   2: closed-loop, 7 requests:" in out and " eager (" in out


def test_all_at_once_stays_the_default_and_reports_its_steps(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    assert bench_main(["--hidden", "64", "--layers", "2", "--heads", "4", "--vocab", "128", "--batch-sizes", "3",
                       "--input-len", "6", "--output-len", "4", "--json", str(report)]) == 0
    (result,) = json.loads(report.read_text())["results"]
    assert (result["mode"], result["generated_tokens"], "requests" in result) == ("all-at-once", 12, False)
    steps = result["steps"]
    assert steps["eager_steps"] >= 4 and steps["eager_tokens"] == 3 * 6 + steps["decode_rows_in_eager"]


def test_closed_loop_smaller_than_a_batch_is_refused() -> None:
    with pytest.raises(ConfigError, match="--closed-loop 2 is smaller than batch size 3"):
        bench_main(["--batch-sizes", "1,3", "--closed-loop", "2"])
