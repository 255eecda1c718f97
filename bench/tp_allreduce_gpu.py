"""Latency of one TP all-reduce inside a CUDA graph: NCCL vs the engine's symmetric-memory path (PeerAllReduce).

    python3 -m torch.distributed.run --nproc-per-node 2 bench/tp_allreduce_gpu.py

Each size is a decode step's message (batch x hidden, bf16). A graph of 64 all-reduces is replayed 50 times;
the figure is the mean time of one all-reduce. The sums are checked against NCCL's.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from generator.engine.distributed import PeerAllReduce  # noqa: E402


def graph_latency_us(reduce, tensor: torch.Tensor, nodes: int = 64, replays: int = 50) -> float:
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
    peer = PeerAllReduce(group, torch.device("cuda"), torch.bfloat16, 4 << 20)
    if rank == 0:
        print(f"torch {torch.__version__}, {dist.get_world_size()} x {torch.cuda.get_device_name()}")
    for batch, hidden in [(1, 4096), (8, 4096), (64, 4096), (256, 4096), (1, 7168), (64, 7168)]:
        x = torch.randn(batch, hidden, device="cuda", dtype=torch.bfloat16) * (rank + 1)
        expected = x.clone()
        dist.all_reduce(expected, group=group)
        got = peer(x.clone())
        exact = torch.equal(got, expected)
        close = torch.allclose(got.float(), expected.float(), rtol=1e-2, atol=1e-2)
        nccl = graph_latency_us(lambda t: dist.all_reduce(t, group=group), x.clone())
        symm = graph_latency_us(peer, x.clone())
        if rank == 0:
            print(f"{batch:4d} x {hidden}: NCCL {nccl:6.1f} us  symmetric memory {symm:6.1f} us  "
                  f"({nccl / symm:.2f}x)  sums equal: {exact}, close: {close}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
