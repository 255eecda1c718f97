"""The paged decode-attention kernel on a GPU: correctness against the gather reference, then time and
effective bandwidth of both (MPT-7B shapes by default: 32 heads of 128, blocks of 32 tokens, bf16).

    python bench/bench_paged_attention.py                          # batch 1, 8, 64, 256 at 192 tokens each
    python bench/bench_paged_attention.py --kv-heads 8 --heads 48  # DBRX's GQA
    python bench/bench_paged_attention.py --int8                   # an INT8 KV cache
    python bench/bench_paged_attention.py --sweep                  # every TILE x num_warps x num_stages
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from generator.engine.attention import decode_attention_reference, decode_splits, paged_decode_attention  # noqa: E402
from generator.engine.config import alibi_slopes  # noqa: E402


def time_ms(function, repeats: int = 20) -> float:  # type: ignore[no-untyped-def]
    """GPU time of one call: `repeats` calls captured in a CUDA graph, replayed (no launch overhead, as in the
    engine's decode graphs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        function()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            function()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (5 * repeats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--batch-sizes", default="1,8,64,256")
    parser.add_argument("--length", type=int, default=192, help="tokens per sequence")
    parser.add_argument("--table-tokens", type=int, default=None,
                        help="tokens each block table can hold (default: the length), as a CUDA graph's tables are "
                             "as wide as the longest sequence allowed")
    parser.add_argument("--no-alibi", action="store_true")
    parser.add_argument("--int8", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="time each launch configuration of the kernel")
    parser.add_argument("--sweep-rows", type=int, default=5, help="fastest configurations printed per batch")
    parser.add_argument("--warps", type=int, nargs="*", default=[1, 2, 4, 8], help="num_warps tried by --sweep")
    parser.add_argument("--stages", type=int, nargs="*", default=[1, 2, 3], help="num_stages tried by --sweep")
    args = parser.parse_args()
    device = torch.device("cuda")
    heads, kv_heads, hd, block = args.heads, args.kv_heads or args.heads, args.head_size, args.block_size
    slopes = None if args.no_alibi else alibi_slopes(heads, 8).to(device)
    scale = 1.0 / math.sqrt(hd)
    per_sequence = -(-max(args.length, args.table_tokens or 0) // block)
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        blocks = batch * per_sequence + 1
        generator = torch.Generator(device=device).manual_seed(batch)
        shape = (blocks, block, kv_heads, hd)
        keys = torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16)
        values = torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16)
        kv_scale = None
        if args.int8:
            kv_scale = 0.03
            keys = (keys.float() / kv_scale).round().clamp(-128, 127).to(torch.int8)
            values = (values.float() / kv_scale).round().clamp(-128, 127).to(torch.int8)
        order = torch.randperm(blocks - 1, generator=generator, device=device) + 1  # scattered blocks
        tables = order.view(batch, per_sequence).to(torch.int32)
        lengths = torch.full((batch,), args.length, dtype=torch.int32, device=device)
        q = torch.randn((batch, heads, hd), generator=generator, device=device, dtype=torch.bfloat16)
        want = decode_attention_reference(q, keys, values, tables, lengths, scale, slopes, kv_scale)
        got = paged_decode_attention(q, keys, values, tables, lengths, scale, slopes, kv_scale)
        error = (got.float() - want.float()).abs().max().item()
        # rows of every length up to the table's: short rows leave splits empty
        mixed = torch.randint(1, max(args.length, args.table_tokens or 0) + 1, (batch,), generator=generator,
                              device=device, dtype=torch.int32)
        mixed_want = decode_attention_reference(q, keys, values, tables, mixed, scale, slopes, kv_scale)
        mixed_got = paged_decode_attention(q, keys, values, tables, mixed, scale, slopes, kv_scale)
        error = max(error, (mixed_got.float() - mixed_want.float()).abs().max().item())
        forced = paged_decode_attention(q, keys, values, tables, mixed, scale, slopes, kv_scale, splits=4)
        error = max(error, (forced.float() - mixed_want.float()).abs().max().item())  # the split kernel, any shape
        inputs = (q, keys, values, tables, lengths, scale, slopes, kv_scale)
        kernel = time_ms(lambda inputs=inputs: paged_decode_attention(*inputs))
        unsplit = time_ms(lambda inputs=inputs: paged_decode_attention(*inputs, splits=1))
        reference = time_ms(lambda inputs=inputs: decode_attention_reference(*inputs))
        read = 2 * batch * args.length * kv_heads * hd * keys.element_size()
        splits = decode_splits(batch * heads, tables.shape[1] * block)
        print(f"batch {batch:4d} x {args.length} tokens: max |kernel - reference| {error:.2e}; kernel "
              f"{1000 * kernel:8.1f} us ({read / kernel / 1e6:7.1f} GB/s of K/V, {splits} splits; unsplit "
              f"{1000 * unsplit:8.1f} us), gather reference {1000 * reference:8.1f} us", flush=True)
        if error > 2e-2:
            print("MISMATCH", flush=True)
            return 1
        if args.sweep:
            timings = []
            for tile, warps, stages in itertools.product((16, 32, 64, 128, 256), args.warps, args.stages):
                launch = {"TILE": tile, "num_warps": warps, "num_stages": stages}
                try:
                    got = paged_decode_attention(*inputs, launch=launch)
                    if (got.float() - want.float()).abs().max().item() > 2e-2:
                        print(f"  {launch}: MISMATCH", flush=True)
                        continue
                    timings.append((time_ms(lambda launch=launch, inputs=inputs: paged_decode_attention(*inputs, launch=launch)),
                                    launch))
                except Exception as refused:  # noqa: BLE001 - a configuration the compiler refuses (resources)
                    print(f"  {launch}: {type(refused).__name__}", flush=True)
            for took, launch in sorted(timings, key=lambda item: item[0])[:args.sweep_rows]:
                print(f"  {1000 * took:8.1f} us ({read / took / 1e6:7.1f} GB/s)  {launch}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
