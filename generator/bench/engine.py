"""Throughput of the pytorch engine on random weights of any MPT or DBRX shape (no Hugging Face checkpoint).

Each rank makes its own shard of a random TensorRT-LLM checkpoint on its device, in exactly the layout `convert`
writes for that shape (`generator.bench.random_weights`), and writes it as `rank{N}.safetensors`; rank 0 builds
the engine dir, then rank 0's Executor runs `batch` requests of `--input-len` random tokens at once for every
batch size and reports generated tokens per second, and how many steps were CUDA-graph replays. `--closed-loop N`
keeps each batch size's requests in flight instead, as a served benchmark's clients do, until N were sent (new
prompts then join running decodes). With `--weights-on-device` nothing is written but the engine's config.json:
each rank hands its tensors to the engine in memory (a 132B DBRX is 264 GB in bf16).

    gen-repo bench --hidden 256 --layers 4 --heads 8 --vocab 1024                        # tiny MPT, CPU
    gen-repo bench --hidden 4096 --layers 32 --heads 32 --vocab 50432 \
        --dtype bfloat16 --batch-sizes 1,8,32 --input-len 128 --output-len 128           # MPT-7B shapes, 1 GPU
    gen-repo bench ... --nproc 2                                                         # TP2: spawns 2 ranks
    mpirun -n 2 python -m generator bench ...                                         # or under mpirun
    gen-repo bench --arch dbrx --hidden 6144 --layers 40 --heads 48 --kv-heads 8 --experts 16 --top-k 4 \
        --intermediate 10752 --vocab 100352 --dtype bfloat16 --weights-on-device --nproc 4  # DBRX, 4 GPUs

(`python bench/bench_engine.py` and `python -m generator bench` take the same flags.)

The world size (from mpirun, torchrun or --nproc) is the tensor-parallel size unless --pp is given.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from generator.bench import random_weights
from generator.bench.random_weights import ARCHITECTURES
from generator.build import BuildSettings, build_engine
from generator.build.pytorch import pytorch_engine_config
from generator.convert.models import ModelSpec
from generator.engine.distributed import pick_device
from generator.engine.executor import Executor, GenerationRequest, GenerationResult, follow
from generator.engine.rank_env import ProcessInfo, child_environment, free_port, process_info
from generator.engine.sampling import SamplingConfig
from generator.engine.scheduler import parse_prefill_wait_steps
from generator.errors import ConfigError
from generator.formats.dtypes import MODEL_DTYPES
from generator.formats.mapping import Mapping


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gen-repo bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=ARCHITECTURES, default="mpt",
                        help="mpt: ALiBi, GELU MLP; dbrx: RoPE, GQA, clip_qkv, SwiGLU mixture of experts")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads (MHA, as MPT-7B)")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=None,
                        help="MLP size, per expert for dbrx; default 4 x hidden (mpt), 7/4 x hidden (dbrx)")
    parser.add_argument("--experts", type=int, default=16, help="dbrx: experts per layer")
    parser.add_argument("--top-k", type=int, default=4, help="dbrx: experts per token")
    parser.add_argument("--rope-theta", type=float, default=500000.0, help="dbrx: RoPE base")
    parser.add_argument("--clip-qkv", type=float, default=None, help="clamp of q, k, v; default 8 (dbrx), none (mpt)")
    parser.add_argument("--moe-ep-size", type=int, default=None,
                        help="dbrx: experts split over this many ranks (default 1: every expert split over tp)")
    parser.add_argument("--dtype", default="float32", choices=MODEL_DTYPES)
    parser.add_argument("--weight-only", choices=["int8", "int4"], default=None,
                        help="weight-only quantized GEMMs (random integer weights + scales, the layout the build "
                             "writes)")
    parser.add_argument("--weights-on-device", action="store_true",
                        help="hand each rank's random tensors to the engine in memory: no rank files are written")
    parser.add_argument("--seed", type=int, default=0, help="of the random weights (each rank draws its own)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages; tp = world size / pp")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=None, help="engine limit; default max of --batch-sizes")
    parser.add_argument("--max-input-len", type=int, default=None, help="engine limit; default --input-len")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="engine limit (and the model's max positions); default --input-len + --output-len")
    parser.add_argument("--max-num-tokens", type=int, default=None,
                        help="per-step token budget (chunked prefill); default largest batch x input len, at least "
                             "--max-input-len")
    parser.add_argument("--kv-cache-free-gpu-mem-fraction", type=float, default=None,
                        help="share of the GPU memory free after the weights for the KV pool (default 0.9)")
    parser.add_argument("--max-tokens-in-paged-kv-cache", type=int, default=None,
                        help="KV pool size in tokens (overrides the fraction)")
    parser.add_argument("--min-tokens", type=int, default=0,
                        help="min_tokens of every request, with --end-id: what served benchmarks send for a fixed "
                             "output length (the engine then masks end_id until min_tokens)")
    parser.add_argument("--end-id", type=int, default=None, help="end_id of every request (default none)")
    parser.add_argument("--arrival-ms", type=float, default=0.0,
                        help="delay between two requests of a batch (default 0: all at once)")
    parser.add_argument("--closed-loop", type=int, default=None, metavar="N",
                        help="keep each batch size's requests in flight, sending the next when one finishes, until "
                             "N were sent (a served benchmark's closed loop); default: the batch at once")
    parser.add_argument("--prefill-wait-steps", type=int, default=None, metavar="W",
                        help="new prompts wait up to W steps to join running ones together (default: "
                             "GEN_REPO_PREFILL_WAIT_STEPS, else 0)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per batch size (best is reported)")
    parser.add_argument("--nproc", type=int, default=None, help="spawn this many local ranks (no mpirun needed)")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary dir, removed after")
    parser.add_argument("--device", default=None, help="default cuda:<local rank> if available, else cpu")
    parser.add_argument("--profile", action="store_true",
                        help="time single forwards and print torch.profiler's top operations (single rank)")
    parser.add_argument("--trace-batch", type=int, default=None, metavar="B",
                        help="after the timed runs, run batch B twice more under torch.profiler (rank 0) and print "
                             "where the GPU time went: each kernel's time per decode step, and the GPU's idle share")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here (rank 0)")
    return parser.parse_args(argv)


def spawn(nproc: int, argv: list[str]) -> int:
    """Start `nproc` copies of this script as ranks 0..nproc-1 (torchrun-style environment)."""
    port = str(free_port())
    work = tempfile.mkdtemp(prefix="bench-engine-")
    forwarded = list(argv)
    if "--work-dir" not in forwarded:
        forwarded += ["--work-dir", work]
    processes = []
    for rank in range(nproc):
        env = child_environment(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                                MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        processes.append(subprocess.Popen([sys.executable, "-m", "generator.bench.engine", *forwarded], env=env))
    codes = [p.wait() for p in processes]
    shutil.rmtree(work, ignore_errors=True)
    return max(codes)


def _without_nproc(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def model_spec(args: argparse.Namespace) -> ModelSpec:
    """The architecture's spec for the flags' sizes (its converter's knowledge gives config and layout)."""
    clip = args.clip_qkv if args.clip_qkv is not None else (8.0 if args.arch == "dbrx" else None)
    return random_weights.model_spec(
        args.arch, hidden=args.hidden, layers=args.layers, heads=args.heads, vocab=args.vocab,
        max_seq_len=args.max_seq_len or args.input_len + args.output_len, kv_heads=args.kv_heads,
        intermediate=args.intermediate, experts=args.experts, top_k=args.top_k, rope_theta=args.rope_theta,
        clip_qkv=clip)


def build_settings(args: argparse.Namespace, checkpoint: Path, engine: Path) -> BuildSettings:
    """The engine limits: the flags', by default just what the timed batches need."""
    max_batch = max(batch_sizes(args))
    max_input_len = args.max_input_len or args.input_len
    max_seq_len = args.max_seq_len or args.input_len + args.output_len
    if args.input_len > max_input_len or args.input_len + args.output_len > max_seq_len:
        raise ConfigError(f"--input-len {args.input_len} + --output-len {args.output_len} do not fit "
                          f"--max-input-len {max_input_len} / --max-seq-len {max_seq_len}")
    if args.max_batch_size is not None and args.max_batch_size < max_batch:
        raise ConfigError(f"--max-batch-size {args.max_batch_size} is smaller than batch size {max_batch}")
    return BuildSettings(checkpoint, engine, max_batch_size=args.max_batch_size or max_batch,
                         max_input_len=max_input_len, max_seq_len=max_seq_len,
                         max_num_tokens=args.max_num_tokens or max(max_input_len, max_batch * args.input_len))


def batch_sizes(args: argparse.Namespace) -> list[int]:
    return [int(b) for b in args.batch_sizes.split(",")]


class _Streams:
    """Result callbacks of a timed run: each request's first-token time, tokens and inter-token gaps."""

    def __init__(self) -> None:
        self.done = threading.Semaphore(0)
        self.first_token: dict[int, float] = {}
        self.last_seen: dict[int, float] = {}
        self.tokens: dict[int, list[int]] = {}
        self.gaps: list[float] = []  # inter-token latencies: time between two results of one request

    def on_result(self, result: GenerationResult) -> None:
        now = time.perf_counter()
        self.first_token.setdefault(result.request_id, now)
        if result.request_id in self.last_seen and result.token_ids:
            self.gaps.append(now - self.last_seen[result.request_id])
        if result.token_ids:
            self.last_seen[result.request_id] = now
        self.tokens.setdefault(result.request_id, []).extend(result.token_ids)
        if result.finished:
            self.done.release()

    def report(self, batch: int, wall: float, ttft: float, decode_step_s: float) -> dict[str, Any]:
        gaps = sorted(self.gaps)

        def percentile(q: float) -> float:
            return 1000 * gaps[min(len(gaps) - 1, int(q * len(gaps)))] if gaps else 0.0

        generated = sum(len(tokens) for tokens in self.tokens.values())
        # the greedy tokens of every request, in request order: equal digests = equal tokens (A/B runs of one shape)
        digest = hashlib.sha256(json.dumps([self.tokens[i] for i in sorted(self.tokens)]).encode()).hexdigest()
        return {"batch": batch, "tokens_sha256": digest[:16], "seconds": wall, "generated_tokens": generated,
                "tokens_per_s": generated / wall,
                "mean_ttft_s": ttft, "decode_step_ms": 1000 * decode_step_s,
                "itl_p50_ms": percentile(0.5), "itl_p99_ms": percentile(0.99)}


def _sampling(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=args.output_len, end_id=args.end_id, min_tokens=args.min_tokens)


def run_batch(executor: Executor, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """Submit `batch` requests at once; returns wall time, tokens/s and mean time to first token."""
    generator = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, args.vocab, (batch, args.input_len), generator=generator).tolist()
    streams = _Streams()
    sampling = _sampling(args)
    start = time.perf_counter()
    for prompt in prompts:
        executor.enqueue(GenerationRequest(prompt, sampling, streaming=True), streams.on_result)
        if args.arrival_ms:
            time.sleep(args.arrival_ms / 1000)  # requests join running ones: prefill chunks mix with decodes
    for _ in prompts:
        streams.done.acquire()
    wall = time.perf_counter() - start
    ttft = sum(t - start for t in streams.first_token.values()) / len(streams.first_token)
    return streams.report(batch, wall, ttft, (wall - ttft) / max(1, args.output_len - 1))


def run_closed_loop(executor: Executor, batch: int, total: int, args: argparse.Namespace) -> dict[str, Any]:
    """`batch` clients, each sending its next request when its last one finished, until `total` were sent (as a
    served benchmark's closed loop does: new prompts keep joining running decodes). TTFT counts from each
    request's submission; decode_step_ms is the mean inter-token gap."""
    generator = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, args.vocab, (total, args.input_len), generator=generator).tolist()
    streams = _Streams()
    sampling = _sampling(args)
    sent: dict[int, float] = {}

    def submit(prompt: list[int]) -> None:
        now = time.perf_counter()
        sent[executor.enqueue(GenerationRequest(prompt, sampling, streaming=True), streams.on_result)] = now

    start = time.perf_counter()
    for prompt in prompts[:batch]:
        submit(prompt)
    for prompt in prompts[batch:]:
        streams.done.acquire()  # one request finished: its client sends the next
        submit(prompt)
    for _ in range(batch):
        streams.done.acquire()
    wall = time.perf_counter() - start
    ttft = sum(streams.first_token[i] - t for i, t in sent.items()) / len(sent)
    mean_gap = sum(streams.gaps) / len(streams.gaps) if streams.gaps else 0.0
    return {**streams.report(batch, wall, ttft, mean_gap), "requests": total}


def timed_run(executor: Executor, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """One timed run of the flags' mode, with the engine's step counters of that run (`steps`)."""
    before = executor.step_stats
    if args.closed_loop:
        result: dict[str, Any] = {"mode": "closed-loop", **run_closed_loop(executor, batch, args.closed_loop, args)}
    else:
        result = {"mode": "all-at-once", **run_batch(executor, batch, args)}
    after = executor.step_stats
    return {**result, "steps": {key: after[key] - before.get(key, 0) for key in after}}


def _kernel_profile(executor: Executor, batch: int, args: argparse.Namespace) -> tuple[dict[str, Any], dict]:
    """One run under torch.profiler: its result, and {kernel name: [count, GPU us]} plus span and busy time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        result = timed_run(executor, batch, args)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    # busy: the union of the kernels' intervals, without NCCL broadcasts: the step messages' wait on a side stream
    # for the next message and would count a waiting GPU as busy (this also leaves out the device tokens' short
    # broadcast on the compute stream, a few microseconds a step)
    working = sorted((e.time_range.start, e.time_range.end) for e in kernels if "Broadcast" not in e.name)
    busy, reach = 0.0, float("-inf")
    for start, end in working:
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    by_name: dict[str, list[float]] = {}
    for event in kernels:
        entry = by_name.setdefault(event.name, [0, 0.0])
        entry[0] += 1
        entry[1] += event.time_range.elapsed_us()
    span = (max(end for _, end in spans) - spans[0][0]) if spans else 0.0
    return result, {"kernels": by_name, "span_us": span, "busy_us": busy}


def trace_run(executor: Executor, batch: int, args: argparse.Namespace, rows: int = 30) -> dict[str, Any]:
    """Where a decode step's GPU time goes on this rank (CUDA-graph replays included): `batch` runs under the
    profiler twice, with 2 new tokens (prefill + one decode) and with `--output-len`; the difference over the
    extra steps (from the engine's step counters) is each kernel's time per decode step, and the share of those
    steps the GPU was idle. Copies and memsets count as kernels here."""
    short_result, short = _kernel_profile(executor, batch, argparse.Namespace(**{**vars(args), "output_len": 2}))
    result, full = _kernel_profile(executor, batch, args)

    def step_count(run: dict[str, Any]) -> int:
        return int(run["steps"]["graph_steps"] + run["steps"]["eager_steps"])

    steps = step_count(result) - step_count(short_result)
    if steps <= 0:
        raise ConfigError(f"--trace-batch: the longer run took {steps} more steps than the short one; nothing to divide")
    table = []
    for name, (count, total) in full["kernels"].items():
        base_count, base_total = short["kernels"].get(name, [0, 0.0])
        table.append({"name": name, "per_step": (count - base_count) / steps, "us_per_step": (total - base_total) / steps})
    table.sort(key=lambda entry: -entry["us_per_step"])
    step_us = (full["span_us"] - short["span_us"]) / steps
    busy_us = (full["busy_us"] - short["busy_us"]) / steps
    summary = {"batch": batch, "tokens_per_s": result["tokens_per_s"], "decode_step_us": step_us,
               "gpu_busy_us_per_step": busy_us, "kernels": table}
    print(f"trace, batch {batch} ({result['tokens_per_s']:.1f} tokens/s under the profiler, mean ITL "
          f"{result['decode_step_ms'] * 1000:.1f} us): a decode step spans {step_us:.1f} us, kernels busy "
          f"{busy_us:.1f} us (idle {100 * (1 - busy_us / max(step_us, 1e-9)):.1f}%)", flush=True)
    for entry in table[:rows]:
        print(f"  {entry['us_per_step']:8.1f} us {entry['per_step']:6.1f}x  {entry['name'][:110]}", flush=True)
    return summary


def format_result(result: dict[str, Any]) -> str:
    """The printed line of one batch size."""
    steps = result["steps"]
    mode = f"closed-loop, {result['requests']} requests: " if result["mode"] == "closed-loop" else ""
    return (f"batch {result['batch']:3d}: {mode}{result['tokens_per_s']:9.1f} tokens/s  ({result['generated_tokens']} "
            f"tokens in {result['seconds']:.2f} s, mean TTFT {1000 * result['mean_ttft_s']:.1f} ms, decode step "
            f"{result['decode_step_ms']:.2f} ms, ITL p50 {result['itl_p50_ms']:.2f} / p99 {result['itl_p99_ms']:.2f}"
            f" ms, tokens {result['tokens_sha256']}); steps: {steps['graph_steps']} graph, {steps['eager_steps']} eager "
            f"({steps['mixed_steps']} mixed, "
            f"{steps['eager_tokens']} tokens, {steps['decode_rows_in_eager']} decode rows)")


def profile_forwards(executor: Executor, args: argparse.Namespace) -> None:
    """Time and profile the model's forwards directly (batch 1: one context phase, then decode steps), in this
    thread while the executor is idle, so the profiler sees every operation."""
    from torch.profiler import ProfilerActivity, profile

    from generator.engine.model import ForwardPlan

    runner = executor._runner  # the idle executor's own runner and KV pool; blocks 1.. are free while idle
    device = runner.model.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    prompt = list(range(1, args.input_len + 1))
    blocks = -(-(args.input_len + args.output_len) // runner.block_size)
    table = list(range(1, min(blocks, runner.cache.num_blocks - 1) + 1))

    def forward(plan: ForwardPlan) -> float:
        sync()
        start = time.perf_counter()
        runner.execute(plan)
        sync()
        return 1000 * (time.perf_counter() - start)

    with torch.inference_mode():
        context_ms = forward(ForwardPlan([prompt], [0], [table]))
        room = max(1, args.output_len - 1)  # positions left in the sequence's blocks
        steps = [forward(ForwardPlan([[7]], [args.input_len + i % room], [table])) for i in range(8)]
        print(f"context {context_ms:.2f} ms, decode steps {', '.join(f'{t:.2f}' for t in steps)} ms", flush=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for i in range(4):
                forward(ForwardPlan([[7]], [args.input_len + (8 + i) % room], [table]))
    for key in (["cuda_time_total"] if device.type == "cuda" else []) + ["cpu_time_total"]:
        print(prof.key_averages().table(sort_by=key, row_limit=20), flush=True)


def check_args(args: argparse.Namespace, world_size: int) -> Mapping:
    """Rank 0's layout; ConfigError (one line, before any rank starts) for sizes the model cannot take."""
    if world_size % args.pp:
        raise ConfigError(f"world size {world_size} is not divisible by --pp {args.pp}")
    mapping = Mapping.create(world_size // args.pp, args.pp, moe_expert_parallel_size=args.moe_ep_size)
    random_weights.checkpoint_config(model_spec(args), mapping, args.dtype, args.weight_only)
    build_settings(args, Path("checkpoint"), Path("engine"))
    if args.closed_loop is not None and args.closed_loop < max(batch_sizes(args)):
        raise ConfigError(f"--closed-loop {args.closed_loop} is smaller than batch size {max(batch_sizes(args))}: "
                          "it counts every request sent")
    if args.prefill_wait_steps is not None:
        parse_prefill_wait_steps(args.prefill_wait_steps, "--prefill-wait-steps")
    if args.trace_batch is not None and (args.output_len < 4 or args.closed_loop):
        raise ConfigError("--trace-batch needs --output-len of at least 4 and all requests at once (no --closed-loop)")
    return mapping


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.nproc and process_info().world_size == 1 and "RANK" not in os.environ:
        check_args(args, args.nproc)
        return spawn(args.nproc, _without_nproc(argv if argv is not None else sys.argv[1:]))
    info = process_info()
    mapping = check_args(args, info.world_size).with_rank(info.rank)
    device = pick_device(info.local_rank, args.device)
    if info.world_size > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(device)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=info.rank,
                                world_size=info.world_size)
    work = args.work_dir
    if work is None:  # one temporary dir for all ranks (rank 0 makes it and removes it)
        box = [tempfile.mkdtemp(prefix="bench-engine-") if info.rank == 0 else None]
        if info.world_size > 1:
            torch.distributed.broadcast_object_list(box, src=0)
        work = Path(str(box[0]))
    try:
        return _benchmark(args, info, mapping, device, work)
    finally:
        if args.work_dir is None and info.rank == 0:
            shutil.rmtree(work, ignore_errors=True)


def _benchmark(args: argparse.Namespace, info: ProcessInfo, mapping: Mapping, device: torch.device,
               work: Path) -> int:
    """Make the weights and the engine dir, then (rank 0) time every batch size."""
    if args.trace_batch and device.type != "cuda":
        raise ConfigError("--trace-batch traces CUDA kernels: it needs a GPU")
    checkpoint, engine = work / "checkpoint", work / "engine"
    checkpoint.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    spec = model_spec(args)
    pretrained = random_weights.checkpoint_config(spec, mapping, args.dtype, args.weight_only)
    settings = build_settings(args, checkpoint, engine)
    tensors = random_weights.random_rank_weights(spec, mapping, getattr(torch, args.dtype), args.weight_only,
                                                 device, seed=1000 * args.seed + mapping.rank)
    weights: dict[str, torch.Tensor] | None = None
    if args.weights_on_device:
        weights = dict(tensors)  # the engine takes them over: one copy on the device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        print(f"rank {info.rank}: random weights made on {device} in {time.perf_counter() - started:.1f} s",
              flush=True)
        if info.rank == 0:
            engine.mkdir(parents=True, exist_ok=True)
            (engine / "config.json").write_text(json.dumps(pytorch_engine_config(settings, pretrained), indent=2))
    else:
        save_file({name: tensor.cpu() for name, tensor in tensors},
                  str(checkpoint / f"rank{mapping.rank}.safetensors"))
        if info.rank == 0:
            (checkpoint / "config.json").write_text(json.dumps(pretrained, indent=2))
        if info.world_size > 1:
            torch.distributed.barrier()
        if info.rank == 0:
            build_engine(settings)
    if info.world_size > 1:
        torch.distributed.barrier()
    prepared = time.perf_counter() - started
    if info.rank != 0:
        follow(engine, device=args.device, weights=weights)
        return 0
    results = []
    with Executor(engine, device=args.device, kv_cache_free_gpu_mem_fraction=args.kv_cache_free_gpu_mem_fraction,
                  max_tokens_in_paged_kv_cache=args.max_tokens_in_paged_kv_cache, weights=weights,
                  prefill_wait_steps=args.prefill_wait_steps) as executor:
        ready = time.perf_counter() - started
        kv = executor.kv_cache_info
        made = "made on the device" if args.weights_on_device else "written and built"
        print(f"{args.arch} weights {made} in {prepared:.1f} s, engine ready (weights loaded, KV pool, warm-up) at "
              f"{ready:.1f} s; device {device}, world size {info.world_size} (tp {mapping.tensor_parallel_size}, "
              f"pp {mapping.pipeline_parallel_size}), dtype {args.dtype}", flush=True)
        print(f"KV cache: {kv['blocks']} blocks x {kv['tokens_per_block']} tokens = {kv['tokens']} tokens, "
              f"{int(kv['bytes']) / 2**30:.2f} GiB; max_num_tokens {executor.max_num_tokens}; prefill_wait_steps "
              f"{executor.prefill_wait_steps}; weights on rank 0: "
              f"{executor.weight_bytes / 2**30:.2f} GiB ({args.weight_only or args.dtype})", flush=True)
        run_batch(executor, 1, argparse.Namespace(**{**vars(args), "output_len": 4}))  # warm-up
        if args.profile:
            profile_forwards(executor, args)
        for batch in batch_sizes(args):
            best = max((timed_run(executor, batch, args) for _ in range(args.repeats)),
                       key=lambda r: r["tokens_per_s"])
            results.append(best)
            print(format_result(best), flush=True)
        trace = trace_run(executor, args.trace_batch, args) if args.trace_batch else None
        kv = executor.kv_cache_info  # with the preemptions of the timed runs
        # written before the executor shuts down, so a slow multi-rank teardown cannot lose the results
        summary = {"args": {k: str(v) for k, v in vars(args).items()}, "device": str(device),
                   "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "world_size": info.world_size, "kv_cache": kv, "prefill_wait_steps": executor.prefill_wait_steps,
                   "results": results, **({"trace": trace} if trace else {})}
        print(json.dumps(summary), flush=True)
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))
        shutdown_started = time.perf_counter()
    print(f"executor shut down in {time.perf_counter() - shutdown_started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
