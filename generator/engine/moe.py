"""Mixture-of-experts MLP without host synchronization: routing, grouping and expert GEMMs stay on the device.

Every shape depends only on the number of tokens, never on how they are routed, so one layer launches the same
kernels every step and can be captured in a CUDA graph. Three ways to run one rank's experts:

- `grouped`: the (token, choice) pairs sorted by expert on the device (argsort + searchsorted, no bincount:
  CUDA's bincount syncs to size its output), then two `torch._grouped_mm` calls over the rank's experts.
  Float weights only.
- `dense`: every local expert runs on every token, and the routing weights (zero for experts not chosen)
  scale the activations before the down projection: fc is one GEMM over the experts side by side, proj a
  batched GEMM summed over experts. Fixed shapes, any dtype, any device; weight-only experts run this way.
  It costs experts / top_k times the FLOPs, which is free while decode is bound by reading the weights.
- `gather`: int8 weight-only experts when there are fewer (token, choice) pairs than local experts (decode
  at small batch): each pair's row is multiplied by its own expert's int8 weight (a Triton kernel on CUDA,
  `triton_w8a16.w8a16_gather_mm`), so only the chosen experts' weights are read.
- `loop`: the reference (the engine's old code): one host sync per layer, a Python loop over experts.

Routing follows DBRX: float32 softmax over all experts, top-k, then the chosen weights divided by their p-norm.
Choices of experts held by other ranks (expert parallelism) get weight zero here; the caller's all-reduce
adds the other ranks' shares.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from generator.engine.weight_only import QuantizedExperts, triton_available

METHOD_ENV = "GEN_REPO_MOE_KERNEL"  # "grouped", "dense", "gather" or "loop" overrides the automatic choice
METHODS = ("grouped", "dense", "gather", "loop")
_DENSE_CHUNK = 256


@dataclass
class Experts:
    """One rank's experts of one layer: fc rows are [up; gate] per expert, F = this rank's FFN share."""

    first: int                                   # global index of the first local expert (expert parallelism)
    count: int                                   # local experts
    fc: torch.Tensor | None = None               # float [E, 2F, d]
    proj: torch.Tensor | None = None             # float [E, d, F]
    fc_quantized: QuantizedExperts | None = None    # one linear: every expert's fc side by side [E * 2F, d]
    proj_quantized: QuantizedExperts | None = None  # one linear per expert [d, F]

    @property
    def quantized(self) -> bool:
        return self.fc_quantized is not None


def route(tokens: torch.Tensor, router: torch.Tensor, top_k: int, normalize_p: float | None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 softmax router -> (weights `[N, k]` in tokens' dtype, expert ids `[N, k]` long)."""
    probs = torch.softmax(F.linear(tokens.float(), router.float()), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if normalize_p is not None:
        weights = weights / torch.norm(weights, p=normalize_p, dim=-1, keepdim=True)
    return weights.to(tokens.dtype), experts


def grouped_mm_supported(tokens: torch.Tensor, experts: Experts) -> bool:
    """Whether `torch._grouped_mm` can take these operands (float weights; CUDA: bf16 and 16-byte rows)."""
    if experts.quantized or not hasattr(torch, "_grouped_mm") or experts.fc is None:
        return False
    if tokens.device.type == "cuda":
        d, hidden = tokens.shape[-1], experts.fc.shape[1] // 2
        return tokens.dtype == torch.bfloat16 and d % 8 == 0 and hidden % 8 == 0
    return tokens.dtype in (torch.float32, torch.bfloat16)


def gather_supported(tokens: torch.Tensor, experts: Experts) -> bool:
    """int8 expert stacks; on CUDA only with Triton (the torch fallback copies each pair's expert weight)."""
    return (experts.fc_quantized is not None and experts.fc_quantized.stack is not None
            and experts.proj_quantized is not None and experts.proj_quantized.stack is not None
            and (not tokens.is_cuda or triton_available()))


def choose_method(tokens: torch.Tensor, chosen: torch.Tensor, experts: Experts) -> str:
    forced = os.environ.get(METHOD_ENV)
    supported = {"grouped": grouped_mm_supported(tokens, experts), "gather": gather_supported(tokens, experts),
                 "dense": True, "loop": not experts.quantized}
    if forced in METHODS and supported[forced]:
        return forced
    if supported["gather"] and chosen.numel() < experts.count:
        return "gather"
    return "grouped" if supported["grouped"] else "dense"


def moe_forward(tokens: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, experts: Experts,
                method: str | None = None) -> torch.Tensor:
    """This rank's share of the MoE MLP for `tokens [N, d]` (to be summed over ranks)."""
    method = method or choose_method(tokens, chosen, experts)
    if method == "grouped":
        return _grouped(tokens, weights, chosen, experts)
    if method == "gather":
        return _gather(tokens, weights, chosen, experts)
    if method == "dense":
        return _dense(tokens, weights, chosen, experts)
    return _loop(tokens, weights, chosen, experts)


def _local_choices(chosen: torch.Tensor, experts: Experts) -> torch.Tensor:
    """Local expert index of each choice; `experts.count` for choices another rank holds."""
    local = chosen - experts.first
    inside = (local >= 0) & (local < experts.count)
    return torch.where(inside, local, experts.count)


def _grouped(tokens: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, experts: Experts) -> torch.Tensor:
    assert experts.fc is not None and experts.proj is not None
    rows, top_k = chosen.shape
    keys = _local_choices(chosen, experts).flatten()        # [P = N * k]
    order = torch.argsort(keys, stable=True)
    sorted_keys = keys[order]
    bounds = torch.arange(1, experts.count + 1, device=keys.device, dtype=keys.dtype)
    offsets = torch.searchsorted(sorted_keys, bounds, out_int32=True)  # end of each expert's rows
    token_rows = order // top_k
    hidden = torch._grouped_mm(tokens[token_rows], experts.fc.transpose(-2, -1), offs=offsets)
    up, gate = hidden.chunk(2, dim=-1)
    out = torch._grouped_mm(F.silu(gate) * up, experts.proj.transpose(-2, -1), offs=offsets)
    # rows past the last offset (other ranks' choices) are never written by the kernel: mask, don't scale
    scaled = torch.where((sorted_keys < experts.count)[:, None], out * weights.flatten()[order, None], 0)
    unsorted = torch.empty_like(scaled)
    unsorted[order] = scaled
    return unsorted.view(rows, top_k, -1).sum(dim=1)


def _dense(tokens: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, experts: Experts) -> torch.Tensor:
    if tokens.shape[0] > _DENSE_CHUNK:  # bound the [rows, experts, 2F] intermediate of a long prompt
        return torch.cat([_dense(tokens[i:i + _DENSE_CHUNK], weights[i:i + _DENSE_CHUNK],
                                 chosen[i:i + _DENSE_CHUNK], experts)
                          for i in range(0, tokens.shape[0], _DENSE_CHUNK)])
    rows = tokens.shape[0]
    count = experts.count
    # routing weight of every (token, local expert): zero where not chosen; column `count` soaks up the rest
    gates = torch.zeros(rows, count + 1, dtype=tokens.dtype, device=tokens.device)
    gates = gates.scatter(1, _local_choices(chosen, experts), weights)[:, :count]
    if experts.fc_quantized is not None:
        hidden = experts.fc_quantized.linears[0](tokens)
    else:
        assert experts.fc is not None
        hidden = F.linear(tokens, experts.fc.reshape(-1, experts.fc.shape[-1]))
    hidden = hidden.view(rows, count, 2, -1)                 # [N, E, up/gate, F]
    act = F.silu(hidden[:, :, 1]) * hidden[:, :, 0] * gates[..., None]
    if experts.proj_quantized is not None:
        projections = experts.proj_quantized.linears
        out = projections[0](act[:, 0])
        for index in range(1, count):
            out = out + projections[index](act[:, index])
        return out
    assert experts.proj is not None
    return torch.bmm(act.transpose(0, 1), experts.proj.transpose(1, 2)).sum(dim=0)


def _gather_mm(rows: torch.Tensor, stack: torch.Tensor, scales: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Row p: `rows[p] @ stack[ids[p]].T * scales[ids[p]]`, zero for ids past the last expert."""
    if rows.is_cuda and triton_available():
        from generator.engine.triton_w8a16 import w8a16_gather_mm

        return w8a16_gather_mm(rows.contiguous(), stack, scales, ids)
    count = stack.shape[0]
    valid = ids < count
    safe = torch.where(valid, ids, 0)
    out = torch.bmm(rows[:, None, :], stack[safe].transpose(1, 2).to(rows.dtype))[:, 0] * scales[safe]
    return torch.where(valid[:, None], out, 0)


def _gather(tokens: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, experts: Experts) -> torch.Tensor:
    assert experts.fc_quantized is not None and experts.proj_quantized is not None
    fc, fc_scales = experts.fc_quantized.stack, experts.fc_quantized.scales
    proj, proj_scales = experts.proj_quantized.stack, experts.proj_quantized.scales
    assert fc is not None and fc_scales is not None and proj is not None and proj_scales is not None
    rows, top_k = chosen.shape
    ids = _local_choices(chosen, experts).flatten()                   # pair p is token p // k
    hidden = _gather_mm(tokens.repeat_interleave(top_k, dim=0), fc, fc_scales, ids)
    hidden = hidden.view(rows * top_k, 2, -1)
    act = F.silu(hidden[:, 1]) * hidden[:, 0]
    out = _gather_mm(act, proj, proj_scales, ids) * weights.reshape(-1, 1)
    return out.view(rows, top_k, -1).sum(dim=1)


def _loop(tokens: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, experts: Experts) -> torch.Tensor:
    """The reference: one host sync per layer (`bincount().tolist()`), one pair of GEMMs per expert."""
    assert experts.fc is not None and experts.proj is not None
    top_k = chosen.shape[1]
    flat = chosen.flatten()
    order = torch.argsort(flat, stable=True)
    total = experts.first + experts.count
    counts = torch.bincount(flat, minlength=total).tolist()
    starts = [sum(counts[:e]) for e in range(len(counts))]
    out = torch.zeros_like(tokens)
    for index in range(experts.count):
        count = counts[experts.first + index]
        if count == 0:
            continue
        picked = order[starts[experts.first + index]:starts[experts.first + index] + count]
        token_rows, slot = picked // top_k, picked % top_k
        up, gate = F.linear(tokens[token_rows], experts.fc[index]).chunk(2, dim=-1)
        expert_out = F.linear(F.silu(gate) * up, experts.proj[index])
        out.index_add_(0, token_rows, expert_out * weights[token_rows, slot, None])
    return out
