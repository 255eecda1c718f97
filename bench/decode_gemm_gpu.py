#!/usr/bin/env python
"""Decode-size float linears on one GPU: cuBLAS (`F.linear`) against our Triton tensor-core kernel
(`triton_w8a16.dense_mm`, the W8A16 kernel without the scale) over a grid of launch configurations.

    python bench/decode_gemm_gpu.py                      # MPT-7B's linears at TP1 and TP2, M 16 and 64
    python bench/decode_gemm_gpu.py --rows 1,16,32,64 --shapes 4096x6144,8192x4096
    python bench/decode_gemm_gpu.py --check-table        # the engine's DENSE_CONFIGS against cuBLAS (+ GELU)
    TRITON_INTERPRET=1 python bench/decode_gemm_gpu.py --cpu-smoke   # checks this script, measures nothing

At a decode batch of 16-64 rows a linear is bound by reading its weight, and cuBLAS's tiles can leave SMs idle
(e.g. 8192 outputs in 80-wide tiles are 103 programs on 132 SMs). Timing is what a decode step sees: each variant
is a CUDA graph of calls over enough weight copies (>= --rotate-mib) that nothing comes from L2; median over
replays. The output is checked against float32 (max error / max |reference|). It prints each shape's best config,
its speed over cuBLAS, the bandwidth both reach, and a `DENSE_CONFIGS` table (every shape's best launch and its
ratio to cuBLAS) to paste into generator/engine/triton_w8a16.py.
"""

from __future__ import annotations

import argparse
import sys

import engine_kernels_only  # noqa: F401  (before the kernel modules: see its docstring)
import torch
from int8_sweep_gpu import BAD_ERROR, measure, rel_error, table

from generator.engine.triton_w8a16 import DENSE_CONFIGS, Config, dense_mm, m_bucket, new_counters

# (K, N) = (in, out) of MPT-7B's four linears per layer and lm_head, whole (TP1) and one rank's shard of two
SHAPES = {"tp1": ((4096, 12288), (4096, 4096), (4096, 16384), (16384, 4096), (4096, 50432)),
          "tp2": ((4096, 6144), (2048, 4096), (4096, 8192), (8192, 4096), (4096, 25216))}
LAUNCHES = (  # (block_n, block_k, warps, stages); split_k is swept separately
    (32, 128, 4, 4), (32, 256, 4, 3), (64, 64, 4, 5), (64, 128, 4, 3), (64, 128, 4, 4), (64, 128, 4, 5),
    (64, 256, 4, 3), (64, 256, 8, 3), (128, 64, 4, 4), (128, 128, 4, 3), (128, 128, 8, 3), (16, 256, 4, 4),
)
SPLITS = (1, 2, 4, 0)  # 0: auto_split


def candidates(quick: bool) -> list[Config]:
    launches = LAUNCHES[:4] if quick else LAUNCHES
    return [Config("dot", n, k, split, warps, stages) for n, k, warps, stages in launches for split in SPLITS]


def sweep(depth: int, outputs: int, rows_list: list[int], configs: list[Config], args: argparse.Namespace,
          device: torch.device, dtype: torch.dtype) -> list[dict[str, object]]:
    nbytes = 2 * outputs * depth
    copies = max(1, -(-args.rotate_mib * 2**20 // nbytes))
    weights = [(torch.randn(outputs, depth, device=device) * 0.02).to(dtype) for _ in range(copies)]
    counters = new_counters(outputs, device)
    results = []
    for rows in rows_list:
        x = torch.randn(rows, depth, device=device, dtype=dtype)
        reference = x.float() @ weights[-1].float().t()
        row: dict[str, object] = {"K": depth, "N": outputs, "M": rows, "GB": nbytes / 1e9}
        variants = [("cublas", [lambda w=w, x=x: torch.nn.functional.linear(x, w) for w in weights])]
        variants += [(c.label, [lambda w=w, c=c, x=x: dense_mm(x, w, c, counters) for w in weights]) for c in configs]
        for name, calls in variants:
            try:
                us, out, stable = measure(calls, device, args.min_calls, args.replays)
            except Exception as failure:  # a launch Triton cannot build here (shared memory): say so
                row[name] = f"failed: {type(failure).__name__}: {str(failure).splitlines()[0][:80]}"
                if device.type == "cuda":
                    torch.cuda.synchronize()
                continue
            row[name] = (us, rel_error(out, reference), stable)
        results.append(row)
        good = {k: v for k, v in row.items() if isinstance(v, tuple) and k != "cublas" and v[1] <= BAD_ERROR and v[2]}
        best = min(good, key=lambda k: good[k][0]) if good else None
        base = row["cublas"][0] if isinstance(row.get("cublas"), tuple) else float("nan")  # type: ignore[index]
        print(f"K{depth} N{outputs} M{rows}: cublas {base:.1f} us"
              + (f", best {best} {good[best][0]:.1f} us ({base / good[best][0]:.2f}x)" if best else ", no good config"),
              flush=True)
    return results


def report(results: list[dict[str, object]], configs: list[Config]) -> None:
    lines, entries = [], {}
    by_label = {c.label: c for c in configs}
    for row in results:
        base = row.get("cublas")
        good = {k: v for k, v in row.items() if k in by_label and isinstance(v, tuple) and v[1] <= BAD_ERROR and v[2]}
        best = min(good, key=lambda k: good[k][0]) if good else None
        gb = float(row["GB"])  # type: ignore[arg-type]
        if not isinstance(base, tuple) or best is None:
            lines.append([str(row["K"]), str(row["N"]), str(row["M"]), "-", "-", "-", "-", "-", "-"])
            continue
        us = good[best][0]
        lines.append([str(row["K"]), str(row["N"]), str(row["M"]), f"{base[0]:.1f}", f"{gb / base[0] * 1e3:.2f}",
                      f"{us:.1f}", f"{gb / us * 1e3:.2f}", f"{base[0] / us:.2f}x", best])
        entries[(m_bucket(int(row["M"])), int(row["N"]), int(row["K"]))] = (  # type: ignore[call-overload]
            by_label[best], base[0] / us)
    print("\nus per linear (CUDA-graph replay, weights rotated past L2); TB/s = weight bytes / time")
    print(table(["K", "N", "M", "cublas us", "TB/s", "triton us", "TB/s", "speed-up", "best launch"], lines))
    print("\n# paste into generator/engine/triton_w8a16.py (with the cuBLAS / kernel ratio; dense_config applies "
          "DENSE_MARGIN and GELU_MARGIN to it)")
    print("DENSE_CONFIGS: dict[tuple[int, int, int], tuple[Config, float]] = {")
    for key, (c, ratio) in sorted(entries.items()):
        print(f"    {key}: (Config({c.kernel!r}, {c.block_n}, {c.block_k}, {c.split_k}, {c.num_warps}, "
              f"{c.num_stages}), {ratio:.2f}),")
    print("}")


def check_table(device: torch.device) -> None:
    """Each `DENSE_CONFIGS` launch, plain and with GELU in its epilogue, against `F.linear` / `F.gelu(F.linear)`
    at its M: the largest difference relative to the largest value, and the share of bit-equal elements."""
    counters = new_counters(max(outputs for _, outputs, _ in DENSE_CONFIGS), device)
    for (rows, outputs, depth), (config, _) in sorted(DENSE_CONFIGS.items()):
        x = torch.randn(rows, depth, device=device, dtype=torch.bfloat16)
        w = torch.randn(outputs, depth, device=device, dtype=torch.bfloat16) * 0.02
        for gelu in (False, True):
            reference = torch.nn.functional.linear(x, w)
            reference = torch.nn.functional.gelu(reference) if gelu else reference
            out = dense_mm(x, w, config, counters, gelu=gelu)
            difference = ((out.float() - reference.float()).abs().max() / reference.float().abs().max()).item()
            print(f"M{rows} N{outputs} K{depth} gelu={gelu}: max relative difference {difference:.2e}, "
                  f"equal elements {(out == reference).float().mean().item():.3f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="16,64")
    parser.add_argument("--shapes", default="", help="KxN,KxN,... (default: MPT-7B at TP1 and TP2)")
    parser.add_argument("--quick", action="store_true", help="four launches only")
    parser.add_argument("--rotate-mib", type=int, default=512)
    parser.add_argument("--min-calls", type=int, default=48)
    parser.add_argument("--replays", type=int, default=15)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--check-table", action="store_true", help="check the engine's table against cuBLAS, no timing")
    args = parser.parse_args()
    if args.check_table:
        check_table(torch.device("cuda"))
        return 0
    if args.cpu_smoke:
        device, dtype = torch.device("cpu"), torch.float32
        shapes = [(64, 48)]
        rows_list = [2, 16]
        args.rotate_mib, args.min_calls, args.replays = 0, 1, 1
        configs = [Config("dot", 16, 16, 2, 4, 1), Config("dot", 32, 32, 1, 4, 1)]
    else:
        if not torch.cuda.is_available():
            print("decode_gemm_gpu.py needs a CUDA GPU (or --cpu-smoke)", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16
        shapes = ([tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes
                  else [s for group in SHAPES.values() for s in group])
        rows_list = [int(v) for v in args.rows.split(",")]
        configs = candidates(args.quick)
        print(f"device {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    results = []
    for depth, outputs in shapes:
        results += sweep(depth, outputs, rows_list, configs, args, device, dtype)
    report(results, configs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
