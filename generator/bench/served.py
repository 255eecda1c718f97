"""`gen-repo bench --url ...`: load-test the served stack and report latency percentiles and throughput.

Targets: Triton's gRPC streaming API on the `ensemble` (default), or the OpenAI-compatible endpoint with
`--openai` (streamed /v1/completions). Load: a fixed number of requests in flight (`--concurrency 1,32,128`),
and/or Poisson arrivals at `--request-rate R`. Prompts: synthetic ones of exactly `--input-len` tokens (cut
from a text corpus; `--input-len-stddev` samples lengths), or a JSONL file (`{"prompt": ..., "max_tokens": N}`
per line). The output length is forced with `min_tokens = max_tokens`, so a random model cannot stop early.
`--hf DIR` adds transformers' `generate` on the same checkpoint and shapes as a baseline row per level.

Metrics are defined as genai-perf / AIPerf define them
(https://docs.nvidia.com/aiperf/reference/ai-perf-metrics-reference):
- time to first token (TTFT): from sending the request to the first response that carries output;
- inter-token latency (ITL), per request: (request latency - TTFT) / (output tokens - 1);
- request latency (e2e): from sending the request to its last response;
- output token throughput: all output tokens / the level's duration (first request sent to last response);
- request throughput: completed requests / that duration.
Percentiles p50 / p90 / p99 are over the requests of a level (linear interpolation, as numpy and AIPerf).
Output tokens are counted exactly: the engine's output ids (Triton) or the server's usage (OpenAI).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from generator.errors import GenRepoError
from generator.formats.dtypes import DTYPE_CHOICES
from generator.formats.dtypes import torch_dtype as torch_dtype_of
from generator.serving.triton_models.common import parameter

CORPUS = Path(__file__).resolve().parents[1] / "data" / "tiny_corpus.txt"


@dataclass(frozen=True)
class Prompt:
    """One request to send: its text, its token count and the output length to force."""

    text: str
    input_tokens: int
    output_tokens: int


@dataclass
class Record:
    """What one request measured (seconds from its own start)."""

    ok: bool
    start: float = 0.0
    ttft: float | None = None
    latency: float | None = None
    output_tokens: int = 0
    error: str | None = None


@dataclass
class LevelResult:
    """One load level's summary."""

    target: str                  # "triton" | "openai" | "hf"
    concurrency: int | None
    request_rate: float | None
    requests: int
    errors: int
    duration_s: float
    output_tokens: int
    output_tok_per_s: float
    requests_per_s: float
    ttft_ms: dict[str, float] = field(default_factory=dict)
    itl_ms: dict[str, float] = field(default_factory=dict)
    e2e_ms: dict[str, float] = field(default_factory=dict)
    mean_input_tokens: float = 0.0
    first_error: str | None = None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gen-repo bench --url", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True,
                        help="Triton gRPC host:port, or with --openai the OpenAI server (http://host:port)")
    parser.add_argument("--openai", action="store_true", help="drive the OpenAI endpoint (/v1/completions)")
    parser.add_argument("--model", default="ensemble", help="Triton model / OpenAI model id (default ensemble)")
    parser.add_argument("--concurrency", default=None, help="comma list of requests in flight, e.g. 1,32,128")
    parser.add_argument("--request-rate", default=None, help="comma list of Poisson arrival rates (requests/s)")
    parser.add_argument("--requests", type=int, default=None,
                        help="measured requests per level (default max(8, 4 x concurrency), or 8 s of arrivals)")
    parser.add_argument("--warmup", type=int, default=None, help="unmeasured requests first (default: concurrency)")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--input-len-stddev", type=float, default=0.0, help="sample input lengths ~ N(len, sd)")
    parser.add_argument("--output-len-stddev", type=float, default=0.0, help="sample output lengths ~ N(len, sd)")
    parser.add_argument("--dataset", type=Path, default=None,
                        help='JSONL prompts: {"prompt": text, "max_tokens": N} per line (max_tokens optional)')
    parser.add_argument("--tokenizer-dir", type=Path, default=None,
                        help="tokenizer for synthetic prompts (default: the served preprocessing model's)")
    parser.add_argument("--no-min-tokens", action="store_true", help="do not force the output length")
    parser.add_argument("--hf", type=Path, default=None, help="HF checkpoint: add transformers' generate rows")
    parser.add_argument("--hf-dtype", default="auto", choices=DTYPE_CHOICES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--direct", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.direct:
        parser.error("--direct benchmarks the engine alone: drop --url (gen-repo bench --direct ...)")
    if args.concurrency is None and args.request_rate is None:
        args.concurrency = "1"
    return args


def _int_list(text: str | None, name: str) -> list[int]:
    if not text:
        return []
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise GenRepoError(f"{name} takes a comma list of integers, got {text!r}") from None
    if any(value < 1 for value in values):
        raise GenRepoError(f"{name} values must be >= 1, got {text!r}")
    return values


def _float_list(text: str | None, name: str) -> list[float]:
    if not text:
        return []
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise GenRepoError(f"{name} takes a comma list of numbers, got {text!r}") from None
    if any(value <= 0 for value in values):
        raise GenRepoError(f"{name} values must be > 0, got {text!r}")
    return values


# --- prompts --------------------------------------------------------------------------------------------


def synthetic_prompts(tokenizer: Any, count: int, input_len: int, output_len: int, input_sd: float,
                      output_sd: float, rng: random.Random) -> list[Prompt]:
    """`count` prompts cut from the corpus, each re-encoded to exactly its sampled token length when possible."""
    corpus = tokenizer.encode(CORPUS.read_text() * 4, add_special_tokens=False)
    specials = 1 if len(tokenizer.encode("a", add_special_tokens=True)) > len(tokenizer.encode("a", False)) else 0
    prompts = []
    for _ in range(count):
        wanted = max(1, round(rng.gauss(input_len, input_sd))) if input_sd else input_len
        outputs = max(1, round(rng.gauss(output_len, output_sd))) if output_sd else output_len
        size = max(1, wanted - specials)
        start = rng.randrange(0, max(1, len(corpus) - size - 1))
        text = ""
        length = 0
        for _attempt in range(8):  # decode/re-encode may merge or split tokens at the edges: adjust
            text = tokenizer.decode(corpus[start:start + size], skip_special_tokens=True)
            length = len(tokenizer.encode(text, add_special_tokens=True))
            if length == wanted:
                break
            size = max(1, size + (wanted - length))
        prompts.append(Prompt(text=text, input_tokens=length, output_tokens=outputs))
    return prompts


def dataset_prompts(path: Path, tokenizer: Any, output_len: int) -> list[Prompt]:
    """Prompts of a JSONL file: `prompt` (or `text`), optional `max_tokens` / `output_len`."""
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            text = item.get("prompt", item.get("text"))
            outputs = int(item.get("max_tokens", item.get("output_len", output_len)))
        except (ValueError, AttributeError, TypeError):
            raise GenRepoError(f"{path}:{number}: not a JSON object with a prompt") from None
        if not isinstance(text, str) or not text:
            raise GenRepoError(f"{path}:{number}: no prompt (a non-empty 'prompt' or 'text' string)")
        length = len(tokenizer.encode(text, add_special_tokens=True)) if tokenizer is not None else 0
        prompts.append(Prompt(text=text, input_tokens=length, output_tokens=outputs))
    if not prompts:
        raise GenRepoError(f"{path} holds no prompts")
    return prompts


# --- clients --------------------------------------------------------------------------------------------


class TritonTarget:
    """Triton's gRPC streaming API: one stream per request, the ensemble's inputs."""

    name = "triton"

    def __init__(self, url: str, model: str, force_length: bool, timeout_s: float) -> None:
        import tritonclient.grpc.aio as aio

        self.client = aio.InferenceServerClient(url)
        self.model = model
        self.force_length = force_length
        self.timeout_s = timeout_s
        self.input_types: dict[str, str] = {}

    async def prepare(self) -> None:
        config = (await self.client.get_model_config(self.model, as_json=True))["config"]
        self.input_types = {item["name"]: item["data_type"].removeprefix("TYPE_").replace("STRING", "BYTES")
                            for item in config.get("input", [])}

    async def tokenizer_dir(self) -> Path | None:
        prefix = self.model.removesuffix("ensemble").removesuffix("tensorrt_llm_bls")
        config = (await self.client.get_model_config(f"{prefix}preprocessing", as_json=True))["config"]
        found = parameter(config, "tokenizer_dir")
        return Path(found) if found else None

    def _inputs(self, prompt: Prompt) -> list[Any]:
        import tritonclient.grpc.aio as aio

        values: dict[str, Any] = {"text_input": prompt.text, "max_tokens": prompt.output_tokens, "stream": True,
                                  "exclude_input_in_output": True}
        if self.force_length:
            values["min_tokens"] = prompt.output_tokens
        types = {"BYTES": np.object_, "INT32": np.int32, "BOOL": np.bool_}
        inputs = []
        for name, value in values.items():
            datatype = self.input_types.get(name)
            if datatype is None:
                continue
            array = (np.array([[value.encode()]], dtype=np.object_) if datatype == "BYTES"
                     else np.array([[value]], dtype=types[datatype]))
            infer_input = aio.InferInput(name, list(array.shape), datatype)
            infer_input.set_data_from_numpy(array)
            inputs.append(infer_input)
        return inputs

    async def send(self, prompt: Prompt) -> Record:
        inputs = self._inputs(prompt)
        request = {"model_name": self.model, "inputs": inputs, "request_id": uuid.uuid4().hex}

        async def requests() -> Any:
            yield request

        record = Record(ok=False, start=time.perf_counter())
        try:
            async for result, error in self.client.stream_infer(requests(), stream_timeout=self.timeout_s):
                if error is not None:
                    record.error = str(error)
                    return record
                ids = result.as_numpy("output_ids")
                count = 0 if ids is None else int(np.asarray(ids).size)
                if ids is None:
                    text = result.as_numpy("text_output")
                    count = 0 if text is None else 1
                if count and record.ttft is None:
                    record.ttft = time.perf_counter() - record.start
                record.output_tokens += count
        except Exception as error:  # noqa: BLE001 - counted as a failed request
            record.error = str(error).splitlines()[0] if str(error) else type(error).__name__
            return record
        record.latency = time.perf_counter() - record.start
        record.ok = True
        return record

    async def close(self) -> None:
        await self.client.close()


class OpenAITarget:
    """The OpenAI-compatible endpoint: streamed /v1/completions with usage in the last chunk."""

    name = "openai"

    def __init__(self, url: str, model: str, force_length: bool, timeout_s: float, connections: int) -> None:
        import httpx

        base = url if url.startswith(("http://", "https://")) else f"http://{url}"
        self.endpoint = base.rstrip("/").removesuffix("/v1") + "/v1/completions"
        self.model = model
        self.force_length = force_length
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self.client = httpx.AsyncClient(timeout=timeout_s, limits=limits)

    async def prepare(self) -> None:
        return None

    async def tokenizer_dir(self) -> Path | None:
        return None

    async def send(self, prompt: Prompt) -> Record:
        body: dict[str, Any] = {"model": self.model, "prompt": prompt.text, "max_tokens": prompt.output_tokens,
                                "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
        if self.force_length:
            body["min_tokens"] = prompt.output_tokens
        record = Record(ok=False, start=time.perf_counter())
        try:
            async with self.client.stream("POST", self.endpoint, json=body) as response:
                if response.status_code != 200:
                    record.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                    return record
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        record.error = str(event["error"].get("message"))
                        return record
                    choices = event.get("choices") or []
                    if choices and choices[0].get("text") and record.ttft is None:
                        record.ttft = time.perf_counter() - record.start
                    if event.get("usage"):
                        record.output_tokens = int(event["usage"]["completion_tokens"])
        except Exception as error:  # noqa: BLE001 - counted as a failed request
            record.error = str(error) or type(error).__name__
            return record
        record.latency = time.perf_counter() - record.start
        record.ok = True
        return record

    async def close(self) -> None:
        await self.client.aclose()


# --- load -----------------------------------------------------------------------------------------------


async def run_concurrency(target: Any, prompts: list[Prompt], concurrency: int, progress: Any) -> list[Record]:
    """Keep `concurrency` requests in flight until every prompt was sent."""
    queue = list(reversed(prompts))
    records: list[Record] = []

    async def worker() -> None:
        while queue:
            record = await target.send(queue.pop())
            records.append(record)
            if progress is not None:
                progress.update(1)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts)))))
    return records


async def run_rate(target: Any, prompts: list[Prompt], rate: float, rng: random.Random, progress: Any,
                   concurrency: int | None) -> list[Record]:
    """Send the prompts at Poisson arrivals of `rate` per second (at most `concurrency` in flight, if given)."""
    limit = asyncio.Semaphore(concurrency) if concurrency else None
    records: list[Record] = []

    async def one(prompt: Prompt) -> None:
        if limit is not None:
            async with limit:
                record = await target.send(prompt)
        else:
            record = await target.send(prompt)
        records.append(record)
        if progress is not None:
            progress.update(1)

    tasks = []
    for prompt in prompts:
        tasks.append(asyncio.ensure_future(one(prompt)))
        await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)
    return records


def percentiles(values: list[float]) -> dict[str, float]:
    """p50 / p90 / p99 (and mean) in milliseconds; empty when there are no values."""
    if not values:
        return {}
    array = np.asarray(values) * 1000.0
    return {"p50": float(np.percentile(array, 50)), "p90": float(np.percentile(array, 90)),
            "p99": float(np.percentile(array, 99)), "mean": float(array.mean())}


def summarize(target: str, records: list[Record], prompts: list[Prompt], concurrency: int | None,
              rate: float | None) -> LevelResult:
    """The AIPerf-style summary of one level's records."""
    ok = [r for r in records if r.ok]
    errors = [r for r in records if not r.ok]
    if ok:
        start = min(r.start for r in records)
        end = max(r.start + (r.latency or 0.0) for r in ok)
        duration = max(end - start, 1e-9)
    else:
        duration = 0.0
    output_tokens = sum(r.output_tokens for r in ok)
    itls = [((r.latency or 0.0) - r.ttft) / (r.output_tokens - 1) for r in ok
            if r.ttft is not None and r.output_tokens > 1]
    return LevelResult(
        target=target, concurrency=concurrency, request_rate=rate, requests=len(ok), errors=len(errors),
        duration_s=duration, output_tokens=output_tokens,
        output_tok_per_s=output_tokens / duration if duration else 0.0,
        requests_per_s=len(ok) / duration if duration else 0.0,
        ttft_ms=percentiles([r.ttft for r in ok if r.ttft is not None]), itl_ms=percentiles(itls),
        e2e_ms=percentiles([r.latency for r in ok if r.latency is not None]),
        mean_input_tokens=float(np.mean([p.input_tokens for p in prompts])) if prompts else 0.0,
        first_error=errors[0].error if errors else None)


# --- transformers baseline ------------------------------------------------------------------------------


def hf_baseline(hf_dir: Path, tokenizer: Any, prompts: list[Prompt], batch: int, dtype: str) -> LevelResult:
    """transformers' `generate` on `batch` prompts at once (greedy, output length forced): one timed run.

    TTFT is the time of a 1-token generate of the same batch; ITL = (total - TTFT) / (output tokens - 1)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = (torch.bfloat16 if device == "cuda" else torch.float32) if dtype == "auto" else torch_dtype_of(dtype)
    model = _hf_model(hf_dir, torch_dtype, device)
    chosen = (prompts * (batch // max(1, len(prompts)) + 1))[:batch]
    ids = [tokenizer.encode(p.text, add_special_tokens=True) for p in chosen]
    width = max(len(row) for row in ids)
    pad = 0
    input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in ids], device=device)  # left padding
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids], device=device)
    new_tokens = chosen[0].output_tokens

    def generate(tokens: int) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=tokens,
                           min_new_tokens=tokens, pad_token_id=pad, eos_token_id=None)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    generate(2)  # warm-up
    ttft = generate(1)
    total = generate(new_tokens)
    itl = (total - ttft) / max(1, new_tokens - 1)
    output_tokens = batch * new_tokens
    return LevelResult(target="hf", concurrency=batch, request_rate=None, requests=batch, errors=0,
                       duration_s=total, output_tokens=output_tokens, output_tok_per_s=output_tokens / total,
                       requests_per_s=batch / total, ttft_ms={"p50": ttft * 1000}, itl_ms={"p50": itl * 1000},
                       e2e_ms={"p50": total * 1000}, mean_input_tokens=float(np.mean([len(r) for r in ids])))


_HF_MODELS: dict[tuple[str, str, str], Any] = {}


def _hf_model(hf_dir: Path, torch_dtype: Any, device: str) -> Any:
    from transformers import AutoModelForCausalLM

    key = (str(hf_dir), str(torch_dtype), device)
    if key not in _HF_MODELS:
        model: Any = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch_dtype)
        _HF_MODELS[key] = model.to(device).eval()
    return _HF_MODELS[key]


# --- report ---------------------------------------------------------------------------------------------


def format_table(results: list[LevelResult]) -> str:
    """A Markdown table, one row per target and level."""
    def cell(stats: dict[str, float], key: str) -> str:
        return f"{stats[key]:.1f}" if key in stats else "-"

    header = ("| target | concurrency | rate (req/s) | requests | errors | TTFT p50/p90/p99 (ms) | ITL p50/p90/p99 (ms) "
              "| e2e p50/p90/p99 (ms) | output tok/s | req/s |")
    lines = [header, "|" + "---|" * 10]
    for r in results:
        lines.append(
            f"| {r.target} | {r.concurrency if r.concurrency is not None else '-'} | "
            f"{r.request_rate if r.request_rate is not None else '-'} | {r.requests} | {r.errors} | "
            f"{cell(r.ttft_ms, 'p50')} / {cell(r.ttft_ms, 'p90')} / {cell(r.ttft_ms, 'p99')} | "
            f"{cell(r.itl_ms, 'p50')} / {cell(r.itl_ms, 'p90')} / {cell(r.itl_ms, 'p99')} | "
            f"{cell(r.e2e_ms, 'p50')} / {cell(r.e2e_ms, 'p90')} / {cell(r.e2e_ms, 'p99')} | "
            f"{r.output_tok_per_s:.1f} | {r.requests_per_s:.2f} |")
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------------------


async def _run(args: argparse.Namespace) -> list[LevelResult]:
    from generator.formats.tokenizer import load_tokenizer

    concurrencies = _int_list(args.concurrency, "--concurrency")
    rates = _float_list(args.request_rate, "--request-rate")
    most = max(concurrencies or [1])
    force = not args.no_min_tokens
    target: Any = (OpenAITarget(args.url, args.model, force, args.timeout, connections=max(most, 8) + 8)
                   if args.openai else TritonTarget(args.url, args.model, force, args.timeout))
    try:
        try:
            await target.prepare()
            tokenizer_dir = args.tokenizer_dir or await target.tokenizer_dir()
        except GenRepoError:
            raise
        except Exception as error:  # noqa: BLE001
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise GenRepoError(f"cannot reach {args.url}: {reason}") from None
        if tokenizer_dir is None:
            raise GenRepoError("pass --tokenizer-dir (needed to build prompts of exact token lengths)")
        tokenizer = load_tokenizer(tokenizer_dir)
        rng = random.Random(args.seed)
        levels: list[tuple[int | None, float | None]] = [(c, None) for c in concurrencies if not rates]
        levels += [(concurrencies[0] if len(concurrencies) == 1 else None, r) for r in rates]
        results = []
        for concurrency, rate in levels:
            count = args.requests or (max(8, 4 * concurrency) if rate is None and concurrency
                                      else max(8, int(8 * (rate or 1))))
            warmup = args.warmup if args.warmup is not None else (concurrency or 1)
            if args.dataset is not None:
                pool = dataset_prompts(args.dataset, tokenizer, args.output_len)
                prompts = [pool[i % len(pool)] for i in range(count + warmup)]
            else:
                prompts = synthetic_prompts(tokenizer, count + warmup, args.input_len, args.output_len,
                                            args.input_len_stddev, args.output_len_stddev, rng)
            if warmup:
                await run_concurrency(target, prompts[:warmup], concurrency or 1, None)
            progress = None
            if not args.quiet:
                from tqdm import tqdm

                label = f"{target.name} " + (f"c={concurrency}" if rate is None else f"rate={rate}/s")
                progress = tqdm(total=count, desc=label, file=sys.stderr, leave=False)
            measured = prompts[warmup:]
            if rate is None:
                records = await run_concurrency(target, measured, concurrency or 1, progress)
            else:
                records = await run_rate(target, measured, rate, rng, progress, concurrency)
            if progress is not None:
                progress.close()
            results.append(summarize(target.name, records, measured, concurrency, rate))
            if args.hf is not None and rate is None and concurrency:
                results.append(await asyncio.to_thread(hf_baseline, args.hf, tokenizer, measured, concurrency,
                                                       args.hf_dtype))
        return results
    finally:
        await target.close()


def main(argv: list[str]) -> int:
    """`gen-repo bench --url ...`: run every level, print the table, write --json."""
    args = parse_args(argv)
    results = asyncio.run(_run(args))
    print(format_table(results))
    for result in results:
        if result.first_error:
            print(f"{result.target} level {result.concurrency or result.request_rate}: {result.errors} errors, "
                  f"first: {result.first_error}", file=sys.stderr)
    if args.json is not None:
        payload = {"metrics_definition": "genai-perf / AIPerf (see generator/bench/served.py)",
                   "settings": {key: (str(value) if isinstance(value, Path) else value)
                                for key, value in vars(args).items()},
                   "results": [asdict(result) for result in results]}
        args.json.write_text(json.dumps(payload, indent=2))
    return 1 if any(result.errors for result in results) else 0
