"""`gen-repo bench --url`: the served-benchmark logic on tiny-mpt (sane numbers, exact token counts, no timing
asserts), against Triton's gRPC streaming API and the OpenAI endpoint, with the transformers baseline."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from generator.bench.served import Record, format_table, percentiles, summarize, synthetic_prompts
from generator.cli import main
from generator.formats.tokenizer import load_tokenizer
from generator.serving.openai_server import BackgroundFront, OpenAISettings
from generator.serving.serve import free_port
from tests.conftest import RunningServer


def test_summary_follows_the_aiperf_definitions() -> None:
    records = [Record(ok=True, start=0.0, ttft=0.1, latency=1.1, output_tokens=11),
               Record(ok=True, start=0.5, ttft=0.2, latency=2.2, output_tokens=21),
               Record(ok=False, start=0.2, error="boom")]
    result = summarize("triton", records, [], concurrency=2, rate=None)
    assert result.requests == 2 and result.errors == 1 and result.first_error == "boom"
    assert result.duration_s == pytest.approx(2.7)            # first send (0.0) to last response (0.5 + 2.2)
    assert result.output_tok_per_s == pytest.approx(32 / 2.7)
    assert result.itl_ms["p50"] == pytest.approx(100.0)        # (1.1 - 0.1) / 10 and (2.2 - 0.2) / 20
    assert result.ttft_ms["p50"] == pytest.approx(150.0)
    assert percentiles([]) == {}
    assert "| triton | 2 |" in format_table([result])


def test_synthetic_prompts_have_the_asked_token_lengths(tiny_mpt_job: Any) -> None:
    tokenizer = load_tokenizer(tiny_mpt_job.tokenizer_dir)
    prompts = synthetic_prompts(tokenizer, 10, 24, 5, 0.0, 0.0, random.Random(0))
    assert [p.input_tokens for p in prompts] == [24] * 10
    assert all(len(tokenizer.encode(p.text)) == 24 and p.output_tokens == 5 for p in prompts)
    sampled = synthetic_prompts(tokenizer, 20, 24, 5, 6.0, 2.0, random.Random(1))
    assert len({p.input_tokens for p in sampled}) > 1


def _bench(args: list[str], tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", *args, "--quiet", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "| target |" in result.output
    return json.loads(out.read_text())


@pytest.mark.server
def test_bench_triton_levels_with_hf_baseline(triton_server: RunningServer, tmp_path: Path) -> None:
    report = _bench(["--url", triton_server.grpc_url, "--concurrency", "1,3", "--input-len", "12",
                     "--output-len", "6", "--requests", "6", "--warmup", "1", "--hf",
                     str(triton_server.job.hf_dir)], tmp_path)
    rows = report["results"]
    assert [(r["target"], r["concurrency"]) for r in rows] == [("triton", 1), ("hf", 1), ("triton", 3), ("hf", 3)]
    for row in rows:
        assert row["errors"] == 0 and row["output_tok_per_s"] > 0 and row["e2e_ms"]["p50"] > 0
        if row["target"] == "triton":
            assert row["requests"] == 6
            assert row["output_tokens"] == 6 * 6          # exact: min_tokens = max_tokens
            assert row["mean_input_tokens"] == 12
            assert 0 < row["ttft_ms"]["p50"] <= row["e2e_ms"]["p50"]
            assert row["itl_ms"]["p50"] > 0 and row["ttft_ms"]["p99"] >= row["ttft_ms"]["p50"]
        else:
            assert row["output_tokens"] == 6 * row["concurrency"]


@pytest.fixture()
def openai_url(triton_server: RunningServer) -> Iterator[str]:
    port = free_port()
    front = BackgroundFront(OpenAISettings(triton_url=triton_server.grpc_url, port=port))
    front.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        front.stop()


@pytest.mark.server
def test_bench_openai_with_a_request_rate_and_a_jsonl_dataset(triton_server: RunningServer, openai_url: str,
                                                             tmp_path: Path) -> None:
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("\n".join(json.dumps({"prompt": text, "max_tokens": 4})
                                 for text in ["Hello there", "What is machine learning?", "def f(x):"]) + "\n")
    report = _bench(["--url", openai_url, "--openai", "--request-rate", "20", "--requests", "6", "--warmup", "0",
                     "--dataset", str(dataset), "--tokenizer-dir", str(triton_server.job.tokenizer_dir)], tmp_path)
    (row,) = report["results"]
    assert row["target"] == "openai" and row["request_rate"] == 20.0
    assert row["requests"] == 6 and row["errors"] == 0 and row["output_tokens"] == 6 * 4
    assert row["ttft_ms"]["p50"] > 0 and row["requests_per_s"] > 0


def test_bench_errors_are_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["bench", "--url", f"127.0.0.1:{free_port()}", "--quiet"])
    assert result.exit_code == 2 and "cannot reach" in result.output
    result = CliRunner().invoke(main, ["bench", "--url", "x:1", "--concurrency", "0"])
    assert result.exit_code == 2 and "--concurrency" in result.output
