"""Autograd-aware communication over the context-parallel (CP) group.

=======================  ===========================================  =========================================
function                 forward                                      backward
=======================  ===========================================  =========================================
``gather_sequence``      all-gather every rank's pieces, global order  reduce-scatter: each rank gets the summed
                                                                       gradient of its own pieces
``all_reduce_sum``       all-reduce (sum)                             all-reduce (sum)
``extend_with_halos``    point-to-point: each piece receives the keys  the halo gradients go back to their owners
                         just before/after it from their owners        and are added there
=======================  ===========================================  =========================================

Tensors are ``(B, H, N, ...)`` with the sequence on ``dim=2`` unless a function says otherwise. Every
collective is recorded in ``comm_stats`` (sends as ``send``, receives as ``recv``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_ls.parallel import state
from megatron_ls.parallel.comm_stats import record_collective
from megatron_ls.parallel.cp_layout import ContextLayout


def _group():
    return state.get_context_parallel_group()


def _global_rank(cp_rank: int) -> int:
    return state.get_context_parallel_ranks()[cp_rank]


def _to_global_order(parts: List[torch.Tensor], layout: ContextLayout, dim: int) -> torch.Tensor:
    """Concatenate every rank's local tensor (local order = its pieces) into global piece order."""
    p = layout.piece_length
    by_piece: Dict[int, torch.Tensor] = {}
    for r, t in enumerate(parts):
        for j, piece in enumerate(layout.pieces_of(r)):
            by_piece[piece] = t.narrow(dim, j * p, p)
    return torch.cat([by_piece[i] for i in range(layout.num_pieces_total)], dim=dim)


def _to_rank_order(full: torch.Tensor, layout: ContextLayout, dim: int) -> List[torch.Tensor]:
    """Inverse of :func:`_to_global_order`: each rank's pieces of a global tensor, in its local order."""
    p = layout.piece_length
    return [torch.cat([full.narrow(dim, i * p, p) for i in layout.pieces_of(r)], dim=dim).contiguous()
            for r in range(layout.cp)]


def gather_sequence_no_grad(x: torch.Tensor, layout: ContextLayout, dim: int = 2, direction: str = "forward"
                            ) -> torch.Tensor:
    """All-gather a local sequence tensor into global order (no autograd; also for masks)."""
    x = x.contiguous()
    is_bool = x.dtype == torch.bool
    if is_bool:  # gloo has no bool collectives
        x = x.to(torch.uint8)
    record_collective("all_gather", direction, x)
    parts = [torch.empty_like(x) for _ in range(layout.cp)]
    dist.all_gather(parts, x, group=_group())
    out = _to_global_order(parts, layout, dim)
    return out.bool() if is_bool else out


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, layout: ContextLayout, dim: int) -> torch.Tensor:  # type: ignore[override]
        ctx.layout, ctx.dim = layout, dim
        return gather_sequence_no_grad(x, layout, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        parts = _to_rank_order(grad, ctx.layout, ctx.dim)
        out = torch.empty_like(parts[0])
        for t in parts:  # the payload this rank hands in is the whole gradient
            record_collective("reduce_scatter", "backward", t)
        dist.reduce_scatter(out, parts, group=_group())
        return out, None, None


def gather_sequence(x: torch.Tensor, layout: ContextLayout, dim: int = 2) -> torch.Tensor:
    """All-gather this rank's part of a sequence into the full sequence (global order); reduce-scatter back."""
    if layout.cp == 1:
        return x
    return _GatherSequence.apply(x, layout, dim)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = x.clone(memory_format=torch.contiguous_format)
        record_collective("all_reduce", "forward", out)
        dist.all_reduce(out, group=_group())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = grad.clone(memory_format=torch.contiguous_format)
        record_collective("all_reduce", "backward", out)
        dist.all_reduce(out, group=_group())
        return out


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the CP group; the gradient of every rank's input is the summed output gradient."""
    if state.get_context_parallel_world_size() == 1:
        return x
    return _AllReduceSum.apply(x)


def all_reduce_max_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Element-wise max over the CP group (no autograd: used for softmax shifts, which carry no gradient)."""
    out = x.detach().clone(memory_format=torch.contiguous_format)
    if state.get_context_parallel_world_size() > 1:
        record_collective("all_reduce", "forward", out)
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=_group())
    return out


# --------------------------------------------------------------------------------------------------- halos
@dataclass(frozen=True)
class HaloSegment:
    """``length`` tokens that rank ``owner`` sends from its local offset ``src`` to rank ``requester``, where
    they land at offset ``dst`` of the requester's halo buffer."""

    requester: int
    owner: int
    src: int
    dst: int
    length: int


@dataclass(frozen=True)
class HaloPlan:
    """Where each piece's halo comes from. Halo buffer of a rank: for each of its pieces, left then right."""

    layout: ContextLayout
    left: int  # tokens wanted before each piece
    right: int  # tokens wanted after each piece
    sizes: Tuple[Tuple[Tuple[int, int], ...], ...]  # per rank, per piece: (left length, right length)
    segments: Tuple[HaloSegment, ...]

    def buffer_length(self, rank: int) -> int:
        return sum(a + b for a, b in self.sizes[rank])

    def local_halos(self, rank: int) -> List[Tuple[int, int, int]]:
        """Per piece of ``rank``: (offset in the halo buffer, left length, right length)."""
        out, off = [], 0
        for a, b in self.sizes[rank]:
            out.append((off, a, b))
            off += a + b
        return out


def build_halo_plan(layout: ContextLayout, left: int, right: int) -> HaloPlan:
    """Every rank computes the same plan: for each piece, the ``left`` tokens before it and the ``right`` tokens
    after it (clipped to the sequence), split by the pieces that own them."""
    n, p = layout.seq_length, layout.piece_length
    sizes, segments = [], []
    for r in range(layout.cp):
        per_piece, off = [], 0
        for start, length in layout.pieces(r):
            ranges = [(max(0, start - left), start), (start + length, min(n, start + length + right))]
            per_piece.append(tuple(b - a for a, b in ranges))
            for a, b in ranges:
                pos = a
                while pos < b:  # split the range at piece boundaries: each part has one owner
                    piece = pos // p
                    end = min(b, (piece + 1) * p)
                    owner, j = layout.piece_owner(piece)
                    segments.append(HaloSegment(r, owner, j * p + pos - piece * p, off + pos - a, end - pos))
                    pos = end
                off += b - a
        sizes.append(tuple(per_piece))
    return HaloPlan(layout, left, right, tuple(sizes), tuple(segments))


def _p2p(sends: Dict[int, torch.Tensor], recv_shapes: Dict[int, Tuple[int, ...]], like: torch.Tensor,
         direction: str) -> Dict[int, torch.Tensor]:
    """Send one tensor to each CP rank in ``sends`` and receive one from each in ``recv_shapes``."""
    ops, received = [], {}
    for src, shape in sorted(recv_shapes.items()):
        buf = like.new_empty(shape)
        received[src] = buf
        record_collective("recv", direction, buf)
        ops.append(dist.P2POp(dist.irecv, buf, _global_rank(src), group=_group()))
    for dst, t in sorted(sends.items()):
        record_collective("send", direction, t)
        ops.append(dist.P2POp(dist.isend, t, _global_rank(dst), group=_group()))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return received


def _move_segments(src: torch.Tensor, dst: torch.Tensor, plan: HaloPlan, backward: bool) -> torch.Tensor:
    """Move every halo segment between its owner and its requester, reading ``src`` and writing ``dst``.

    Forward: owners read their local tokens (``src`` offsets) and requesters copy into their halo buffer
    (``dst`` offsets). Backward: requesters read halo gradients and owners add them to their tokens' gradients.
    Segments between pieces of the same rank are moved without a message.
    """
    me = plan.layout.rank
    sender = (lambda s: s.requester) if backward else (lambda s: s.owner)
    receiver = (lambda s: s.owner) if backward else (lambda s: s.requester)
    read_at = (lambda s: s.dst) if backward else (lambda s: s.src)
    write_at = (lambda s: s.src) if backward else (lambda s: s.dst)
    outgoing: Dict[int, List[HaloSegment]] = {}
    incoming: Dict[int, List[HaloSegment]] = {}
    for s in plan.segments:
        if sender(s) == me and receiver(s) == me:
            piece = src.narrow(2, read_at(s), s.length)
            target = dst.narrow(2, write_at(s), s.length)
            target.add_(piece) if backward else target.copy_(piece)
        elif sender(s) == me:
            outgoing.setdefault(receiver(s), []).append(s)
        elif receiver(s) == me:
            incoming.setdefault(sender(s), []).append(s)
    sends = {peer: torch.cat([src.narrow(2, read_at(s), s.length) for s in segs], dim=2).contiguous()
             for peer, segs in outgoing.items()}
    recv_shapes = {}
    for peer, segs in incoming.items():
        shape = list(dst.shape)
        shape[2] = sum(s.length for s in segs)
        recv_shapes[peer] = tuple(shape)
    received = _p2p(sends, recv_shapes, src, "backward" if backward else "forward")
    for peer, segs in incoming.items():
        off = 0
        for s in segs:
            piece = received[peer].narrow(2, off, s.length)
            target = dst.narrow(2, write_at(s), s.length)
            target.add_(piece) if backward else target.copy_(piece)
            off += s.length
    return dst


def _halo_forward(x: torch.Tensor, plan: HaloPlan) -> torch.Tensor:
    """This rank's halo buffer filled from the owners' local tensors ``x`` (B, H, n_local, ...)."""
    shape = list(x.shape)
    shape[2] = plan.buffer_length(plan.layout.rank)
    return _move_segments(x, x.new_zeros(shape), plan, backward=False)


def _halo_backward(grad_halo: torch.Tensor, plan: HaloPlan, local_shape: torch.Size) -> torch.Tensor:
    """Gradient of this rank's local tokens from every rank's halo gradients."""
    return _move_segments(grad_halo, grad_halo.new_zeros(local_shape), plan, backward=True)


def _interleave(x: torch.Tensor, halo: torch.Tensor, plan: HaloPlan) -> torch.Tensor:
    """Per piece: [left halo ; the piece's own tokens ; right halo], pieces in local order."""
    p, parts = plan.layout.piece_length, []
    for j, (off, a, b) in enumerate(plan.local_halos(plan.layout.rank)):
        parts += [halo.narrow(2, off, a), x.narrow(2, j * p, p), halo.narrow(2, off + a, b)]
    return torch.cat(parts, dim=2)


def _deinterleave(ext: torch.Tensor, plan: HaloPlan) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`_interleave`: (own tokens, halo buffer)."""
    p, own, halo, pos = plan.layout.piece_length, [], [], 0
    for _, a, b in plan.local_halos(plan.layout.rank):
        halo.append(ext.narrow(2, pos, a))
        own.append(ext.narrow(2, pos + a, p))
        halo.append(ext.narrow(2, pos + a + p, b))
        pos += a + p + b
    return torch.cat(own, dim=2), torch.cat(halo, dim=2)


class _ExtendWithHalos(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: HaloPlan) -> torch.Tensor:  # type: ignore[override]
        ctx.plan, ctx.shape = plan, x.shape
        x = x.contiguous()
        return _interleave(x, _halo_forward(x, plan), plan)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        own, halo = _deinterleave(grad, ctx.plan)
        dx = _halo_backward(halo.contiguous(), ctx.plan, ctx.shape)
        return dx.add_(own), None


def extend_with_halos(x: torch.Tensor, plan: HaloPlan) -> torch.Tensor:
    """Every local piece of ``x`` (B, H, n_local, ...) framed by its halos received from their owners:
    ``(B, H, Σ (left + piece + right), ...)``; :meth:`HaloPlan.local_halos` gives the lengths. Always part of
    the graph, so every rank joins the backward exchange even when its own halos are empty."""
    return _ExtendWithHalos.apply(x, plan)


def extend_with_halos_no_grad(x: torch.Tensor, plan: HaloPlan) -> torch.Tensor:
    """The same for tensors without gradients (padding masks, e.g. ``(B, 1, n_local, 1)`` bool)."""
    is_bool = x.dtype == torch.bool
    x = (x.to(torch.uint8) if is_bool else x).contiguous()
    y = _interleave(x, _halo_forward(x, plan), plan)
    return y.bool() if is_bool else y
