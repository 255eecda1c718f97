"""The pytorch engine on one rank: greedy parity with transformers, in-flight batching, request semantics."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from generator.build import BuildSettings, build_engine
from generator.convert.job import ConvertSettings, convert_checkpoint
from generator.engine import Executor, GenerationRequest, GenerationResult, SamplingConfig, run_prompts
from generator.formats.weight_only import dequantize_weight
from tests.factories import hf_greedy, make_dbrx, make_mpt

PROMPTS = [[1, 2, 3, 4, 5], [7, 100, 200], [42] * 11, [300, 5, 17, 17, 250, 9, 10]]
NEW_TOKENS = 10


def engine_for(hf_dir: Path, root: Path, dtype: str = "float32", max_batch_size: int = 4) -> Path:
    checkpoint = convert_checkpoint(ConvertSettings(hf_dir, root / f"checkpoint-{dtype}", dtype=dtype,
                                                    progress=False))
    return build_engine(BuildSettings(checkpoint, root / f"engine-{dtype}", max_batch_size=max_batch_size,
                                      max_input_len=32, max_seq_len=64))


@pytest.fixture(scope="module")
def mpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[list[int]]]:
    root = tmp_path_factory.mktemp("mpt")
    hf_dir = make_mpt(root / "hf")
    return hf_dir, engine_for(hf_dir, root), hf_greedy(hf_dir, PROMPTS, NEW_TOKENS)


@pytest.fixture(scope="module")
def executor(mpt: tuple[Path, Path, list[list[int]]]) -> Executor:
    with Executor(mpt[1]) as running:
        yield running


def collect(executor: Executor, prompt: list[int], sampling: SamplingConfig,
            streaming: bool = False) -> tuple[threading.Event, list[GenerationResult]]:
    done, results = threading.Event(), []

    def on_result(result: GenerationResult) -> None:
        results.append(result)
        if result.finished:
            done.set()

    executor.enqueue(GenerationRequest(prompt, sampling, streaming), on_result)
    return done, results


def test_mpt_greedy_parity(mpt: tuple[Path, Path, list[list[int]]]) -> None:
    _, engine, expected = mpt
    results = run_prompts(engine, PROMPTS, SamplingConfig(max_new_tokens=NEW_TOKENS))
    assert [r.token_ids for r in results] == expected
    assert all(r.finished and r.finish_reason == "length" for r in results)


def test_mpt_clip_qkv_parity(tmp_path: Path) -> None:
    hf_dir = make_mpt(tmp_path / "hf", seed=3, n_heads=8, attn_config={"clip_qkv": 0.6})
    engine = engine_for(hf_dir, tmp_path)
    results = run_prompts(engine, PROMPTS[:2], SamplingConfig(max_new_tokens=NEW_TOKENS))
    assert [r.token_ids for r in results] == hf_greedy(hf_dir, PROMPTS[:2], NEW_TOKENS)


@pytest.mark.parametrize(("kv_heads", "experts", "top_k"), [(2, 4, 2), (1, 8, 3)])
def test_dbrx_greedy_parity(tmp_path: Path, kv_heads: int, experts: int, top_k: int) -> None:
    hf_dir = make_dbrx(tmp_path / "hf", kv_n_heads=kv_heads, num_experts=experts, top_k=top_k)
    engine = engine_for(hf_dir, tmp_path)
    results = run_prompts(engine, PROMPTS[:3], SamplingConfig(max_new_tokens=NEW_TOKENS))
    assert [r.token_ids for r in results] == hf_greedy(hf_dir, PROMPTS[:3], NEW_TOKENS)


def test_inflight_batching_matches_requests_alone(executor: Executor, mpt: tuple[Path, Path, list[list[int]]]
                                                  ) -> None:
    expected = mpt[2]
    runs = []
    # more requests than slots, joining while others are mid-generation
    for index, prompt in enumerate(PROMPTS + PROMPTS[:2]):
        runs.append(collect(executor, prompt, SamplingConfig(max_new_tokens=NEW_TOKENS), streaming=index % 2 == 0))
        time.sleep(0.01 * index)
    for done, _ in runs:
        assert done.wait(60)
    for index, (_, results) in enumerate(runs):
        tokens = [t for r in results for t in r.token_ids]
        assert tokens == expected[index % len(PROMPTS)]
        assert [r.finished for r in results].count(True) == 1 and results[-1].finished


def test_streaming_yields_one_token_per_result(executor: Executor, mpt: tuple[Path, Path, list[list[int]]]
                                               ) -> None:
    done, results = collect(executor, PROMPTS[0], SamplingConfig(max_new_tokens=NEW_TOKENS, return_log_probs=True),
                            streaming=True)
    assert done.wait(60)
    assert [r.token_ids for r in results] == [[t] for t in mpt[2][0]]
    assert all(r.log_probs is not None and len(r.log_probs) == 1 and r.log_probs[0] <= 0 for r in results)
    assert results[-1].cum_log_prob == pytest.approx(sum(r.log_probs[0] for r in results if r.log_probs))
    assert [r.finished for r in results] == [False] * (NEW_TOKENS - 1) + [True]
    assert len({r.request_id for r in results}) == 1


def test_end_id_stops_and_is_not_returned(executor: Executor, mpt: tuple[Path, Path, list[list[int]]]) -> None:
    expected = mpt[2][3]
    end_id = expected[4]
    cut = expected.index(end_id)
    result = executor.generate(PROMPTS[3], SamplingConfig(max_new_tokens=NEW_TOKENS, end_id=end_id), timeout=60)
    assert result.token_ids == expected[:cut]
    assert result.finish_reason == "end_id"


def test_min_tokens_masks_end_id(executor: Executor, mpt: tuple[Path, Path, list[list[int]]]) -> None:
    expected = mpt[2][3]
    end_id = expected[0]
    result = executor.generate(PROMPTS[3], SamplingConfig(max_new_tokens=NEW_TOKENS, end_id=end_id, min_tokens=2),
                               timeout=60)
    assert len(result.token_ids) >= 2 and end_id not in result.token_ids[:2]


def test_stop_words_keep_the_stop_tokens(executor: Executor, mpt: tuple[Path, Path, list[list[int]]]) -> None:
    expected = mpt[2][0]
    stop = expected[3:5]
    result = executor.generate(PROMPTS[0], SamplingConfig(max_new_tokens=NEW_TOKENS, stop_words=[[999 % 512], stop]),
                               timeout=60)
    assert result.finish_reason == "stop_words"
    assert result.token_ids[-2:] == stop and result.token_ids == expected[: len(result.token_ids)]


def test_bad_words_are_never_generated(executor: Executor, mpt: tuple[Path, Path, list[list[int]]]) -> None:
    expected = mpt[2][1]
    result = executor.generate(PROMPTS[1], SamplingConfig(max_new_tokens=NEW_TOKENS, bad_words=[[expected[0]]]),
                               timeout=60)
    assert result.token_ids[0] != expected[0] and expected[0] not in result.token_ids


def test_sampling_is_reproducible_with_a_seed(executor: Executor) -> None:
    config = SamplingConfig(max_new_tokens=NEW_TOKENS, top_k=50, top_p=0.9, temperature=1.5, seed=1234,
                            return_log_probs=True)
    first = executor.generate(PROMPTS[0], config, timeout=60)
    second = executor.generate(PROMPTS[0], config, timeout=60)
    assert first.token_ids == second.token_ids and len(first.token_ids) == NEW_TOKENS
    assert first.log_probs is not None and len(first.log_probs) == NEW_TOKENS
    assert all(p <= 0 for p in first.log_probs) and first.cum_log_prob == pytest.approx(sum(first.log_probs))


def test_top_k_one_is_greedy(executor: Executor, mpt: tuple[Path, Path, list[list[int]]]) -> None:
    result = executor.generate(PROMPTS[2], SamplingConfig(max_new_tokens=NEW_TOKENS, top_k=1, temperature=0.7,
                                                          repetition_penalty=1.0), timeout=60)
    assert result.token_ids == mpt[2][2]


def test_repetition_penalty_changes_a_repetitive_output(executor: Executor,
                                                        mpt: tuple[Path, Path, list[list[int]]]) -> None:
    expected = mpt[2][1]  # greedy repeats one token
    result = executor.generate(PROMPTS[1], SamplingConfig(max_new_tokens=NEW_TOKENS, repetition_penalty=5.0),
                               timeout=60)
    assert result.token_ids != expected
    assert max(result.token_ids.count(t) for t in result.token_ids) < max(expected.count(t) for t in expected)


def test_cancel_finishes_with_cancelled(executor: Executor) -> None:
    done, results = collect(executor, PROMPTS[0], SamplingConfig(max_new_tokens=50), streaming=True)
    while not results:
        time.sleep(0.001)
    executor.cancel(results[0].request_id)
    assert done.wait(60)
    assert results[-1].finish_reason == "cancelled" and len(results) < 50
    assert [r.finished for r in results].count(True) == 1


@pytest.mark.parametrize(("input_ids", "sampling", "message"), [
    ([], SamplingConfig(), "empty"),
    (list(range(33)), SamplingConfig(), "max_input_len"),
    ([1, 2], SamplingConfig(max_new_tokens=63), "max_seq_len"),
    ([1, 2], SamplingConfig(max_new_tokens=0), "max_new_tokens"),
    ([1, 2], SamplingConfig(beam_width=2), "beam_width"),
    ([1, 512], SamplingConfig(), "vocabulary"),
])
def test_invalid_requests_raise_value_error(executor: Executor, input_ids: list[int], sampling: SamplingConfig,
                                            message: str) -> None:
    with pytest.raises(ValueError, match=message):
        executor.enqueue(GenerationRequest(input_ids, sampling), lambda result: None)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_engines_generate(mpt: tuple[Path, Path, list[list[int]]], tmp_path: Path,
                                         dtype: str) -> None:
    engine = engine_for(mpt[0], tmp_path, dtype=dtype)
    results = run_prompts(engine, PROMPTS, SamplingConfig(max_new_tokens=NEW_TOKENS))
    assert all(len(r.token_ids) == NEW_TOKENS and r.finish_reason == "length" for r in results)
    # the tiny model's logits are well separated: the first greedy token survives half precision
    assert [r.token_ids[0] for r in results] == [e[0] for e in mpt[2]]


def _dequantized_copy(engine: Path, out_dir: Path, precision: str) -> Path:
    """A float32 checkpoint of the engine's weights, every weight-only tensor replaced by its dequantized values."""
    out_dir.mkdir()
    config = json.loads((engine / "config.json").read_text())["pretrained_config"]
    config["quantization"]["quant_algo"] = None
    (out_dir / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(engine / "rank0.safetensors"))
    restored = {}
    for name, tensor in tensors.items():
        scale = tensors.get(name.replace(".weight", ".per_channel_scale"))
        if name.endswith(".per_channel_scale"):
            continue
        restored[name] = dequantize_weight(tensor, scale, precision) if scale is not None else tensor
    save_file({k: v.float().contiguous() for k, v in restored.items()}, str(out_dir / "rank0.safetensors"))
    return out_dir


@pytest.mark.parametrize(("model", "precision"), [("mpt", "int8"), ("dbrx", "int4")])
def test_weight_only_engines_run_their_dequantized_weights(tmp_path: Path, model: str, precision: str) -> None:
    """The engine `gen-repo build` quantizes from a weight-only checkpoint (float weights + quant_algo) runs
    exactly the numbers of its dequantized weights."""
    hf_dir = make_mpt(tmp_path / "hf") if model == "mpt" else make_dbrx(tmp_path / "hf")
    checkpoint = convert_checkpoint(ConvertSettings(hf_dir, tmp_path / "quantized", dtype="float32",
                                                    weight_only_precision=precision, progress=False))
    assert json_quant_algo(checkpoint) == {"int8": "W8A16", "int4": "W4A16"}[precision]
    engine = build_engine(BuildSettings(checkpoint, tmp_path / "engine", max_batch_size=2))
    assert load_file(str(engine / "rank0.safetensors"))["transformer.layers.0.attention.qkv.weight"].dtype == torch.int8
    reference = _dequantized_copy(engine, tmp_path / "dequantized", precision)
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS)
    quantized_ids = [r.token_ids for r in run_prompts(engine, PROMPTS[:2], sampling)]
    assert quantized_ids == [r.token_ids for r in run_prompts(reference, PROMPTS[:2], sampling)]


def json_quant_algo(checkpoint: Path) -> str:
    return str(json.loads((checkpoint / "config.json").read_text())["quantization"]["quant_algo"])


def test_int8_kv_cache(tmp_path: Path, mpt: tuple[Path, Path, list[list[int]]]) -> None:
    checkpoint = convert_checkpoint(ConvertSettings(mpt[0], tmp_path / "int8kv", dtype="float32", int8_kv_cache=True,
                                                    progress=False))
    results = run_prompts(checkpoint, PROMPTS, SamplingConfig(max_new_tokens=NEW_TOKENS))
    # the context phase attends over unquantized K/V, so the first token is exact; later ones read int8 K/V
    assert [r.token_ids[0] for r in results] == [e[0] for e in mpt[2]]
    matching = sum(a == b for r, e in zip(results, mpt[2], strict=True) for a, b in zip(r.token_ids, e, strict=True))
    assert matching >= 0.7 * NEW_TOKENS * len(PROMPTS)


def test_cancel_a_queued_request(executor: Executor) -> None:
    running = [collect(executor, PROMPTS[0], SamplingConfig(max_new_tokens=40))
               for _ in range(executor.max_batch_size)]  # every slot busy for a while
    results: list[GenerationResult] = []
    queued = executor.enqueue(GenerationRequest(PROMPTS[1], SamplingConfig(max_new_tokens=5), streaming=True),
                              results.append)
    executor.cancel(queued)
    for done, _ in running:
        assert done.wait(60)
    deadline = time.time() + 30
    while not results and time.time() < deadline:
        time.sleep(0.01)
    assert [(r.token_ids, r.finished, r.finish_reason) for r in results] == [([], True, "cancelled")]


def test_weight_only_at_build_is_accepted_and_changes_nothing(tmp_path: Path) -> None:
    """The old --weight-only-at-build flag is a no-op: every weight-only checkpoint is float + quant_algo now."""
    hf_dir = make_mpt(tmp_path / "hf")
    plain = convert_checkpoint(ConvertSettings(hf_dir, tmp_path / "plain", dtype="float16",
                                               weight_only_precision="int4", progress=False))
    flagged = convert_checkpoint(ConvertSettings(hf_dir, tmp_path / "flagged", dtype="float16",
                                                 weight_only_precision="int4", weight_only_at_build=True,
                                                 progress=False))
    for name in ("config.json", "rank0.safetensors"):
        assert (plain / name).read_bytes() == (flagged / name).read_bytes()


def test_top_p_keeps_at_least_the_most_likely_token(executor: Executor, mpt: tuple[Path, Path, list[list[int]]]
                                                    ) -> None:
    result = executor.generate(PROMPTS[2], SamplingConfig(max_new_tokens=NEW_TOKENS, top_p=1e-6, seed=5),
                               timeout=60)
    assert result.token_ids == mpt[2][2]


def test_top_k_two_draws_from_the_two_most_likely_tokens(executor: Executor,
                                                         mpt: tuple[Path, Path, list[list[int]]]) -> None:
    config = SamplingConfig(max_new_tokens=1, top_k=2, temperature=100.0, return_log_probs=True)
    firsts = {executor.generate(PROMPTS[0], replace(config, seed=seed), timeout=60).token_ids[0]
              for seed in range(12)}
    assert mpt[2][0][0] in firsts and len(firsts) == 2


def test_benchmark_reports_every_batch_size(tmp_path: Path) -> None:
    from generator.bench.engine import main as bench_main

    report = tmp_path / "bench.json"
    assert bench_main(["--hidden", "64", "--layers", "2", "--heads", "4", "--vocab", "256", "--batch-sizes", "1,3",
                       "--input-len", "8", "--output-len", "4", "--json", str(report)]) == 0
    results = json.loads(report.read_text())["results"]
    assert [r["batch"] for r in results] == [1, 3]
    assert [r["generated_tokens"] for r in results] == [4, 12] and all(r["tokens_per_s"] > 0 for r in results)
