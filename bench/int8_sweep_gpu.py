#!/usr/bin/env python
"""Decode-size weight-only linears on one GPU: bf16 vs our int8 Triton kernels (several configs) vs int4 tinygemm.

    python bench/int8_sweep_gpu.py             # ~1-3 minutes on one H100 (most of it Triton compiling)
    python bench/int8_sweep_gpu.py --quick     # two shapes, M 1 and 16, fewer configs
    python bench/int8_sweep_gpu.py --eager     # eager calls instead of graph replays (host launch cost in)

For (K, N) in (4096, 4096), (4096, 12288), (4096, 16384), (16384, 4096) and M in 1, 4, 16, 64 (bf16 activations)
it prints microseconds per linear for each variant, then the best int8 config per row and a `CONFIGS` table to
paste into generator/engine/triton_w8a16.py. Timing is what a decode step sees: each variant is captured in a
CUDA graph that calls it back to back over enough copies of the weight (>= --rotate-mib in all) that nothing is
served from L2, replayed after warm-up; CUDA events, median over replays, divided by the calls per replay. The
output of the last replay is checked against the dequantized float32 reference (max error / max |reference|),
which also checks that the split-K counters re-arm between replays.

`--cpu-smoke` runs the same code on CPU with tiny shapes and eager timing (set TRITON_INTERPRET=1): a test of
this script, not a measurement.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable

import engine_kernels_only  # noqa: E402, F401  (before the kernel modules: see its docstring)
import torch

from generator.engine.triton_w8a16 import (  # noqa: E402
    Config,
    auto_split,
    m_bucket,
    new_counters,
    pick_config,
    w8a16_mm,
)
from generator.engine.weight_only import WeightOnlyLinear  # noqa: E402

SHAPES = ((4096, 4096), (4096, 12288), (4096, 16384), (16384, 4096))  # (K, N): in, out
ROWS = (1, 4, 16, 64)
CANDIDATES: dict[str, Config] = {  # id -> config; gemv ones apply to M == 1 only
    "g1": Config("gemv", 32, 256, 0, 4, 2),
    "g2": Config("gemv", 16, 512, 0, 4, 2),
    "g3": Config("gemv", 64, 128, 0, 4, 2),
    "g4": Config("gemv", 32, 256, 0, 8, 1),
    "g5": Config("gemv", 32, 256, 1, 4, 2),
    "g6": Config("gemv", 32, 256, 0, 4, 2, "atomic"),
    "g7": Config("gemv", 4, 1024, 0, 4, 1),
    "g8": Config("gemv", 8, 512, 0, 4, 2),
    "d1": Config("dot", 64, 128, 0, 4, 3),
    "d2": Config("dot", 64, 256, 0, 4, 3),
    "d3": Config("dot", 128, 128, 0, 4, 3),
    "d4": Config("dot", 128, 128, 0, 8, 3),
    "d5": Config("dot", 32, 128, 0, 4, 4),
    "d6": Config("dot", 64, 128, 1, 4, 3),
    "d7": Config("dot", 64, 128, 0, 4, 3, "atomic"),
    "d8": Config("dot", 128, 64, 0, 4, 4),
}
QUICK = ("g1", "g2", "g7", "d1", "d3", "d6")
BAD_ERROR = 2e-2


def measure(calls: list[Callable[[], torch.Tensor]], device: torch.device, min_calls: int,
            replays: int, eager: bool = False) -> tuple[float, torch.Tensor, bool]:
    """Median microseconds per call, the last call's output, and whether that output was bitwise the same after
    every replay (a race in the split-K fixup would show here). On CUDA: a graph of >= min_calls calls cycling
    over `calls` (one per weight copy); on CPU: eager wall time (smoke test only)."""
    per_graph = len(calls) * max(1, -(-min_calls // len(calls)))
    if device.type != "cuda":
        out = calls[0]()
        start = time.perf_counter()
        for index in range(len(calls)):
            out = calls[index]()
        return (time.perf_counter() - start) / len(calls) * 1e6, out, bool(torch.equal(out, calls[0]()))
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # warm-up outside the graph: compiles, lazy inits
        for call in calls[:2]:
            call()
    torch.cuda.current_stream(device).wait_stream(stream)
    if eager:  # the same calls launched from Python one by one: host launch cost included
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for index in range(per_graph):
                out = calls[index % len(calls)]()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1000 / per_graph)
        return statistics.median(times), out, True
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for index in range(per_graph):
            out = calls[index % len(calls)]()
    graph.replay()
    first = out.clone()
    stable = True
    for _ in range(3):
        graph.replay()
        stable = stable and bool(torch.equal(out, first))
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / per_graph)
        stable = stable and bool(torch.equal(out, first))
    out = out.clone()  # off the graph's memory pool before the graph goes
    del graph
    return statistics.median(times), out, stable


def rel_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.float() - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()


def sweep_shape(depth: int, outputs: int, rows_list: tuple[int, ...], ids: list[str], args: argparse.Namespace,
                device: torch.device, dtype: torch.dtype) -> list[dict[str, object]]:
    """Every variant at every M for one (K, N); one result dict per M: variant -> (us, error or None)."""
    generator = torch.Generator(device="cpu").manual_seed(depth + outputs)
    q8 = torch.randint(-128, 128, (outputs, depth), generator=generator, dtype=torch.int8).to(device)
    scale8 = (torch.rand(outputs, generator=generator) * 2e-3 + 1e-4).to(device, dtype)
    q4 = torch.randint(-8, 8, (outputs, depth), generator=generator, dtype=torch.int8).to(device)
    scale4 = (torch.rand(outputs, generator=generator) * 3e-2 + 1e-3).to(device, dtype)
    rotate = args.rotate_mib * 2**20

    def copies(nbytes: int) -> int:
        return max(1, -(-rotate // nbytes))

    reference8 = (q8.float() * scale8.float()[:, None]).t()  # [K, N]
    reference4 = (q4.float() * scale4.float()[:, None]).t()
    bf16_weights = [(torch.randn(outputs, depth, device=device) * 0.02).to(dtype) for _ in range(copies(2 * outputs * depth))]
    int8_weights = [q8] + [q8.clone() for _ in range(copies(outputs * depth) - 1)]
    counters = new_counters(outputs, device)
    default8 = WeightOnlyLinear(q8.t(), scale8, "int8", dtype, device)
    int4 = WeightOnlyLinear(q4.t(), scale4, "int4", dtype, device)
    int4_copies = [int4]
    for _ in range(copies(int4.nbytes) - 1):
        twin = copy.copy(int4)
        twin.weight = int4.weight.clone()
        int4_copies.append(twin)
    results = []
    for rows in rows_list:
        x = torch.randn(rows, depth, device=device, dtype=dtype)
        ref8, ref4 = x.float() @ reference8, x.float() @ reference4
        row: dict[str, object] = {"K": depth, "N": outputs, "M": rows}
        variants: list[tuple[str, list[Callable[[], torch.Tensor]], torch.Tensor | None]] = [
            ("bf16", [lambda w=w, x=x: torch.nn.functional.linear(x, w) for w in bf16_weights], None),
            (f"int4 {int4.kernel}", [lambda lin=lin, x=x: lin(x) for lin in int4_copies], ref4),
        ]
        default_label = "int8 default (" + pick_config(rows, outputs, depth, device).label + ")"
        defaults = []
        for w in int8_weights:
            twin = copy.copy(default8)
            twin.weight = w
            defaults.append(twin)
        variants.append((default_label, [lambda lin=lin, x=x: lin(x) for lin in defaults], ref8))
        for name in ids:
            config = CANDIDATES[name]
            if config.kernel == "gemv" and rows != 1:
                continue
            variants.append((name, [lambda w=w, c=config, x=x: w8a16_mm(x, w, scale8, c, counters)
                                    for w in int8_weights], ref8))
        for name, calls, reference in variants:
            try:
                us, out, stable = measure(calls, device, args.min_calls, args.replays, args.eager)
            except Exception as failure:  # a config Triton cannot build here (e.g. shared memory): report it
                row[name] = f"failed: {type(failure).__name__}: {str(failure).splitlines()[0][:80]}"
                if device.type == "cuda":
                    torch.cuda.synchronize()
                continue
            atomic = name in CANDIDATES and CANDIDATES[name].reduce == "atomic"  # float atomics: any order
            row[name] = (us, None if reference is None else rel_error(out, reference), stable or atomic)
        results.append(row)
        print(progress(row), flush=True)
    return results


def progress(row: dict[str, object]) -> str:
    cells = [f"K{row['K']} N{row['N']} M{row['M']}:"]
    for key, value in row.items():
        if key in ("K", "N", "M"):
            continue
        short = key.split(" (")[0].replace("int8 default", "def")
        if isinstance(value, tuple):
            us, error, stable = value
            flag = ("" if error is None or error <= BAD_ERROR else "!BAD") + ("" if stable else "~UNSTABLE")
            cells.append(f"{short}={us:.1f}{flag}")
        else:
            cells.append(f"{short}=FAILED")
    return " ".join(cells)


def int8_entries(row: dict[str, object]) -> dict[str, tuple[float, float, bool]]:
    """The int8 candidates of one row that ran with a good, stable result: id -> (us, error, stable)."""
    return {key: value for key, value in row.items() if key in CANDIDATES and isinstance(value, tuple)
            and value[1] is not None and value[1] <= BAD_ERROR and value[2]}


def cell(value: object) -> str:
    if isinstance(value, tuple):
        return (f"{value[0]:.1f}" + ("" if value[1] is None or value[1] <= BAD_ERROR else "!")
                + ("" if value[2] else "~"))
    return "fail" if value else "-"


def table(header: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    out = ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in [header, *lines]]
    return "\n".join([out[0], "  ".join("-" * w for w in widths), *out[1:]])


def report(results: list[dict[str, object]], ids: list[str], device: torch.device, eager: bool) -> None:
    print("\nus per linear (" + ("eager calls" if eager else "CUDA-graph replay") + ", weights rotated past L2); "
          "'!' = error > "
          f"{BAD_ERROR:g}, '~' = output changed between replays (a split-K race); ids: see the legend")
    header = ["K", "N", "M", "bf16", "int4", "int8 def", *ids, "best", "best/bf16", "def/bf16", "max err"]
    lines = []
    for row in results:
        bf16 = row.get("bf16")
        int4 = next((v for k, v in row.items() if k.startswith("int4")), None)
        default = next((v for k, v in row.items() if k.startswith("int8 default")), None)
        good = int8_entries(row)
        best = min(good, key=lambda k: good[k][0]) if good else None
        base = bf16[0] if isinstance(bf16, tuple) else float("nan")
        errors = [v[1] for k, v in row.items() if isinstance(v, tuple) and v[1] is not None]
        lines.append([str(row["K"]), str(row["N"]), str(row["M"]), cell(bf16), cell(int4), cell(default),
                      *[cell(row.get(i)) for i in ids], best or "-",
                      f"{base / good[best][0]:.2f}x" if best else "-",
                      f"{base / default[0]:.2f}x" if isinstance(default, tuple) else "-",
                      f"{max(errors):.1e}" if errors else "-"])
    print(table(header, lines))
    print("\nlegend (split s0 = auto, `auto_split`):")
    for name in ids:
        print(f"  {name}: {CANDIDATES[name].label}")
    failures = [(row["K"], row["N"], row["M"], k, v) for row in results for k, v in row.items() if isinstance(v, str)]
    for failure in failures:
        print("  FAILED", *failure)
    # the best config per (M bucket, N, K), and per M bucket over all shapes ((bucket, 0, 0): split_k stays
    # auto): least total time relative to bf16 over the rows it covers, among configs good on all of them
    buckets: dict[tuple[int, int, int], dict[str, float]] = {}
    for row in results:
        rows, outputs, depth = int(row["M"]), int(row["N"]), int(row["K"])  # type: ignore[call-overload]
        good = int8_entries(row)
        bf16 = row.get("bf16")
        base = bf16[0] if isinstance(bf16, tuple) else 1.0
        for key in ((m_bucket(rows), outputs, depth), (m_bucket(rows), 0, 0)):
            totals = buckets.setdefault(key, {name: 0.0 for name in good})
            for name in list(totals):
                if name in good:
                    totals[name] += good[name][0] / base
                else:
                    del totals[name]
    print("\n# paste into generator/engine/triton_w8a16.py (split_k resolved to what auto chose here)")
    print("CONFIGS: dict[tuple[int, int, int], Config] = {")
    for key, totals in sorted(buckets.items()):
        if not totals:
            continue
        config = CANDIDATES[min(totals, key=lambda k: totals[k])]
        if not config.split_k and key[1]:  # pin the split the timing used, so another GPU's SM count doesn't change it
            n_tiles, k_tiles = -(-key[1] // config.block_n), -(-key[2] // config.block_k)
            split = min(auto_split(n_tiles, k_tiles, device, config.kernel), k_tiles)
            per_split = -(-k_tiles // split)
            config = Config(config.kernel, config.block_n, config.block_k, -(-k_tiles // per_split),
                            config.num_warps, config.num_stages, config.reduce)
        print(f"    {key}: Config({config.kernel!r}, {config.block_n}, {config.block_k}, {config.split_k}, "
              f"{config.num_warps}, {config.num_stages}, {config.reduce!r}),")
    print("}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shapes (4096,4096),(4096,16384), M 1 and 16, "
                        "configs " + ",".join(QUICK))
    parser.add_argument("--configs", help="comma-separated candidate ids (default: all)")
    parser.add_argument("--rows", help="comma-separated M values (default 1,4,16,64)")
    parser.add_argument("--rotate-mib", type=int, default=256, help="weight copies per variant, in MiB (> L2)")
    parser.add_argument("--min-calls", type=int, default=48, help="calls per graph replay")
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--eager", action="store_true", help="time eager back-to-back calls instead of a CUDA "
                        "graph (adds each call's host launch cost; no replay stability check)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (with TRITON_INTERPRET=1)")
    args = parser.parse_args()
    ids = args.configs.split(",") if args.configs else list(QUICK if args.quick else CANDIDATES)
    unknown = [name for name in ids if name not in CANDIDATES]
    if unknown:
        sys.exit(f"unknown config ids {unknown}; known: {','.join(CANDIDATES)}")
    shapes: tuple[tuple[int, int], ...] = ((4096, 4096), (4096, 16384)) if args.quick else SHAPES
    rows = tuple(int(v) for v in args.rows.split(",")) if args.rows else ((1, 16) if args.quick else ROWS)
    if args.cpu_smoke:
        device, dtype = torch.device("cpu"), torch.float32  # the interpreter's numpy has no bf16
        shapes, args.rotate_mib = ((1040, 96), (520, 48)), 0
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/int8_sweep_gpu.py needs a CUDA GPU (or --cpu-smoke)")
        device, dtype = torch.device("cuda"), torch.bfloat16
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test)"
    import triton

    print(f"{name}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    started = time.time()
    results = []
    for depth, outputs in shapes:
        results += sweep_shape(depth, outputs, rows, ids, args, device, dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report(results, ids, device, args.eager)
    print(f"\n{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
