"""Latency of one TP all-reduce inside a CUDA graph: NCCL vs the engine's symmetric-memory path (PeerAllReduce).

    python3 -m torch.distributed.run --nproc-per-node 2 bench/tp_allreduce_gpu.py

Each size is a decode step's message (batch x hidden, bf16). A graph of 64 all-reduces is replayed 50 times;
the figure is the mean time of one all-reduce. The sums are compared with NCCL's.
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
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
