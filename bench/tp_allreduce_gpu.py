"""Latency of one TP all-reduce inside a CUDA graph: NCCL vs the engine's symmetric-memory paths.

    python3 -m torch.distributed.run --nproc-per-node 2 bench/tp_allreduce_gpu.py

Each size is a decode step's message (batch x hidden, bf16). A graph of 64 all-reduces is replayed 50 times;
the figure is the mean time of one all-reduce. The sums are compared with NCCL's.

Then the fused all-reduce + residual add + LayerNorm (`PeerAllReduceNorm`) against the engine's two kernels
(one-shot all-reduce, then `add_layer_norm`), call after call in a graph that alternates the two buffers as a
forward does, and the time of one block boundary. At TP2 its results must equal theirs (a rank that read a
peer's rows before they arrived, or overwrote rows not yet read, shows as a mismatch); beyond, the largest
difference is printed (the two round differently), and every rank must hold the same hidden states. The "one
rank late" rows time the injected delays too.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from generator.engine.allreduce_norm import PeerAllReduceNorm  # noqa: E402
from generator.engine.attention import add_layer_norm  # noqa: E402
from generator.engine.distributed import PeerAllReduce  # noqa: E402


def graph_latency_us(reduce: Callable[[torch.Tensor], torch.Tensor], tensor: torch.Tensor, nodes: int = 64,
                     replays: int = 50) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            reduce(tensor)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(nodes):
            reduce(tensor)
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    started = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / (replays * nodes) * 1e6


def main() -> None:
    rank = int(os.environ["RANK"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    group = dist.new_group(list(range(dist.get_world_size())))
    peer = PeerAllReduce(group, torch.device("cuda"), torch.bfloat16, 2 << 20)
    peer.connect()

    def nccl(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=group)
        return t

    if rank == 0:
        print(f"torch {torch.__version__}, {dist.get_world_size()} x {torch.cuda.get_device_name()}", flush=True)
    for batch, hidden in [(1, 4096), (8, 4096), (64, 4096), (256, 4096), (1, 6144), (16, 6144), (64, 6144)]:
        x = torch.randn(batch, hidden, device="cuda", dtype=torch.bfloat16) * (rank + 1)
        expected = nccl(x.clone())
        got = peer(x.clone())
        # bit-equal at 2 ranks; with more, NCCL adds in another order and the last bits of bf16 differ
        exact = torch.equal(got, expected)
        largest = (got.float() - expected.float()).abs().max().item()
        nccl_us = graph_latency_us(nccl, x.clone())  # sums in place, replay after replay: the values grow (timing only)
        peer_us = graph_latency_us(peer, x.clone())
        if rank == 0:
            print(f"{batch:4d} x {hidden}: NCCL {nccl_us:6.1f} us  one-shot symmetric memory {peer_us:6.1f} us  "
                  f"({nccl_us / peer_us:.2f}x)  sums bit-equal to NCCL's: {exact} (largest difference "
                  f"{largest:.3g})", flush=True)
    fused_boundaries(group, peer)
    dist.destroy_process_group()


def fused_boundaries(group: dist.ProcessGroup, peer: PeerAllReduce, layers: int = 32, replays: int = 20) -> None:
    """The fused kernel against one-shot + add_layer_norm: a chain of `layers` x (attention, mlp) boundaries, as
    in a forward (each boundary's output feeds the next; the last one adds without a norm), checked and timed in
    CUDA graphs; then the same with a norm bias, and with one rank late by a random few microseconds before
    some boundaries (a barrier that let a rank overwrite a buffer its peer still reads would show there)."""
    fused = PeerAllReduceNorm(group, torch.device("cuda"), torch.bfloat16, 2 << 20)
    fused.connect()
    for batch, hidden in [(1, 4096), (3, 4096), (64, 4096), (100, 4096), (256, 4096), (16, 6144), (64, 6144)]:
        fused_boundary(group, peer, fused, batch, hidden, layers, replays)
    for batch, hidden in [(1, 4096), (64, 4096)]:
        fused_boundary(group, peer, fused, batch, hidden, layers, replays, with_bias=True, skewed=True)


def fused_boundary(group: dist.ProcessGroup, peer: PeerAllReduce, fused: PeerAllReduceNorm, batch: int,
                   hidden: int, layers: int, replays: int, with_bias: bool = False, skewed: bool = False) -> None:
    """One message size of `fused_boundaries`. At TP2 the results must equal the separate kernels' (the sum of
    two bf16 values rounds the same; the fused kernel sends -0.0 as +0.0, an equal number); beyond, torch's
    kernel rounds after each add and the fused one once, so there the figure is the largest difference."""
    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator(device="cuda").manual_seed(1000 * rank + batch)
    partials = torch.randn(2 * layers, batch, hidden, device="cuda", dtype=torch.bfloat16, generator=generator)
    weight = 1 + 0.1 * torch.randn(hidden, device="cuda", dtype=torch.bfloat16, generator=generator)
    bias = 0.1 * torch.randn(hidden, device="cuda", dtype=torch.bfloat16, generator=generator) if with_bias else None
    dist.broadcast(weight, 0, group=group)  # norms are replicated
    if bias is not None:
        dist.broadcast(bias, 0, group=group)
    start = torch.randn(batch, hidden, device="cuda", dtype=torch.bfloat16)
    dist.broadcast(start, 0, group=group)
    delays = torch.randint(0, 20000, (2 * layers,), generator=torch.Generator().manual_seed(batch)).tolist()

    def chain(boundary):  # type: ignore[no-untyped-def]
        hidden_state = start
        outputs = []
        for index in range(2 * layers):
            if skewed and rank == 1 and index % 3 == 0:
                torch.cuda._sleep(delays[index])  # GPU clock cycles: up to ~10 us
            # the next partial depends on the last output, as a sublayer's GEMM would
            partial = partials[index] + 0.001 * hidden_state
            role = "attention" if index % 2 == 0 else "mlp"
            last = index == 2 * layers - 1
            hidden_state, normed = boundary(role, partial, hidden_state, None if last else weight)
            outputs += [hidden_state] + ([normed] if normed is not None else [])
        return outputs

    def separate(role, partial, residual, norm_weight):  # type: ignore[no-untyped-def]
        reduced = peer(partial)
        if norm_weight is None:
            return residual + reduced, None
        return add_layer_norm(reduced, residual, norm_weight, bias, 1e-5)

    def together(role, partial, residual, norm_weight):  # type: ignore[no-untyped-def]
        return fused(role, partial, residual, norm_weight, bias, 1e-5)

    def difference(a_list, b_list) -> float:  # type: ignore[no-untyped-def]
        return max((a.float() - b.float()).abs().max().item() for a, b in zip(a_list, b_list, strict=True))

    largest = difference(chain(separate), chain(together))
    graphs = {}
    for name, boundary in (("separate", separate), ("fused", together)):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            chain(boundary)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = chain(boundary)
        graphs[name] = (graph, outputs)
    for _ in range(replays):  # both graphs again and again: the fused one must keep giving the same results
        graphs["separate"][0].replay()
        graphs["fused"][0].replay()
        torch.cuda.synchronize()
        largest = max(largest, difference(graphs["separate"][1], graphs["fused"][1]))
    # every rank must hold the same hidden states: compare with rank 0's
    mine = torch.cat([t.flatten().float() for t in graphs["fused"][1]])
    first = mine.clone()
    dist.broadcast(first, 0, group=group)
    ranks_agree = torch.tensor([int(torch.equal(mine, first))], device="cuda")
    dist.all_reduce(ranks_agree, op=dist.ReduceOp.MIN, group=group)
    timings = {}
    for name, (graph, _) in graphs.items():
        dist.barrier(group=group)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
        timings[name] = (time.perf_counter() - started) / (replays * 2 * layers) * 1e6
    worst = torch.tensor([largest], device="cuda")
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    if rank == 0:
        variant = (" with a norm bias" if with_bias else "") + (", one rank late" if skewed else "")
        verdict = (f"equal to the separate kernels: {worst.item() == 0}" if world == 2
                   else f"largest difference from the separate kernels {worst.item():.3g}")
        print(f"{batch:4d} x {hidden}{variant}: one-shot + add_layer_norm {timings['separate']:6.1f} us, fused "
              f"{timings['fused']:6.1f} us per boundary ({timings['separate'] / timings['fused']:.2f}x); {verdict} "
              f"over {replays + 1} runs; every rank holds the same hidden states: {bool(ranks_agree.item())}",
              flush=True)


if __name__ == "__main__":
    main()
