"""Engine parts in isolation, pure CPU and fast: block allocator, paged attention against dense
attention, the stacked LoRA path against the kernels' reference, the scheduler with a fake
adapter source, incremental detokenization."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from loramux.adapters.types import MODULES, AdapterRef, BaseSpec, LoraTables
from loramux.engine.attention import build_metadata, paged_attention_torch, store_kv
from loramux.engine.kv_cache import BlockAllocator
from loramux.engine.lora import LoraMeta, SlotGroup
from loramux.engine.lora_cpu import BGMV_MAX_SEGMENT_ROWS, StackedLora
from loramux.engine.request import SeqStatus, Sequence
from loramux.engine.sampler import SamplingState
from loramux.engine.sampling_params import SamplingParams
from loramux.engine.scheduler import Scheduler
from loramux.kernels.reference import sgmv_expand_ref, sgmv_shrink_ref

# ---------------------------------------------------------------------- block allocator


def test_block_allocator_hands_out_each_block_once() -> None:
    alloc = BlockAllocator(6)
    a, b = alloc.allocate(4), alloc.allocate(2)
    assert sorted(a + b) == list(range(6)) and alloc.num_free == 0
    assert not alloc.can_allocate(1)
    with pytest.raises(RuntimeError):
        alloc.allocate(1)
    alloc.free(a)
    assert alloc.num_free == 4
    with pytest.raises(RuntimeError, match="twice"):
        alloc.free(a[:1])


# ---------------------------------------------------------------------- paged attention


def _dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int,
                     scale: float) -> torch.Tensor:
    """float64 reference: q [Q, nH, D] at positions offset.., k/v [L, nKV, D] -> [Q, nH, D]."""
    groups = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(groups, dim=1)
    v = v.double().repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,lhd->hql", q.double(), k) * scale  # [nH, Q, L]
    i = torch.arange(q.shape[0])[:, None] + offset
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > i, -math.inf)
    return torch.einsum("hql,lhd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("seed", range(4))
def test_paged_attention_matches_dense_attention(seed: int) -> None:
    """Random mixes of decodes, fresh prefills and prefill chunks over shuffled blocks."""
    rng = random.Random(seed)
    heads, kv_heads, dim, block, num_blocks = 6, 2, 8, 4, 64
    k_cache = torch.randn(num_blocks, block, kv_heads, dim)
    v_cache = torch.randn(num_blocks, block, kv_heads, dim)
    free = list(range(num_blocks))
    rng.shuffle(free)
    q_lens, ctx_lens, tables, ks, vs = [], [], [], [], []
    for _ in range(rng.randint(1, 6)):
        kind = rng.choice(["decode", "prefill", "chunk"])
        ctx = rng.randint(1, 30)
        q_len = {"decode": 1, "prefill": ctx, "chunk": rng.randint(1, ctx)}[kind]
        table = [free.pop() for _ in range(-(-ctx // block))]
        k_all, v_all = torch.randn(ctx, kv_heads, dim), torch.randn(ctx, kv_heads, dim)
        for pos in range(ctx - q_len):  # the already cached part of the context
            k_cache[table[pos // block], pos % block] = k_all[pos]
            v_cache[table[pos // block], pos % block] = v_all[pos]
        q_lens.append(q_len)
        ctx_lens.append(ctx)
        tables.append(table)
        ks.append(k_all)
        vs.append(v_all)
    meta = build_metadata(q_lens, ctx_lens, tables, block, torch.device("cpu"), torch_plan=True)
    new_k = torch.cat([k[c - n:] for k, c, n in zip(ks, ctx_lens, q_lens)])
    new_v = torch.cat([v[c - n:] for v, c, n in zip(vs, ctx_lens, q_lens)])
    store_kv(new_k, new_v, k_cache, v_cache, meta.slot_mapping)
    q = torch.randn(sum(q_lens), heads, dim)
    out = paged_attention_torch(q, k_cache, v_cache, meta, 0.3)
    start = 0
    for k, v, c, n in zip(ks, vs, ctx_lens, q_lens):
        ref = _dense_attention(q[start:start + n], k, v, c - n, 0.3)
        torch.testing.assert_close(out[start:start + n].double(), ref, atol=1e-5, rtol=1e-5)
        start += n
    expected_positions = [p for c, n in zip(ctx_lens, q_lens) for p in range(c - n, c)]
    assert meta.positions.tolist() == expected_positions


# ---------------------------------------------------------------------- stacked LoRA


def _random_tables(spec: BaseSpec, slots: int, max_rank: int, gen: torch.Generator
                   ) -> LoraTables:
    """Tables over a flat pool with random ranks (some 0) per (layer, module, slot)."""
    shape = (spec.num_layers, len(MODULES), slots)
    ranks = torch.randint(0, max_rank + 1, shape, generator=gen, dtype=torch.int32)
    ranks[:, :, 0] = 0  # a slot holding nothing
    a_off = torch.zeros(shape, dtype=torch.int64)
    b_off = torch.zeros(shape, dtype=torch.int64)
    cursor = 7  # offsets need not be aligned
    for idx in range(ranks.numel()):
        layer, m, s = (idx // (shape[1] * shape[2]), idx // shape[2] % shape[1], idx % shape[2])
        in_f, out_f = spec.shapes[MODULES[m]]
        r = int(ranks[layer, m, s])
        a_off[layer, m, s] = cursor
        cursor += r * in_f
        b_off[layer, m, s] = cursor
        cursor += r * out_f
    pool = torch.randn(cursor, generator=gen)
    scales = torch.rand(shape, generator=gen) + 0.5
    return LoraTables(pool=pool, a_offsets=a_off, b_offsets=b_off, ranks=ranks, scales=scales,
                      max_rank=max_rank)


def _prepare(lora: StackedLora, meta: LoraMeta, lens: list[int], slots: list[int],
             versions: dict[int, int] | None = None) -> None:
    """Prepare a step of groups (rows, slot) and check the layout the backend chose."""
    groups = [SlotGroup(s, AdapterRef(f"a{s}", (versions or {}).get(s, 1), "x") if s >= 0
                        else None, n) for n, s in zip(lens, slots)]
    order = lora.prepare(groups, meta, None)
    assert sorted(order) == list(range(len(groups)))
    assert [slot for _, _, slot in meta.segments] == [groups[i].slot for i in order]
    assert meta.seg_starts.tolist()[-1] == sum(lens)


def _reference(x: torch.Tensor, out: torch.Tensor, tables: LoraTables, meta: LoraMeta,
               layer: int, m: int) -> torch.Tensor:
    """The kernels' torch reference over the layout in meta."""
    v = torch.full((x.shape[0], tables.max_rank), float("nan"))
    sgmv_shrink_ref(x, tables.pool, tables.a_offsets[layer, m], tables.ranks[layer, m],
                    meta.seg_starts, meta.seg_slots, v)
    ref = out.clone()
    sgmv_expand_ref(v, tables.pool, tables.b_offsets[layer, m], tables.ranks[layer, m],
                    tables.scales[layer, m], meta.seg_starts, meta.seg_slots, ref)
    return ref


DISTRIBUTIONS = ["distinct", "uniform", "mixed", "none", "long"]


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_stacked_lora_matches_the_kernel_reference(distribution: str) -> None:
    gen = torch.Generator().manual_seed(DISTRIBUTIONS.index(distribution))
    spec = BaseSpec(num_layers=2, shapes={"q_proj": (24, 24), "k_proj": (24, 8),
                                          "v_proj": (24, 8), "o_proj": (24, 24),
                                          "gate_proj": (24, 40), "up_proj": (24, 40),
                                          "down_proj": (40, 24)})
    slots, max_rank = 6, 16
    tables = _random_tables(spec, slots, max_rank, gen)
    seg_lens, seg_slots = {
        "distinct": ([1, 1, 1, 1, 1], [1, 2, 3, 4, 5]),
        "uniform": ([3], [2]),
        "mixed": ([2, 1, 7, 1, 3], [-1, 0, 3, 5, 1]),
        "none": ([4], [-1]),
        "long": ([BGMV_MAX_SEGMENT_ROWS + 3, 1, 9], [4, 2, -1]),
    }[distribution]
    lora = StackedLora(tables, spec, max_rows=64, max_segments=8)
    meta = LoraMeta(max_segments=8, max_tokens=64, max_rank=max_rank, device=torch.device("cpu"))
    _prepare(lora, meta, seg_lens, seg_slots)
    total = sum(seg_lens)
    for layer in range(spec.num_layers):
        for m, name in enumerate(MODULES):
            in_f, out_f = spec.shapes[name]
            x = torch.randn(total, in_f, generator=gen)
            base = torch.randn(total, out_f, generator=gen)
            out = base.clone()
            lora.apply(x, out, meta, layer, m)
            torch.testing.assert_close(out, _reference(x, base, tables, meta, layer, m),
                                       atol=1e-5, rtol=1e-5)


def test_stacked_lora_recopies_a_slot_when_its_adapter_changes() -> None:
    gen = torch.Generator().manual_seed(0)
    spec = BaseSpec(num_layers=1, shapes={m: (8, 8) for m in MODULES})
    tables = _random_tables(spec, 3, 4, gen)
    tables.ranks[:, :, 1] = 4
    lora = StackedLora(tables, spec, max_rows=8, max_segments=4)
    meta = LoraMeta(4, 8, 4, torch.device("cpu"))
    x = torch.randn(1, 8, generator=gen)
    _prepare(lora, meta, [1], [1], {1: 1})
    first = torch.zeros(1, 8)
    lora.apply(x, first, meta, 0, 0)
    tables.pool.mul_(2.0)  # the registry paged another adapter into slot 1
    _prepare(lora, meta, [1], [1], {1: 2})
    second = torch.zeros(1, 8)
    lora.apply(x, second, meta, 0, 0)
    torch.testing.assert_close(second, 4.0 * first)  # A and B both doubled


def test_stacked_lora_stays_right_as_batches_change() -> None:
    """Adapters join and leave over many steps (positions reused, buckets compacted, slots
    handed to new adapters, groups of 1 to 80 rows stacked or sent to the kernels): every step
    still equals the kernel reference."""
    gen = torch.Generator().manual_seed(11)
    rng = random.Random(11)
    spec = BaseSpec(num_layers=1, shapes={m: (16, 12) for m in MODULES})
    slots = 12
    tables = _random_tables(spec, slots, 16, gen)
    lora = StackedLora(tables, spec, max_rows=1024, max_segments=16)
    meta = LoraMeta(16, 1024, 16, torch.device("cpu"))
    version = dict.fromkeys(range(slots), 0)
    stacked_long = kernels_long = 0  # steps with a group of > 4 rows on each path
    for _ in range(40):
        if rng.random() < 0.3:  # the registry puts another adapter into some slot
            s = rng.randrange(slots)
            version[s] += 1
            for m in range(len(MODULES)):
                r = int(tables.ranks[0, m, s])
                in_f, out_f = spec.shapes[MODULES[m]]
                off = int(tables.a_offsets[0, m, s])
                tables.pool[off: off + r * (in_f + out_f)].normal_(generator=gen)
        chosen = rng.sample(range(-1, slots), rng.randint(1, 8))
        lengths = [rng.choice([1, 1, 2, 3, 7, 12, 30, 80]) for _ in chosen]
        _prepare(lora, meta, lengths, chosen, version)
        stacked_long += any(p.k > 4 for p in lora.plan.buckets)
        kernels_long += lora.plan.sgmv_slots is not None
        x = torch.randn(sum(lengths), 16, generator=gen)
        for m in range(len(MODULES)):
            out = torch.zeros(sum(lengths), 12)
            lora.apply(x, out, meta, 0, m)
            torch.testing.assert_close(out, _reference(x, torch.zeros_like(out), tables, meta,
                                                       0, m), atol=1e-5, rtol=1e-5)
    assert stacked_long and kernels_long  # both paths were taken by long groups


def test_stacked_lora_stacks_similar_prefills_and_leaves_a_long_one_to_the_kernels() -> None:
    """Multi-row groups go through the stacks while padding them to the longest costs little
    (similar prompt lengths); a group that would pad the others too much goes to the kernels.
    Either way every projection equals the kernel reference."""
    gen = torch.Generator().manual_seed(5)
    spec = BaseSpec(num_layers=1, shapes={m: (16, 12) for m in MODULES})
    tables = _random_tables(spec, 12, 16, gen)
    buckets: dict[int, list[int]] = {}
    for s in range(1, 12):
        buckets.setdefault(1 << (int(tables.ranks[:, :, s].max()) - 1).bit_length(), []).append(s)
    same = max(buckets.values(), key=len)[:6]  # six slots that share a bucket
    assert len(same) == 6
    lora = StackedLora(tables, spec, max_rows=256, max_segments=16)
    meta = LoraMeta(16, 256, 16, torch.device("cpu"))

    def check(lengths: list[int], slots: list[int]) -> None:
        _prepare(lora, meta, lengths, slots)
        x = torch.randn(sum(lengths), 16, generator=gen)
        for m in range(len(MODULES)):
            out = torch.randn(sum(lengths), 12, generator=gen)
            ref = _reference(x, out, tables, meta, 0, m)
            lora.apply(x, out, meta, 0, m)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    check([1] * 6, same)  # decode: all six placed
    check([5, 4, 5, 5], same[:4])  # short prefills: stacked, 2 holes (10 padded rows) kept
    assert lora.plan.sgmv_slots is None
    assert [(p.num_pos, p.k) for p in lora.plan.buckets] == [(6, 5)]
    check([1] * 6, same)
    check([40, 39, 40, 40], same[:4])  # 2 holes would pad 80 rows: compacted
    assert lora.plan.sgmv_slots is None
    assert [(p.num_pos, p.k) for p in lora.plan.buckets] == [(4, 40)]
    check([70, 1, 1, 1], same[2:6])  # 207 padded rows for one long group: that one to kernels
    assert [s for s in lora.plan.sgmv_slots.tolist() if s >= 0] == [same[2]]
    assert [p.k for p in lora.plan.buckets] == [1]
    # groups of 2-4 rows always take the stacks and earn the long one no padding budget
    check([40, 2, 2, 2, 2, 2], same)
    assert [s for s in lora.plan.sgmv_slots.tolist() if s >= 0] == [same[0]]
    assert [p.k for p in lora.plan.buckets] == [2]


def _uniform_tables(spec: BaseSpec, slots: int, rank: int, dtype: torch.dtype,
                    gen: torch.Generator) -> LoraTables:
    """Every slot rank `rank` on every projection, weights ~ N(0, 1/in), in `dtype`."""
    shape = (spec.num_layers, len(MODULES), slots)
    a_off = torch.zeros(shape, dtype=torch.int64)
    b_off = torch.zeros(shape, dtype=torch.int64)
    cursor = 0
    for layer in range(spec.num_layers):
        for m, name in enumerate(MODULES):
            in_f, out_f = spec.shapes[name]
            for s in range(slots):
                a_off[layer, m, s], b_off[layer, m, s] = cursor, cursor + rank * in_f
                cursor += rank * (in_f + out_f)
    pool = (torch.randn(cursor, generator=gen) / spec.shapes["q_proj"][0] ** 0.5).to(dtype)
    return LoraTables(pool=pool, a_offsets=a_off, b_offsets=b_off,
                      ranks=torch.full(shape, rank, dtype=torch.int32),
                      scales=torch.rand(shape, generator=gen) + 0.5, max_rank=rank)


@pytest.mark.parametrize("lengths", [[1, 1, 1, 1], [3, 2, 3, 1], [9, 8, 9, 9]])
def test_stacked_lora_keeps_float32_between_shrink_and_expand_in_bf16(lengths: list[int]) -> None:
    """A bf16 model: shrink, scale and expand in float32, one rounding into the output, as the
    kernels do. Rounding the rank-r intermediate or scale*B to bf16 would double the error."""
    gen = torch.Generator().manual_seed(3)
    hidden, rank = 256, 64
    spec = BaseSpec(num_layers=1, shapes={m: (hidden, hidden) for m in MODULES})
    tables = _uniform_tables(spec, 4, rank, torch.bfloat16, gen)
    lora = StackedLora(tables, spec, max_rows=64, max_segments=8)
    meta = LoraMeta(8, 64, rank, torch.device("cpu"))
    _prepare(lora, meta, lengths, [0, 1, 2, 3])
    x = torch.randn(sum(lengths), hidden, generator=gen).bfloat16()
    truth = torch.zeros(sum(lengths), hidden, dtype=torch.float64)
    for start, end, slot in meta.segments:
        a = tables.pool[int(tables.a_offsets[0, 0, slot]):][:rank * hidden].view(rank, hidden)
        b = tables.pool[int(tables.b_offsets[0, 0, slot]):][:hidden * rank].view(hidden, rank)
        truth[start:end] = float(tables.scales[0, 0, slot]) * (
            x[start:end].double() @ a.double().T @ b.double().T)
    out = torch.zeros(sum(lengths), hidden, dtype=torch.bfloat16)
    lora.apply(x, out, meta, 0, 0)
    error = (out.double() - truth).abs().mean()
    rounding = (truth.bfloat16().double() - truth).abs().mean()  # the least any bf16 output has
    assert error <= 1.25 * rounding


# ---------------------------------------------------------------------- scheduler


@dataclass
class FakeAdapters:
    """An AdapterSource whose adapters become resident after `delay` acquire attempts."""

    delay: dict[str, int] = field(default_factory=dict)
    slots: dict[str, int] = field(default_factory=dict)
    refcount: dict[str, int] = field(default_factory=dict)
    parked: dict[str, int] = field(default_factory=dict)
    closed: set[str] = field(default_factory=set)  # what `yielding` asks back
    tables: LoraTables | None = None

    def resolve(self, name: str) -> AdapterRef:
        return AdapterRef(name, 1, "digest")

    def current(self, name: str) -> AdapterRef | None:
        return AdapterRef(name, 1, "digest")

    def prefetch(self, ref: AdapterRef) -> None:
        pass

    def acquire(self, ref: AdapterRef, *, parked: bool = False) -> int | None:
        if parked:
            assert self.parked.get(ref.name, 0) > 0
        if ref.name in self.closed or self.delay.get(ref.name, 0) > 0:
            if ref.name not in self.closed:
                self.delay[ref.name] -= 1
            return None
        self.refcount[ref.name] = self.refcount.get(ref.name, 0) + 1
        self.parked[ref.name] = self.parked.get(ref.name, 0) - parked
        return self.slots.setdefault(ref.name, len(self.slots))

    def release(self, ref: AdapterRef) -> None:
        assert self.refcount[ref.name] > 0
        self.refcount[ref.name] -= 1

    def yielding(self) -> frozenset[AdapterRef]:
        return frozenset(AdapterRef(n, 1, "digest") for n in self.closed)

    def park(self, ref: AdapterRef) -> None:
        self.release(ref)
        self.parked[ref.name] = self.parked.get(ref.name, 0) + 1

    def unpark(self, ref: AdapterRef) -> None:
        assert self.parked[ref.name] > 0
        self.parked[ref.name] -= 1


def _seq(rid: str, n: int, arrival: int, adapter: str | None = None) -> Sequence:
    params = SamplingParams(max_tokens=50, temperature=0.0)
    return Sequence(request_id=rid, prompt_token_ids=list(range(3, 3 + n)), params=params,
                    adapter=AdapterRef(adapter, 1, "digest") if adapter else None,
                    arrival=arrival, sampling=SamplingState(params))


def _finish_step(sched: Scheduler, token: int = 7) -> None:
    """What the engine does after a step: mark computed, append a token to sampling rows."""
    out = sched.last
    for s in out.scheduled:
        s.seq.num_computed = s.start + s.num_tokens
        if s.samples:
            s.seq.token_ids.append(token)


def _scheduler(blocks: int = 64, seqs: int = 8, tokens: int = 32,
               adapters: FakeAdapters | None = None) -> Scheduler:
    sched = Scheduler(BlockAllocator(blocks), 4, seqs, tokens, adapters or FakeAdapters())
    original = sched.schedule

    def schedule():  # type: ignore[no-untyped-def]
        sched.last = original()
        return sched.last

    sched.schedule = schedule  # type: ignore[method-assign]
    return sched


def test_prefill_and_decode_share_a_step_and_prompts_are_chunked() -> None:
    sched = _scheduler(tokens=10)
    a = _seq("a", 4, 0)
    sched.add(a)
    sched.schedule()
    _finish_step(sched)
    sched.add(_seq("b", 20, 1))
    out = sched.schedule()
    assert [(s.seq.request_id, s.num_tokens, s.samples) for s in out.scheduled] == [
        ("a", 1, True), ("b", 9, False)]  # a decodes while b's prompt is chunked
    _finish_step(sched)
    out = sched.schedule()
    assert [(s.seq.request_id, s.start, s.num_tokens) for s in out.scheduled] == [
        ("a", 5, 1), ("b", 9, 9)]


def test_rows_are_grouped_by_adapter_slot() -> None:
    sched = _scheduler(seqs=16, tokens=200)
    names = ["x", None, "y", "x", None, "y", "z", "x"]
    for i, name in enumerate(names):
        sched.add(_seq(f"r{i}", 3, i, name))
    out = sched.schedule()
    keys = [s.seq.slot_key for s in out.scheduled]
    assert keys == sorted(keys)  # each slot contiguous, -1 (base) first
    assert [s.seq.request_id for s in out.scheduled if s.seq.slot_key == 0] == ["r0", "r3", "r7"]


def test_limits_on_sequences_and_tokens() -> None:
    sched = _scheduler(seqs=3, tokens=12)
    for i in range(6):
        sched.add(_seq(f"r{i}", 5, i))
    out = sched.schedule()
    assert len(out.scheduled) == 3 and out.num_tokens == 12
    assert len(sched.running) == 3


def test_requests_whose_adapter_pages_in_wait_while_others_run() -> None:
    adapters = FakeAdapters(delay={"cold": 3})
    sched = _scheduler(adapters=adapters)
    sched.add(_seq("cold", 3, 0, "cold"))
    sched.add(_seq("hot", 3, 1, "hot"))
    ran: list[list[str]] = []
    for _ in range(5):
        sched.schedule()
        ran.append([s.seq.request_id for s in sched.last.scheduled])
        _finish_step(sched)
    assert ran[0] == ["hot"] and "cold" in ran[3]
    assert sched.stats.adapter_waits == 3


def test_preemption_frees_the_youngest_keeps_its_adapter_and_resumes_it() -> None:
    adapters = FakeAdapters()
    sched = _scheduler(blocks=4, tokens=64, adapters=adapters)  # 16 KV token rows
    old, young = _seq("old", 7, 0, "a"), _seq("young", 7, 1, "a")
    sched.add(old)
    sched.add(young)
    sched.schedule()
    _finish_step(sched)
    assert adapters.refcount["a"] == 2
    for _ in range(4):  # both grow past 8 tokens: 3 blocks each do not fit in 4
        sched.schedule()
        _finish_step(sched)
    assert sched.stats.preemptions >= 1
    assert young.status is SeqStatus.WAITING and young.num_computed == 0
    assert not young.block_table and young.holds_adapter
    assert adapters.refcount["a"] == 2  # the preempted request kept its reference
    sched.finish(old)
    assert adapters.refcount["a"] == 1
    out = sched.schedule()
    resumed = [s for s in out.scheduled if s.seq is young]
    assert resumed and resumed[0].start == 0 and resumed[0].num_tokens == young.num_tokens
    sched.finish(young)
    assert adapters.refcount["a"] == 0 and sched.allocator.num_free == 4


# ---------------------------------------------------------------------- detokenizer


def test_incremental_detokenization_equals_full_decode() -> None:
    from engine_helpers import ToyTokenizer
    from loramux.engine.detokenizer import IncrementalDetokenizer

    tok = ToyTokenizer()
    ids = list(range(3, 200, 7))
    detok = IncrementalDetokenizer(tok, [5, 6, 7])
    text = "".join(detok.add(i) for i in ids) + detok.flush()
    assert text == tok.decode(ids)


def test_incremental_detokenization_with_a_real_tokenizer() -> None:
    from loramux.engine.default_model import default_model_dir, is_converted

    if not is_converted():
        pytest.skip("the default model is not converted yet")
    from loramux.engine.detokenizer import IncrementalDetokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    text = "Héllo wörld — naïve café 🚀 done. 日本語も"
    prompt = tok.encode("Say:")
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces)


def test_dense_attention_reference_is_sdpa() -> None:
    """The float64 reference above agrees with torch's SDPA on a plain causal case."""
    q, k, v = torch.randn(5, 4, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    ref = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                         v.transpose(0, 1), is_causal=True, scale=0.5,
                                         enable_gqa=True).transpose(0, 1)
    torch.testing.assert_close(_dense_attention(q, k, v, 0, 0.5).float(), ref, atol=1e-5,
                               rtol=1e-5)


def test_a_yielded_adapter_parks_its_running_requests_and_they_resume_where_they_were() -> None:
    """The registry asks an adapter back (`yielding`): its running requests give their
    references back before the step, keep their KV blocks and computed tokens, are skipped
    while the adapter is away, and continue from the same position once it is back."""
    adapters = FakeAdapters()
    sched = _scheduler(adapters=adapters)
    hot, other = _seq("hot", 5, 0, "hot"), _seq("other", 5, 1, "other")
    sched.add(hot)
    sched.add(other)
    for _ in range(2):  # prefill, one decode
        sched.schedule()
        _finish_step(sched)
    blocks, computed = list(hot.block_table), hot.num_computed
    adapters.closed = {"hot"}
    out = sched.schedule()
    assert [s.seq.request_id for s in out.scheduled] == ["other"]
    assert hot.parked and not hot.holds_adapter and hot.slot is None
    assert adapters.refcount["hot"] == 0 and adapters.parked["hot"] == 1
    assert hot.block_table == blocks and hot.num_computed == computed and hot in sched.running
    _finish_step(sched)
    sched.schedule()  # still closed: still parked, parked once
    _finish_step(sched)
    assert sched.stats.parks == 1 and adapters.parked["hot"] == 1
    adapters.closed = set()
    out = sched.schedule()
    (resumed,) = [s for s in out.scheduled if s.seq is hot]
    assert (resumed.start, resumed.num_tokens) == (computed, 1)
    assert hot.holds_adapter and not hot.parked and adapters.refcount["hot"] == 1
    assert adapters.parked["hot"] == 0
    _finish_step(sched)
    sched.finish(hot)
    sched.finish(other)
    assert adapters.refcount == {"hot": 0, "other": 0} and sched.allocator.num_free == 64


def test_a_parked_request_that_ends_drops_its_hold() -> None:
    """An aborted (or otherwise finished) parked request gives its parked hold back, so an
    unloaded adapter it kept alive can be freed."""
    adapters = FakeAdapters()
    sched = _scheduler(adapters=adapters)
    seq = _seq("a", 5, 0, "a")
    sched.add(seq)
    sched.schedule()
    _finish_step(sched)
    adapters.closed = {"a"}
    sched.schedule()
    assert seq.parked and adapters.parked["a"] == 1
    sched.remove(seq)
    assert adapters.parked["a"] == 0 and adapters.refcount["a"] == 0 and not seq.parked
    assert sched.allocator.num_free == 64
