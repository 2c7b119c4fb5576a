"""Paged attention over the flat token batch: metadata built once per step, used by every layer.

The engine's runner fills the metadata's tensors in place, in buffers allocated once
(engine/graphs.py `StepInputs`), so a CUDA graph can replay a decode step; `build_metadata`
builds fresh tensors from lists (tests, the Triton attention's own tests).

Backend contract (a Triton implementation in engine/triton_attention.py takes the same
arguments and reads only the device fields of `AttentionMetadata`):

    paged_attention(q [T, nH, D], k_cache [NB, bs, nKV, D], v_cache [NB, bs, nKV, D],
                    meta, scale) -> [T, nH, D]

Sequence b of the step owns query rows query_start_loc[b] .. query_start_loc[b+1]-1; its
context is context_lens[b] tokens (those already cached plus this step's), cached in blocks
block_tables[b, :]; query row i of b sits at position context_lens[b] - query_len_b + i and
attends causally to positions 0..that position. The step's own K/V are written first
(`store_kv`), so a prefill attends to itself through the cache like a decode does.

The torch path (CPU) splits the step in two: all decode rows (one query each) as one padded
batch, and each prefill (or prefill chunk) on its own with a causal mask, so a long prefill
never pads the decodes to its length. Its gather indices and masks are precomputed in
`TorchAttentionPlan` once per step, not per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DecodeGroup:
    """Every sequence of the step with exactly one query row, padded to the longest context."""

    rows: torch.Tensor | None  # int64 [Bd] flat query rows; None: rows 0..T-1 in order (all)
    ctx_index: torch.Tensor  # int64 [Bd * Lmax] flat cache rows of each context; pad: row 0
    # (row 0 of block 0, the KV cache's all-zero null block: masked, but finite)
    mask: torch.Tensor | None  # bool [Bd, 1, 1, Lmax] True = attend; None: no padding
    num_seqs: int
    max_len: int


@dataclass(frozen=True)
class PrefillSeq:
    """One sequence with several query rows (a prompt, a prompt chunk, or a recompute)."""

    start: int  # its query rows are start .. end-1
    end: int
    ctx_index: torch.Tensor  # int64 [L] flat cache rows of positions 0..L-1
    mask: torch.Tensor | None  # bool [Q, L] causal with offset L - Q; None when Q == L


@dataclass(frozen=True)
class TorchAttentionPlan:
    decode: DecodeGroup | None
    prefills: tuple[PrefillSeq, ...]


@dataclass(frozen=True)
class AttentionMetadata:
    """One step's attention inputs. Invariants: query_start_loc[-1] == T == slot_mapping.numel();
    context_lens[b] >= query_len_b >= 1; block_tables[b] covers context_lens[b] positions."""

    positions: torch.Tensor  # int64 [T] position of each new token in its sequence
    slot_mapping: torch.Tensor  # int64 [T] flat cache row (block * bs + offset) of each new token
    query_start_loc: torch.Tensor  # int32 [B+1]
    context_lens: torch.Tensor  # int32 [B]
    block_tables: torch.Tensor  # int32 [B, max_blocks], unused entries 0
    max_query_len: int
    max_context_len: int
    plan: TorchAttentionPlan | None = None  # only for the torch backend


def build_metadata(query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
                   block_size: int, device: torch.device, torch_plan: bool) -> AttentionMetadata:
    """Metadata for sequences in batch order (query_lens[b] new tokens, context_lens[b] total)."""
    num_seqs = len(query_lens)
    max_blocks = max(len(t) for t in block_tables)
    table = torch.zeros(num_seqs, max_blocks, dtype=torch.int64)  # [B, max_blocks]
    for b, blocks in enumerate(block_tables):
        table[b, :len(blocks)] = torch.tensor(blocks, dtype=torch.int64)
    q_lens = torch.tensor(query_lens, dtype=torch.int64)  # [B]
    ctx_lens = torch.tensor(context_lens, dtype=torch.int64)  # [B]
    starts = torch.zeros(num_seqs + 1, dtype=torch.int64)
    torch.cumsum(q_lens, 0, out=starts[1:])
    # Position of every new token, then its cache row through the block table.
    seq_of_row = torch.repeat_interleave(torch.arange(num_seqs), q_lens)  # [T]
    positions = (torch.arange(int(starts[-1])) - starts[:-1][seq_of_row]
                 + (ctx_lens - q_lens)[seq_of_row])  # [T]
    slot_mapping = (table[seq_of_row, positions // block_size] * block_size
                    + positions % block_size)  # [T]
    plan = (build_torch_plan(query_lens, context_lens, table, ctx_lens, block_size)
            if torch_plan else None)
    return AttentionMetadata(
        positions=positions.to(device),
        slot_mapping=slot_mapping.to(device),
        query_start_loc=starts.to(torch.int32).to(device),
        context_lens=ctx_lens.to(torch.int32).to(device),
        block_tables=table.to(torch.int32).to(device),
        max_query_len=max(query_lens),
        max_context_len=max(context_lens),
        plan=None if plan is None else plan_to_device(plan, device),
    )


def _cache_rows(table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Flat cache rows of positions 0..length-1 for block tables table [B, max_blocks] -> [B, length]."""
    pos = torch.arange(length)  # [length]
    return table[:, pos // block_size] * block_size + pos % block_size


def build_torch_plan(query_lens: list[int], context_lens: list[int], table: torch.Tensor,
                     ctx_lens: torch.Tensor, block_size: int) -> TorchAttentionPlan:
    """The torch path's gather indices and masks for sequences in batch order, on the CPU:
    table [B, >= max blocks] block tables, ctx_lens [B] (context_lens as a tensor)."""
    decode_seqs = [b for b, n in enumerate(query_lens) if n == 1]
    decode: DecodeGroup | None = None
    if decode_seqs:
        idx = torch.tensor(decode_seqs, dtype=torch.int64)
        lens = ctx_lens[idx]  # [Bd]
        max_len = int(lens.max())
        pos = torch.arange(max_len)
        valid = pos[None, :] < lens[:, None]  # [Bd, Lmax]
        rows = torch.where(valid, _cache_rows(table[idx], max_len, block_size), 0)
        all_rows = len(decode_seqs) == len(query_lens)
        starts = torch.tensor([0, *query_lens], dtype=torch.int64).cumsum(0)
        decode = DecodeGroup(
            rows=None if all_rows else starts[idx],
            ctx_index=rows.reshape(-1),
            mask=None if bool(valid.all()) else valid[:, None, None, :],
            num_seqs=len(decode_seqs),
            max_len=max_len,
        )
    prefills = []
    start = 0
    for b, (q_len, ctx_len) in enumerate(zip(query_lens, context_lens)):
        if q_len > 1:
            mask = None
            if ctx_len != q_len:
                i = torch.arange(q_len)[:, None]
                j = torch.arange(ctx_len)[None, :]
                mask = j <= i + (ctx_len - q_len)  # [Q, L]
            rows = _cache_rows(table[b:b + 1], ctx_len, block_size)[0]
            prefills.append(PrefillSeq(start=start, end=start + q_len, ctx_index=rows, mask=mask))
        start += q_len
    return TorchAttentionPlan(decode=decode, prefills=tuple(prefills))


def plan_to_device(plan: TorchAttentionPlan, device: torch.device) -> TorchAttentionPlan:
    """The plan's tensors on `device` (the same plan on the CPU)."""
    if device.type == "cpu":
        return plan
    d = plan.decode
    decode = None if d is None else DecodeGroup(
        rows=None if d.rows is None else d.rows.to(device), ctx_index=d.ctx_index.to(device),
        mask=None if d.mask is None else d.mask.to(device), num_seqs=d.num_seqs,
        max_len=d.max_len)
    prefills = tuple(PrefillSeq(p.start, p.end, p.ctx_index.to(device),
                                None if p.mask is None else p.mask.to(device))
                     for p in plan.prefills)
    return TorchAttentionPlan(decode=decode, prefills=prefills)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k_cache.flat[slot_mapping[t]] = k[t] (and v): k, v [T, nKV, D]; caches [NB, bs, nKV, D]."""
    num_kv, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv, head_dim).index_copy_(0, slot_mapping, v)


def paged_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v per sequence, GQA by head groups.

    q [T, nH, D]; k_cache, v_cache [NB, bs, nKV, D]; returns [T, nH, D].
    """
    plan = meta.plan
    assert plan is not None, "the torch attention path needs metadata built with torch_plan"
    num_kv, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_flat = k_cache.view(-1, num_kv, head_dim)  # [NB*bs, nKV, D]
    v_flat = v_cache.view(-1, num_kv, head_dim)
    d = plan.decode
    if d is not None and d.rows is None:  # a pure decode step: no scatter of the result
        return _decode(q, k_flat, v_flat, d, scale)
    out = torch.empty_like(q)  # [T, nH, D]
    if d is not None:
        assert d.rows is not None
        out.index_copy_(0, d.rows, _decode(q.index_select(0, d.rows), k_flat, v_flat, d, scale))
    for p in plan.prefills:
        k = k_flat.index_select(0, p.ctx_index).transpose(0, 1)  # [nKV, L, D]
        v = v_flat.index_select(0, p.ctx_index).transpose(0, 1)
        qs = q[p.start:p.end].transpose(0, 1)  # [nH, Q, D]
        o = F.scaled_dot_product_attention(qs, k, v, attn_mask=p.mask, is_causal=p.mask is None,
                                           scale=scale, enable_gqa=True)  # [nH, Q, D]
        out[p.start:p.end] = o.transpose(0, 1)
    return out


def _decode(q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, d: DecodeGroup,
            scale: float) -> torch.Tensor:
    """One query per sequence: q [Bd, nH, D] -> [Bd, nH, D]."""
    num_kv, head_dim = k_flat.shape[1], k_flat.shape[2]
    shape = (d.num_seqs, d.max_len, num_kv, head_dim)
    k = k_flat.index_select(0, d.ctx_index).view(shape).transpose(1, 2)  # [Bd, nKV, Lmax, D]
    v = v_flat.index_select(0, d.ctx_index).view(shape).transpose(1, 2)
    o = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=d.mask, scale=scale,
                                       enable_gqa=True)  # [Bd, nH, 1, D]
    return o.squeeze(2)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """The default backend: the torch path. The runner picks a backend once at load."""
    return paged_attention_torch(q, k_cache, v_cache, meta, scale)
