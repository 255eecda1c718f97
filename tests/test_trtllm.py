"""trtllm-build command lines for the seed models' layouts, from checkpoint config.json files alone.

The checkpoint configs come from H1's model specs (`spec_for(hf_config).trtllm_config(...)`), fed with the
published Hugging Face config.json of each model: exactly what `gen-repo convert` would write, without weights.
The expected argv lists are written out literally (flags of TensorRT-LLM 1.2.1's trtllm-build).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from generator.build import BuildSettings
from generator.build.trtllm import (
    TRTLLM_CONTAINER,
    build_with_trtllm,
    check_engine_dir,
    trtllm_build_commands,
)
from generator.convert.models import spec_for
from generator.errors import ConfigError, GenRepoError
from generator.formats.mapping import Mapping

_MPT_ATTN = {"alibi": True, "alibi_bias_max": 8, "attn_impl": "torch", "attn_pdrop": 0.0,
             "attn_type": "multihead_attention", "attn_uses_sequence_id": False, "clip_qkv": None,
             "prefix_lm": False, "qk_ln": False, "softmax_scale": None}
_MPT_COMMON = {"model_type": "mpt", "architectures": ["MPTForCausalLM"], "expansion_ratio": 4, "no_bias": True,
               "norm_type": "low_precision_layernorm", "learned_pos_emb": True, "emb_pdrop": 0.0,
               "resid_pdrop": 0.0, "embedding_fraction": 1.0, "logit_scale": None, "use_cache": False}

HF_CONFIGS: dict[str, dict[str, Any]] = {
    "mpt-7b": {**_MPT_COMMON, "d_model": 4096, "n_heads": 32, "n_layers": 32, "max_seq_len": 2048,
               "vocab_size": 50432, "attn_config": dict(_MPT_ATTN)},
    "mpt-30b": {**_MPT_COMMON, "d_model": 7168, "n_heads": 64, "n_layers": 48, "max_seq_len": 8192,
                "vocab_size": 50432, "attn_config": dict(_MPT_ATTN)},
    "replit-code-v1.5-3b": {**_MPT_COMMON, "d_model": 3072, "n_heads": 24, "n_layers": 32, "max_seq_len": 4096,
                            "vocab_size": 32768,
                            "attn_config": {**_MPT_ATTN, "attn_type": "grouped_query_attention",
                                            "kv_n_heads": 8}},
    "dbrx-base": {"model_type": "dbrx", "architectures": ["DbrxForCausalLM"], "d_model": 6144, "n_heads": 48,
                  "n_layers": 40, "max_seq_len": 32768, "vocab_size": 100352, "tie_word_embeddings": False,
                  "attn_config": {"clip_qkv": 8, "kv_n_heads": 8, "rope_theta": 500000},
                  "ffn_config": {"ffn_hidden_size": 10752, "moe_num_experts": 16, "moe_top_k": 4,
                                 "ffn_act_fn": {"name": "silu"}, "moe_normalize_expert_weights": 1}},
}


def write_checkpoint_config(directory: Path, model: str, dtype: str, mapping: Mapping,
                            quant_algo: str | None = None, kv_cache_quant_algo: str | None = None) -> Path:
    """A checkpoint dir holding only the config.json `gen-repo convert` writes for this layout."""
    config = spec_for(HF_CONFIGS[model]).trtllm_config(
        mapping, dtype, {"quant_algo": quant_algo, "kv_cache_quant_algo": kv_cache_quant_algo})
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def expected(checkpoint: Path, output: Path, dtype: str, *, moe: bool, batch: int, input_len: int, seq_len: int,
             num_tokens: int, workers: int) -> list[str]:
    argv = ["trtllm-build", "--checkpoint_dir", str(checkpoint), "--output_dir", str(output),
            "--gpt_attention_plugin", dtype, "--gemm_plugin", dtype]
    if moe:
        argv += ["--moe_plugin", dtype]
    return argv + ["--max_batch_size", str(batch), "--max_input_len", str(input_len), "--max_seq_len",
                   str(seq_len), "--max_num_tokens", str(num_tokens), "--max_beam_width", "1",
                   "--workers", str(workers), "--kv_cache_type", "paged", "--remove_input_padding", "enable",
                   "--context_fmha", "enable"]


# (id, model, dtype, tp, pp, moe_tp, moe_ep, quant_algo, kv_cache_quant_algo, workers asked, workers expected)
SEED_LAYOUTS = [
    ("mpt-7b-tp1", "mpt-7b", "float16", 1, 1, None, None, None, None, 1, 1),
    ("mpt-7b-tp4", "mpt-7b", "float16", 4, 1, None, None, None, None, 4, 4),
    ("mpt-30b-tp4", "mpt-30b", "float16", 4, 1, None, None, None, None, 8, 4),
    ("replit-tp2", "replit-code-v1.5-3b", "bfloat16", 2, 1, None, None, None, None, 2, 2),
    ("dbrx-tp8", "dbrx-base", "bfloat16", 8, 1, None, None, None, None, 8, 8),
    ("dbrx-tp4pp2", "dbrx-base", "bfloat16", 4, 2, None, None, None, None, 8, 8),
    ("dbrx-ep8", "dbrx-base", "bfloat16", 8, 1, 1, 8, None, None, 8, 8),
    ("dbrx-int8-wo-tp4", "dbrx-base", "float16", 4, 1, None, None, "W8A16", None, 4, 4),
    ("dbrx-int4-wo-tp4", "dbrx-base", "float16", 4, 1, None, None, "W4A16", None, 4, 4),
    ("dbrx-int8kv-tp4", "dbrx-base", "float16", 4, 1, None, None, None, "INT8", 4, 4),
    ("mpt-7b-int8-wo", "mpt-7b", "float16", 1, 1, None, None, "W8A16", None, 1, 1),
    ("mpt-7b-int4-wo", "mpt-7b", "float16", 1, 1, None, None, "W4A16", None, 1, 1),
    ("mpt-7b-int8kv", "mpt-7b", "float16", 1, 1, None, None, None, "INT8", 1, 1),
]


@pytest.mark.parametrize("case", SEED_LAYOUTS, ids=[case[0] for case in SEED_LAYOUTS])
def test_seed_command_lines(tmp_path: Path, case: tuple[Any, ...]) -> None:
    _, model, dtype, tp, pp, moe_tp, moe_ep, quant, kv_quant, workers, expected_workers = case
    mapping = Mapping.create(tp, pp, moe_tp, moe_ep)
    checkpoint = write_checkpoint_config(tmp_path / "ckpt", model, dtype, mapping, quant, kv_quant)
    is_moe = model.startswith("dbrx")
    # MPT: the limits of TensorRT-LLM's MPT example; DBRX: its defaults with a 4k context
    batch, input_len, seq_len = (32, 1024, 1536) if not is_moe else (256, 1024, 4096)
    settings = BuildSettings(checkpoint_dir=checkpoint, output_dir=tmp_path / "engine",
                             engine_backend="tensorrtllm", max_batch_size=batch, max_input_len=input_len,
                             max_seq_len=seq_len, max_num_tokens=8192, workers=workers)
    assert trtllm_build_commands(settings) == [
        expected(checkpoint, tmp_path / "engine", dtype, moe=is_moe, batch=batch, input_len=input_len,
                 seq_len=seq_len, num_tokens=8192, workers=expected_workers)]


def test_dbrx_ep8_checkpoint_mapping(tmp_path: Path) -> None:
    """The EP8 checkpoint really carries moe_tp 1 / moe_ep 8 (trtllm-build reads the split from it)."""
    checkpoint = write_checkpoint_config(tmp_path / "ckpt", "dbrx-base", "bfloat16", Mapping.create(8, 1, 1, 8))
    mapping = json.loads((checkpoint / "config.json").read_text())["mapping"]
    assert (mapping["world_size"], mapping["tp_size"], mapping["moe_tp_size"], mapping["moe_ep_size"]) == (8, 8, 1, 8)


def test_explicit_plugins_and_continuous_cache(tmp_path: Path) -> None:
    checkpoint = write_checkpoint_config(tmp_path / "ckpt", "mpt-7b", "bfloat16", Mapping.create(2))
    settings = BuildSettings(checkpoint_dir=checkpoint, output_dir=tmp_path / "engine",
                             engine_backend="tensorrtllm", max_batch_size=4, max_input_len=128,
                             max_seq_len=256, max_num_tokens=512, workers=1, gemm_plugin="disable",
                             gpt_attention_plugin="float32", moe_plugin="disable", paged_kv_cache=False,
                             remove_input_padding=False)
    (argv,) = trtllm_build_commands(settings)
    assert argv[5:9] == ["--gpt_attention_plugin", "float32", "--gemm_plugin", "disable"]
    assert "--moe_plugin" not in argv
    assert argv[-6:] == ["--kv_cache_type", "continuous", "--remove_input_padding", "disable",
                         "--context_fmha", "enable"]


def test_limits_default_like_the_pytorch_build(tmp_path: Path) -> None:
    """Unset limits resolve as generator.build does: max_seq_len = max_position_embeddings,
    max_num_tokens = min(8192, batch x input)."""
    checkpoint = write_checkpoint_config(tmp_path / "ckpt", "mpt-7b", "float16", Mapping.create(1))
    settings = BuildSettings(checkpoint_dir=checkpoint, output_dir=tmp_path / "engine", max_batch_size=4,
                             max_input_len=512)
    (argv,) = trtllm_build_commands(settings)
    assert argv[argv.index("--max_seq_len") + 1] == "2048"
    assert argv[argv.index("--max_num_tokens") + 1] == "2048"


@pytest.mark.parametrize("overrides, message", [
    ({"gpt_attention_plugin": "disable"}, "gpt_attention_plugin cannot be disabled"),
    ({"gemm_plugin": "int8"}, "gemm_plugin 'int8'"),
    ({"max_seq_len": 4096}, "max_position_embeddings"),
])
def test_rejects_bad_settings(tmp_path: Path, overrides: dict[str, Any], message: str) -> None:
    checkpoint = write_checkpoint_config(tmp_path / "ckpt", "mpt-7b", "float16", Mapping.create(1))
    settings = BuildSettings(checkpoint_dir=checkpoint, output_dir=tmp_path / "engine", **overrides)
    with pytest.raises(ConfigError, match=message):
        trtllm_build_commands(settings)


@pytest.mark.parametrize("field, value, message", [
    ("bias", True, "bias: true"),
    ("qk_layernorm", True, "qk_layernorm"),
    ("position_embedding_type", "learned_absolute", "ALiBi"),
    ("dtype", "int8", "dtype 'int8'"),
    ("architecture", "LlamaForCausalLM", "LlamaForCausalLM"),
    ("quantization", {"quant_algo": "W3A16", "kv_cache_quant_algo": None}, "quant_algo 'W3A16'"),
    ("gen_repo_extensions", ["plain_weight_only_layout"], "gen_repo_extensions: plain_weight_only_layout"),
    ("quantization", {"quant_algo": None, "kv_cache_quant_algo": "INT4"}, "kv_cache_quant_algo 'INT4'"),
    # TensorRT-LLM's MPT builds its MLP as 4 x hidden_size whatever the checkpoint holds
    ("intermediate_size", 3 * 4096, "intermediate_size 12288 .*expansion_ratio 3"),
    # TensorRT-LLM's MPTModel.forward has no send/recv between pipeline stages
    ("mapping", {"world_size": 2, "tp_size": 1, "pp_size": 2}, "mapping.pp_size 2"),
    ("num_attention_heads", 0, "num_attention_heads must be at least 1"),
])
def test_rejects_checkpoints_trtllm_cannot_build(tmp_path: Path, field: str, value: Any, message: str) -> None:
    checkpoint = write_checkpoint_config(tmp_path / "ckpt", "mpt-7b", "float16", Mapping.create(1))
    config = json.loads((checkpoint / "config.json").read_text())
    config[field] = value
    (checkpoint / "config.json").write_text(json.dumps(config))
    settings = BuildSettings(checkpoint_dir=checkpoint, output_dir=tmp_path / "engine")
    with pytest.raises(ConfigError, match=message):
        trtllm_build_commands(settings)


@pytest.mark.parametrize("quantization", [{"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"},
                                          {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": None},
                                          {"quant_algo": "W8A8_SQ_PER_CHANNEL", "kv_cache_quant_algo": "INT8"}])
def test_checks_as_trtllm_not_as_the_pytorch_engine(tmp_path: Path, quantization: dict[str, Any]) -> None:
    """Checkpoints TensorRT-LLM's own quantizer writes (FP8, AWQ, SmoothQuant) get a trtllm-build line: the
    pytorch engine cannot run them, but its parser is not the judge of what trtllm-build can build."""
    checkpoint = write_checkpoint_config(tmp_path / "ckpt", "mpt-7b", "float16", Mapping.create(1))
    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization"] = quantization
    (checkpoint / "config.json").write_text(json.dumps(config))
    (argv,) = trtllm_build_commands(BuildSettings(checkpoint_dir=checkpoint, output_dir=tmp_path / "engine"))
    assert argv[0] == "trtllm-build"


@pytest.mark.parametrize("hf_field, value, message", [
    ("expansion_ratio", 2, "expansion_ratio 2"),
    ("ffn_config", {"ffn_hidden_size": 5000}, "intermediate_size 5000"),
])
def test_mpt_ffn_size_refused_before_any_command(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 hf_field: str, value: Any, message: str) -> None:
    """An MPT whose MLP is not 4 x d_model converts (the pytorch engine runs it) but gets no trtllm-build line."""
    hf_config = {**HF_CONFIGS["mpt-7b"], hf_field: value}
    config = spec_for(hf_config).trtllm_config(Mapping.create(1), "float16", {"quant_algo": None,
                                                                               "kv_cache_quant_algo": None})
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps(config))
    settings = BuildSettings(checkpoint_dir=checkpoint, output_dir=tmp_path / "engine", dry_run=True)
    with pytest.raises(ConfigError, match=message):
        build_with_trtllm(settings)
    assert "trtllm-build" not in capsys.readouterr().out


def test_weight_only_moe_needs_moe_plugin(tmp_path: Path) -> None:
    checkpoint = write_checkpoint_config(tmp_path / "ckpt", "dbrx-base", "float16", Mapping.create(4),
                                         quant_algo="W8A16")
    settings = BuildSettings(checkpoint_dir=checkpoint, output_dir=tmp_path / "engine", moe_plugin="disable")
    with pytest.raises(ConfigError, match="MoE plugin"):
        trtllm_build_commands(settings)


def test_dry_run_prints_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = write_checkpoint_config(tmp_path / "ckpt", "mpt-7b", "float16", Mapping.create(1))
    settings = BuildSettings(checkpoint_dir=checkpoint, output_dir=tmp_path / "engine", max_input_len=256,
                             max_seq_len=512, max_num_tokens=1024, dry_run=True)
    assert build_with_trtllm(settings) == tmp_path / "engine"
    printed = capsys.readouterr().out.strip()
    assert printed.startswith(f"trtllm-build --checkpoint_dir {checkpoint} --output_dir {tmp_path / 'engine'} ")
    assert printed.endswith("--context_fmha enable")
    assert not (tmp_path / "engine").exists()


@pytest.mark.skipif(shutil.which("trtllm-build") is not None, reason="TensorRT-LLM is installed here")
def test_without_tensorrt_llm_names_the_container(tmp_path: Path) -> None:
    checkpoint = write_checkpoint_config(tmp_path / "ckpt", "mpt-7b", "float16", Mapping.create(1))
    settings = BuildSettings(checkpoint_dir=checkpoint, output_dir=tmp_path / "engine")
    with pytest.raises(GenRepoError, match=r"nvcr\.io/nvidia/tritonserver:26\.07-trtllm-python-py3") as error:
        build_with_trtllm(settings)
    assert TRTLLM_CONTAINER in str(error.value)
    assert not (tmp_path / "engine").exists()


def test_check_engine_dir(tmp_path: Path) -> None:
    checkpoint = write_checkpoint_config(tmp_path / "ckpt", "mpt-7b", "float16", Mapping.create(2))
    engine = tmp_path / "engine"
    engine.mkdir()
    pretrained = json.loads((checkpoint / "config.json").read_text())
    (engine / "config.json").write_text(json.dumps(
        {"version": "1.2.1", "pretrained_config": pretrained, "build_config": {"max_batch_size": 8}}))
    (engine / "rank0.engine").write_bytes(b"\0")
    with pytest.raises(GenRepoError, match="rank1.engine"):
        check_engine_dir(engine)
    (engine / "rank1.engine").write_bytes(b"\0")
    assert check_engine_dir(engine) == 2
    (engine / "config.json").write_text(json.dumps(pretrained))
    with pytest.raises(GenRepoError, match="not an engine config"):
        check_engine_dir(engine)



def test_cli_build_tensorrtllm(tmp_path: Path) -> None:
    """`gen-repo build --engine tensorrtllm`: --dry-run prints the command; without TensorRT-LLM it exits 2."""
    from click.testing import CliRunner

    from generator.cli import main

    checkpoint = write_checkpoint_config(tmp_path / "ckpt", "replit-code-v1.5-3b", "bfloat16", Mapping.create(2))
    args = ["build", "--checkpoint-dir", str(checkpoint), "--output", str(tmp_path / "engine"),
            "--engine", "tensorrtllm", "--max-batch-size", "16", "--max-input-len", "512", "--max-seq-len", "576",
            "--workers", "2"]
    result = CliRunner().invoke(main, [*args, "--dry-run"])
    assert result.exit_code == 0, result.output
    (command,) = [line for line in result.output.splitlines() if line.startswith("trtllm-build ")]
    assert command.split() == expected(
        checkpoint, tmp_path / "engine", "bfloat16", moe=False, batch=16, input_len=512, seq_len=576,
        num_tokens=8192, workers=2)
    if shutil.which("trtllm-build") is None:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2
        assert TRTLLM_CONTAINER in result.output
    assert not (tmp_path / "engine").exists()


def test_same_limits_and_plugins_as_the_pytorch_engine(tiny_mpt_job: Any, tmp_path: Path) -> None:
    """On a real converted checkpoint, the trtllm-build flags carry exactly the limits and plugins the pytorch
    backend writes into its engine's build_config for the same settings."""
    from dataclasses import replace

    from generator.build import build_engine

    settings = BuildSettings(checkpoint_dir=tiny_mpt_job.checkpoint_dir, output_dir=tmp_path / "engine",
                             max_batch_size=3, max_input_len=48)
    build_config = json.loads((build_engine(settings) / "config.json").read_text())["build_config"]
    (argv,) = trtllm_build_commands(replace(settings, engine_backend="tensorrtllm"))
    flags = dict(zip(argv[1::2], argv[2::2], strict=True))
    for limit in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "max_beam_width"):
        assert flags[f"--{limit}"] == str(build_config[limit])
    plugins = build_config["plugin_config"]
    assert flags["--gpt_attention_plugin"] == plugins["gpt_attention_plugin"] == "float32"
    assert flags["--gemm_plugin"] == plugins["gemm_plugin"]
    assert flags["--kv_cache_type"] == build_config["kv_cache_type"].lower() == "paged"
    assert flags["--checkpoint_dir"] == str(tiny_mpt_job.checkpoint_dir)


STAND_IN_TRTLLM_BUILD = """#!{python}
# Stand-in for trtllm-build (TensorRT-LLM cannot be installed here): writes the engine dir layout that
# trtllm-build writes (config.json + rank{{r}}.engine), leaving out rank {missing_rank}, or fails with {exit_code}.
import json, sys
from pathlib import Path
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
if {exit_code}:
    sys.exit({exit_code})
checkpoint, output = Path(args["--checkpoint_dir"]), Path(args["--output_dir"])
pretrained = json.loads((checkpoint / "config.json").read_text())
output.mkdir(parents=True, exist_ok=True)
(output / "config.json").write_text(json.dumps({{"version": "1.2.1", "pretrained_config": pretrained,
                                                 "build_config": {{"max_batch_size": int(args["--max_batch_size"])}}}}))
for rank in range(pretrained["mapping"]["world_size"]):
    if rank != {missing_rank}:
        (output / f"rank{{rank}}.engine").write_bytes(b"engine")
"""


@pytest.mark.parametrize("exit_code, missing_rank, error", [
    (0, -1, None), (3, -1, "trtllm-build failed"), (0, 1, "lacks rank1.engine")])
def test_build_runs_trtllm_build_and_checks_its_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       exit_code: int, missing_rank: int, error: str | None) -> None:
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "trtllm-build"
    tool.write_text(STAND_IN_TRTLLM_BUILD.format(python=sys.executable, exit_code=exit_code,
                                                 missing_rank=missing_rank))
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    checkpoint = write_checkpoint_config(tmp_path / "ckpt", "mpt-7b", "float16", Mapping.create(2))
    settings = BuildSettings(checkpoint_dir=checkpoint, output_dir=tmp_path / "engine", engine_backend="tensorrtllm",
                             max_seq_len=1536)
    with pytest.raises(GenRepoError, match="lacks rank0.safetensors, rank1.safetensors"):
        build_with_trtllm(settings)  # a checkpoint without its weights never reaches trtllm-build
    for rank in range(2):
        (checkpoint / f"rank{rank}.safetensors").write_bytes(b"")
    if error is None:
        assert build_with_trtllm(settings) == tmp_path / "engine"
        assert sorted(p.name for p in (tmp_path / "engine").iterdir()) == ["config.json", "rank0.engine",
                                                                          "rank1.engine"]
    else:
        with pytest.raises(GenRepoError, match=error):
            build_with_trtllm(settings)
