"""Weight-only INT8/INT4 quantization (TensorRT-LLM's symmetric per-channel formula) and INT8 KV calibration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from generator.build import BuildSettings, build_engine
from generator.build.trtllm import trtllm_build_commands
from generator.errors import ConfigError, GenRepoError
from generator.formats.weight_only import dequantize_weight, pack_int4, quantize_weight, unpack_int4
from tests.test_convert import convert, make_gqa_mpt, rank_tensors, read_config, write_variant


def reference_quantize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The formula written out element by element: [out, in] -> (q [in, out] unpacked, scale [out])."""
    out_features, in_features = weight.shape
    levels = 2 ** (bits - 1)
    q = torch.zeros(in_features, out_features, dtype=torch.int8)
    scale = torch.zeros(out_features)
    for c in range(out_features):
        amax = max(abs(float(x)) for x in weight[c])
        scale[c] = amax / levels
        for i in range(in_features):
            ratio = float(weight[c, i]) / float(scale[c]) if amax else 0.0
            rounded = int(abs(ratio) + 0.5) * (1 if ratio >= 0 else -1)  # halves away from zero
            q[i, c] = min(max(rounded, -levels), levels - 1)
    return q, scale


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantize_matches_formula_and_round_trips(precision: str) -> None:
    bits = 8 if precision == "int8" else 4
    weight = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    weight[2] = 0.0  # an all-zero channel: scale 0, q 0
    weight[3, 4] = 0.5 * weight[3].abs().max() / 2 ** (bits - 1) * 3  # exactly 1.5 steps: rounds away to 2
    q, scale = quantize_weight(weight, precision)
    expected_q, expected_scale = reference_quantize(weight, bits)
    assert scale.dtype == weight.dtype and scale.shape == (6,)
    assert torch.equal(scale, expected_scale)
    if bits == 4:
        assert q.shape == (10, 3) and q.dtype == torch.int8
        assert torch.equal(unpack_int4(q), expected_q)
    else:
        assert q.shape == (10, 6) and q.dtype == torch.int8
        assert torch.equal(q, expected_q)
    restored = dequantize_weight(q, scale, precision)
    assert restored.shape == weight.shape
    # half a step, except +max which saturates at 2^(bits-1) - 1: one step (the /128, /8 convention)
    error = (restored - weight).abs()
    saturated = (weight / scale.clamp(min=1e-12).unsqueeze(1)) > 2 ** (bits - 1) - 0.5
    assert torch.all(error[~saturated] <= (scale.unsqueeze(1) / 2 + 1e-6).expand_as(error)[~saturated])
    assert torch.all(error <= scale.unsqueeze(1) + 1e-6)


def test_int4_packing_nibble_order() -> None:
    values = torch.tensor([[-8, 7, 0, -1, 3, -5]], dtype=torch.int8)
    packed = pack_int4(values)
    assert packed.tolist() == [[0x78 - 0, 0xF0 - 256, 0xB3 - 256]]  # low nibble = even column
    assert torch.equal(unpack_int4(packed), values)
    every = torch.arange(-8, 8, dtype=torch.int8).repeat(2).view(2, 16)
    assert torch.equal(unpack_int4(pack_int4(every)), every)


def test_quantize_experts_3d() -> None:
    weight = torch.randn(3, 8, 5, dtype=torch.float16)
    q, scale = quantize_weight(weight, "int8")
    assert q.shape == (3, 5, 8) and scale.shape == (3, 8) and scale.dtype == torch.float16
    for expert in range(3):
        q_e, scale_e = quantize_weight(weight[expert], "int8")
        assert torch.equal(q[expert], q_e) and torch.equal(scale[expert], scale_e)
    assert dequantize_weight(q, scale, "int8").shape == weight.shape


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_weight_only_checkpoint_is_what_trtllm_quantizes_itself(mpt_dir: Path, tmp_path: Path,
                                                               precision: str) -> None:
    """convert --use-weight-only writes float weights + quant_algo (TensorRT-LLM's loader quantizes the float
    ones and takes int8 ones as its own interleaved layout), never a pre-quantized layout; the pytorch build
    step writes the engine's plain int8/int4 + per_channel_scale layout into the engine dir."""
    out = convert(mpt_dir, tmp_path / "ckpt", dtype="float16", tensor_parallel_size=2,
                  weight_only_precision=precision, int8_kv_cache=True)
    config = read_config(out)
    assert config["quantization"] == {"quant_algo": "W8A16" if precision == "int8" else "W4A16",
                                      "kv_cache_quant_algo": "INT8"}
    assert "gen_repo_extensions" not in config
    float_ckpt = convert(mpt_dir, tmp_path / "float", dtype="float16", tensor_parallel_size=2, int8_kv_cache=True)
    for rank in range(2):  # the checkpoint's tensors are exactly the float checkpoint's (KV scales included)
        tensors, reference = rank_tensors(out, rank), rank_tensors(float_ckpt, rank)
        assert tensors.keys() == reference.keys()
        assert all(torch.equal(tensors[name], reference[name]) for name in tensors)
        assert "transformer.layers.0.attention.kv_cache_scaling_factor" in tensors
    (argv,) = trtllm_build_commands(BuildSettings(out, tmp_path / "trt-engine", engine_backend="tensorrtllm"))
    assert argv[0] == "trtllm-build"

    engine = build_engine(BuildSettings(out, tmp_path / "engine", max_batch_size=2))
    assert read_config(engine)["pretrained_config"] == config
    pack = 2 if precision == "int4" else 1
    for rank in range(2):
        quantized, reference = rank_tensors(engine, rank), rank_tensors(float_ckpt, rank)
        assert not (engine / f"rank{rank}.safetensors").samefile(out / f"rank{rank}.safetensors")
        for name in ("attention.qkv", "attention.dense", "mlp.fc", "mlp.proj"):
            weight_name = f"transformer.layers.0.{name}.weight"
            weight, scale = quantized[weight_name], quantized[f"transformer.layers.0.{name}.per_channel_scale"]
            out_features, in_features = reference[weight_name].shape
            assert weight.dtype == torch.int8 and weight.shape == (in_features, out_features // pack)
            assert scale.dtype == torch.float16 and scale.shape == (out_features,)
            expected_q, expected_scale = quantize_weight(reference[weight_name], precision)
            assert torch.equal(weight, expected_q) and torch.equal(scale, expected_scale)
            error = (dequantize_weight(weight, scale, precision).float() - reference[weight_name].float()).abs()
            assert torch.all(error <= scale.float().unsqueeze(1) + 1e-3)
        for name in ("lm_head.weight", "transformer.vocab_embedding.weight", "transformer.ln_f.weight",
                     "transformer.layers.0.attention.kv_cache_scaling_factor"):
            assert torch.equal(quantized[name], reference[name])
        assert not any(name.startswith("lm_head.") and name != "lm_head.weight" for name in quantized)


def test_pre_quantized_weight_only_checkpoint_gets_no_trtllm_build_line(mpt_dir: Path, tmp_path: Path) -> None:
    """A W8A16 checkpoint holding int8 GEMM weights (the layout gen-repo wrote before) would be misread by
    trtllm-build; it is refused, naming the tensor, while the pytorch build still takes it as it is."""
    out = convert(mpt_dir, tmp_path / "ckpt", weight_only_precision="int8")
    engine = build_engine(BuildSettings(out, tmp_path / "engine", max_batch_size=2))
    (out / "rank0.safetensors").unlink()  # the engine's quantized file put back as the checkpoint's
    (out / "rank0.safetensors").write_bytes((engine / "rank0.safetensors").read_bytes())
    with pytest.raises(ConfigError, match=r"rank0\.safetensors: transformer\.layers\.\d\.\w+\.\w+\.weight "
                                          r"is already quantized \(I8\)"):
        trtllm_build_commands(BuildSettings(out, tmp_path / "trt", engine_backend="tensorrtllm", dry_run=True))
    again = build_engine(BuildSettings(out, tmp_path / "engine2", max_batch_size=2))
    assert rank_tensors(again, 0).keys() == rank_tensors(engine, 0).keys()
    assert all(torch.equal(rank_tensors(again, 0)[k], v) for k, v in rank_tensors(engine, 0).items())


def test_weight_only_dbrx_experts(dbrx_dir: Path, tmp_path: Path) -> None:
    out = convert(dbrx_dir, tmp_path / "ckpt", weight_only_precision="int4", tensor_parallel_size=2,
                  moe_expert_parallel_size=2)
    assert rank_tensors(out, 1)["transformer.layers.0.mlp.fc.weight"].dtype == torch.float32
    engine = build_engine(BuildSettings(out, tmp_path / "engine", max_batch_size=2, workers=2))
    hf = load_file(dbrx_dir / "model.safetensors")
    trt = rank_tensors(engine, 1)  # moe_ep_rank 1: experts 2 and 3
    fc, fc_scale = trt["transformer.layers.0.mlp.fc.weight"], trt["transformer.layers.0.mlp.fc.per_channel_scale"]
    assert fc.shape == (2, 64, 192 // 2) and fc_scale.shape == (2, 192)
    proj, proj_scale = trt["transformer.layers.0.mlp.proj.weight"], trt["transformer.layers.0.mlp.proj.per_channel_scale"]
    assert proj.shape == (2, 96, 64 // 2) and proj_scale.shape == (2, 64)
    assert trt["transformer.layers.0.mlp.router.weight"].dtype == torch.float32
    assert "transformer.layers.0.mlp.router.per_channel_scale" not in trt
    up = hf["transformer.blocks.0.ffn.experts.mlp.v1"].view(4, 96, 64)[2:]
    restored = dequantize_weight(fc, fc_scale, "int4")
    assert torch.all((restored[:, :96] - up).abs() <= fc_scale[:, :96].unsqueeze(2) + 1e-6)


def _qkv_amax_per_layer(model_dir: Path, input_ids: torch.Tensor) -> list[float]:
    """max |norm_1(h_l) @ Wqkv^T| from the HF model's hidden states: independent of the hooks."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model(input_ids=input_ids, output_hidden_states=True).hidden_states
        return [float(block.attn.Wqkv(block.norm_1(hidden[i])).abs().max())
                for i, block in enumerate(model.transformer.blocks)]


def test_int8_kv_cache_scales(mpt_dir: Path, tmp_path: Path) -> None:
    text = tmp_path / "calib.txt"
    text.write_text("def add(a, b):\n    return a + b\n")
    out = convert(mpt_dir, tmp_path / "ckpt", int8_kv_cache=True, calib_text=text, pipeline_parallel_size=2)
    assert read_config(out)["quantization"]["kv_cache_quant_algo"] == "INT8"
    # no tokenizer in the tiny model dir: calibration runs on UTF-8 byte ids
    ids = torch.tensor([[byte % 512 for byte in text.read_bytes()]])
    expected = [amax / 127 for amax in _qkv_amax_per_layer(mpt_dir, ids)]
    for rank in range(2):  # one layer per pipeline stage, renumbered 0
        scale = rank_tensors(out, rank)["transformer.layers.0.attention.kv_cache_scaling_factor"]
        assert scale.dtype == torch.float32 and scale.shape == (1,)
        assert float(scale) > 0
        assert float(scale) == pytest.approx(expected[rank], rel=1e-5)


def test_int8_kv_cache_dbrx_default_text(dbrx_dir: Path, tmp_path: Path) -> None:
    out = convert(dbrx_dir, tmp_path / "ckpt", int8_kv_cache=True, tensor_parallel_size=2)
    scales = [rank_tensors(out, rank)[f"transformer.layers.{layer}.attention.kv_cache_scaling_factor"]
              for rank in range(2) for layer in range(2)]
    assert all(float(scale) > 0 for scale in scales)
    assert torch.equal(scales[0], scales[2])  # the same per-layer scale on every tensor-parallel rank


def test_int8_kv_cache_gqa_mpt_without_remote_code(mpt_dir: Path, tmp_path: Path) -> None:
    """GQA runs as the equivalent MHA model (KV heads repeated): its scales equal that MHA model's."""
    gqa = make_gqa_mpt(mpt_dir, tmp_path / "gqa", 2)
    tensors = load_file(gqa / "model.safetensors")
    equivalent = dict(tensors)
    for name, tensor in tensors.items():
        if name.endswith("attn.Wqkv.weight"):
            q, k, v = tensor.split([64, 32, 32])
            equivalent[name] = torch.cat([q] + [part.view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)
                                                for part in (k, v)])
    mha = write_variant(mpt_dir, tmp_path / "mha", {}, equivalent)
    text = tmp_path / "calib.txt"
    text.write_text("grouped query attention calibration")
    out = convert(gqa, tmp_path / "ckpt", int8_kv_cache=True, calib_text=text, tensor_parallel_size=4)
    ids = torch.tensor([[byte % 512 for byte in text.read_bytes()]])
    expected = [amax / 127 for amax in _qkv_amax_per_layer(mha, ids)]
    for layer in range(2):
        scale = rank_tensors(out, 3)[f"transformer.layers.{layer}.attention.kv_cache_scaling_factor"]
        assert float(scale) == pytest.approx(expected[layer], rel=1e-5)


def test_int8_kv_cache_needs_remote_code_for_qk_ln(mpt_dir: Path, tmp_path: Path) -> None:
    tensors = load_file(mpt_dir / "model.safetensors")
    for layer in range(2):
        tensors[f"transformer.blocks.{layer}.attn.q_ln.weight"] = torch.ones(64)
        tensors[f"transformer.blocks.{layer}.attn.k_ln.weight"] = torch.ones(64)
    model = write_variant(mpt_dir, tmp_path / "hf", {"attn_config": {"qk_ln": True}}, tensors)
    with pytest.raises(GenRepoError, match=r"lacks attn_config\.qk_ln; pass --trust-remote-code"):
        convert(model, tmp_path / "ckpt", int8_kv_cache=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_int8_kv_cache_uses_the_checkpoint_tokenizer(tmp_path: Path) -> None:
    from generator.formats.tokenizer import load_tokenizer
    from generator.tiny import make_tiny_model

    model = make_tiny_model("tiny-mpt", tmp_path / "hf")
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.")
    out = convert(model, tmp_path / "ckpt", int8_kv_cache=True, calib_text=text)
    ids = torch.tensor([load_tokenizer(model).encode(text.read_text())])
    expected = [amax / 127 for amax in _qkv_amax_per_layer(model, ids)]
    for layer, value in enumerate(expected):
        scale = rank_tensors(out, 0)[f"transformer.layers.{layer}.attention.kv_cache_scaling_factor"]
        assert float(scale) == pytest.approx(value, rel=1e-5)
