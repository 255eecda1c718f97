#!/usr/bin/env python
"""GPU micro-benchmark of the engine's MoE and weight-only kernels (issue 15 items 2 and 3); one command:

    python bench/moe_quant_gpu.py            # ~2-4 minutes on one H100; --quick for a smoke run

(a) DBRX at full width (d 6144, F 10752, 16 experts, top-4), the MoE MLPs of 4 layers, bf16: the old
    per-expert loop (one host sync per layer) against the new `grouped` (device argsort + torch._grouped_mm)
    and `dense` kernels, eagerly and replayed from a CUDA graph, and the weight-only int8/int4 experts (int8
    also by `gather`, which reads only the chosen experts' weights: the engine's choice for small batches).
(b) single linears (in x out = 4096x4096, 4096x16384, 16384x4096) at batch 1 and 16: bf16 against the int8 and
    int4 weight-only kernels (and the dequantize-in-the-call fallbacks), with the weight bytes each holds.

Random weights generated on the GPU; CUDA events, warm-up first, median of `--runs`. Needs only torch (plus
Triton, which CUDA builds of torch ship, for the int8 kernel) and this repository on the path.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

import engine_kernels_only  # noqa: E402, F401  (before the kernel modules: see its docstring)
import torch

from generator.engine.moe import Experts, moe_forward, route  # noqa: E402
from generator.engine.weight_only import (  # noqa: E402
    KERNEL_ENV,
    QuantizedExperts,
    WeightOnlyLinear,
    expert_linears,
)


def time_ms(fn: Callable[[], object], runs: int, warmup: int = 5) -> float:
    """Median milliseconds of `fn`, each run timed alone with CUDA events (host work and syncs included)."""
    for _ in range(warmup):
        fn()
    times = []
    if not torch.cuda.is_initialized():  # --device cpu: a smoke test of this script
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)
    torch.cuda.synchronize()
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graphed(fn: Callable[[], torch.Tensor]) -> Callable[[], object]:
    """Capture `fn` (which reads static inputs) in a CUDA graph; returns the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def with_kernel(kernel: str | None, build: Callable[[], WeightOnlyLinear]) -> WeightOnlyLinear:
    """Build a weight-only linear with `GEN_REPO_WEIGHT_ONLY_KERNEL` set to `kernel` (None: the default)."""
    previous = os.environ.pop(KERNEL_ENV, None)
    if kernel:
        os.environ[KERNEL_ENV] = kernel
    try:
        return build()
    finally:
        os.environ.pop(KERNEL_ENV, None)
        if previous is not None:
            os.environ[KERNEL_ENV] = previous


def random_int(shape: tuple[int, ...], precision: str, device: torch.device) -> torch.Tensor:
    low, high = (-128, 128) if precision == "int8" else (-8, 8)
    return torch.randint(low, high, shape, dtype=torch.int8, device=device)


# --- (a) MoE -----------------------------------------------------------------------------------------------------

def moe_layers(args: argparse.Namespace, device: torch.device, precision: str | None) -> list[tuple[torch.Tensor,
                                                                                                    Experts]]:
    d, hidden, count = args.hidden, args.ffn, args.experts
    layers = []
    for _ in range(args.layers):
        router = torch.randn(count, d, device=device) * 0.02
        if precision is None:
            experts = Experts(first=0, count=count,
                              fc=torch.randn(count, 2 * hidden, d, device=device, dtype=torch.bfloat16) * 0.02,
                              proj=torch.randn(count, d, hidden, device=device, dtype=torch.bfloat16) * 0.02)
        elif precision == "int8":  # the engine's own loader path: stacks shared by the linears (gather path)
            experts = Experts(
                first=0, count=count,
                fc_quantized=expert_linears(random_int((count, d, 2 * hidden), precision, device),
                                            torch.full((count, 2 * hidden), 0.05 / 128, device=device), precision,
                                            torch.bfloat16, device, concatenate=True),
                proj_quantized=expert_linears(random_int((count, hidden, d), precision, device),
                                              torch.full((count, d), 0.05 / 128, device=device), precision,
                                              torch.bfloat16, device, concatenate=False))
        else:  # int4: built from unpacked values (the engine unpacks the stored nibbles first)
            fc = WeightOnlyLinear(random_int((d, count * 2 * hidden), precision, device),
                                  torch.full((count * 2 * hidden,), 0.05 / 8, device=device), precision,
                                  torch.bfloat16, device)
            proj = [WeightOnlyLinear(random_int((hidden, d), precision, device),
                                     torch.full((d,), 0.05 / 8, device=device), precision, torch.bfloat16,
                                     device) for _ in range(count)]
            experts = Experts(first=0, count=count, fc_quantized=QuantizedExperts([fc]),
                              proj_quantized=QuantizedExperts(proj))
        layers.append((router, experts))
    return layers


def moe_stack(layers: list[tuple[torch.Tensor, Experts]], x: torch.Tensor, top_k: int,
              method: str) -> torch.Tensor:
    hidden = x
    for router, experts in layers:
        weights, chosen = route(hidden, router, top_k, 1.0)
        hidden = hidden + moe_forward(hidden, weights, chosen, experts, method)
    return hidden


def layer_bytes(layers: list[tuple[torch.Tensor, Experts]]) -> int:
    total = 0
    for _, experts in layers:
        if experts.fc is not None and experts.proj is not None:
            total += experts.fc.numel() * 2 + experts.proj.numel() * 2
        else:
            assert experts.fc_quantized is not None and experts.proj_quantized is not None
            total += experts.fc_quantized.nbytes + experts.proj_quantized.nbytes
    return total


def bench_moe(args: argparse.Namespace, device: torch.device) -> list[list[str]]:
    rows = []
    for precision in (None, "int8", "int4"):
        layers = moe_layers(args, device, precision)
        size = f"{layer_bytes(layers) / 2**30:.2f} GiB"
        methods = {None: ["loop", "grouped", "dense"], "int8": ["dense", "gather"], "int4": ["dense"]}[precision]
        label = precision or "bf16"
        for tokens in args.tokens:
            x = torch.randn(tokens, args.hidden, device=device, dtype=torch.bfloat16)
            reference = moe_stack(layers, x, args.top_k, "loop") if precision is None else None
            for method in methods:
                try:
                    eager = time_ms(partial(moe_stack, layers, x, args.top_k, method), args.runs)
                except Exception as failure:
                    rows.append([f"{label} {method}", str(tokens), f"failed: {str(failure)[:70]}", "", "", size])
                    continue
                if method == "loop":
                    graph = "n/a (host sync)"
                elif device.type != "cuda":
                    graph = "n/a (CPU)"
                else:
                    try:
                        replay = graphed(partial(moe_stack, layers, x, args.top_k, method))
                        graph = f"{time_ms(replay, args.runs):.3f}"
                    except Exception as failure:  # report, keep benchmarking
                        graph = f"capture failed: {type(failure).__name__}: {str(failure)[:60]}"
                error = ""
                if reference is not None and method != "loop":
                    out = moe_stack(layers, x, args.top_k, method)
                    error = f"{((out - reference).abs().max() / reference.abs().max()).item():.1e}"
                rows.append([f"{label} {method}", str(tokens), f"{eager:.3f}", graph, error, size])
        layers.clear()  # free this precision's experts before the next one's
        torch.cuda.empty_cache()
    return rows


TRITON_CONFIGS = ((32, 128, 4), (64, 256, 4), (128, 128, 4), (128, 256, 8), (256, 128, 8))


def _triton_call(kernel: Callable[..., torch.Tensor], linear: WeightOnlyLinear, block_n: int, block_k: int,
                 warps: int, x: torch.Tensor) -> torch.Tensor:
    return kernel(x, linear.weight, linear.scales, block_n, block_k, warps)


# --- (b) linears -------------------------------------------------------------------------------------------------

def bench_linears(args: argparse.Namespace, device: torch.device) -> list[list[str]]:
    rows = []
    for inputs, outputs in ((4096, 4096), (4096, 16384), (16384, 4096)):
        inputs, outputs = inputs // args.shrink, outputs // args.shrink
        weight = torch.randn(outputs, inputs, device=device, dtype=torch.bfloat16) * 0.02
        variants: list[tuple[str, Callable[[torch.Tensor], torch.Tensor], int, torch.Tensor]] = [
            ("bf16", lambda x, w=weight: torch.nn.functional.linear(x, w), weight.numel() * 2, weight)]
        for precision, kernels in (("int8", (None, "int8pack", "dequant")), ("int4", (None, "dequant"))):
            levels = 128 if precision == "int8" else 8
            scale = weight.float().abs().amax(dim=1) / levels
            values = torch.clamp(torch.round(weight.float() / scale[:, None]), -levels, levels - 1).to(torch.int8)
            for kernel in kernels:
                try:
                    linear = with_kernel(kernel, partial(WeightOnlyLinear, values.t(), scale, precision,
                                                                 torch.bfloat16, device))
                except Exception as failure:
                    print(f"{precision} {kernel or 'default'} {inputs}x{outputs}: cannot build: {failure}")
                    continue
                dequantized = (values.float() * scale[:, None]).to(torch.bfloat16)
                variants.append((f"{precision} {linear.kernel}", linear, linear.nbytes, dequantized))
                if linear.kernel == "int8_triton":  # other launch configurations, to tune the defaults
                    from generator.engine.triton_w8a16 import w8a16_mm

                    for block_n, block_k, warps in TRITON_CONFIGS:
                        variants.append((f"int8 triton n{block_n} k{block_k} w{warps}",
                                         partial(_triton_call, w8a16_mm, linear, block_n, block_k, warps),
                                         linear.nbytes, dequantized))
        for batch in (1, 16):
            x = torch.randn(batch, inputs, device=device, dtype=torch.bfloat16)
            base = None
            for name, fn, nbytes, reference_weight in variants:
                try:
                    ms = time_ms(partial(fn, x), args.runs * 4)
                except Exception as failure:  # an op this torch lacks on CUDA: report it, go on
                    rows.append([f"{inputs}x{outputs}", str(batch), name, f"failed: {str(failure)[:70]}", "", "",
                                 ""])
                    continue
                base = base or ms
                expected = torch.nn.functional.linear(x.float(), reference_weight.float())
                error = ((fn(x).float() - expected).abs().max() / expected.abs().max()).item()
                rows.append([f"{inputs}x{outputs}", str(batch), name, f"{ms * 1000:.1f}", f"{base / ms:.2f}x",
                             f"{nbytes / 2**20:.1f} MiB", f"{error:.1e}"])
        variants.clear()
        torch.cuda.empty_cache()
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
             for row in [header, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="timed runs per MoE case (linears: 4x)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=6144)
    parser.add_argument("--ffn", type=int, default=10752)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--tokens", type=lambda s: [int(v) for v in s.split(",")], default=[1, 16, 128])
    parser.add_argument("--skip-moe", action="store_true")
    parser.add_argument("--skip-linear", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1/4 width, 2 layers, 5 runs")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of the script itself (use --quick)")
    args = parser.parse_args()
    args.shrink = 1
    if args.quick:
        args.hidden, args.ffn, args.layers, args.runs, args.shrink = args.hidden // 4, args.ffn // 4, 2, 5, 4
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/moe_quant_gpu.py needs a CUDA GPU")
    device = torch.device(args.device)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, "
          f"_grouped_mm: {hasattr(torch, '_grouped_mm')}", flush=True)
    if not args.skip_moe:
        print(f"\n(a) MoE MLPs of {args.layers} layers: d {args.hidden}, F {args.ffn}, {args.experts} experts, "
              f"top-{args.top_k}, bf16 activations; ms per forward of all layers (median of {args.runs})")
        print(table(["path", "tokens", "eager ms", "CUDA graph ms", "max rel err vs loop", "expert bytes"],
                    bench_moe(args, device)), flush=True)
    if not args.skip_linear:
        print(f"\n(b) one linear, bf16 activations; us per call (median of {args.runs * 4}); speed-up vs bf16")
        print(table(["in x out", "batch", "weights", "us", "vs bf16", "weight bytes", "max rel err"],
                    bench_linears(args, device)), flush=True)


if __name__ == "__main__":
    main()
