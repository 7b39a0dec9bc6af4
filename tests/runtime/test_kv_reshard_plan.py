"""The resharding plan: every decode rank gets exactly its share, each piece from a prefill rank that holds it."""

from __future__ import annotations

import itertools

import pytest
import torch
from disagg_runtime.kv.reshard import KVSlice, assemble, cut, plan_pulls, share_of
from disagg_runtime.parallel.ranks import Parallelism, ParallelShapeError, kv_head_range, stage_layers

SHAPES = [Parallelism(tp, pp) for tp in range(1, 5) for pp in range(1, 4)]


def _kv_heads_for(tp_values):
    """KV head counts that every tp in `tp_values` can split or replicate (4 covers 1..4; 2 and 1 replicate)."""
    return [h for h in (1, 2, 4) if all(h % t == 0 or t % h == 0 for t in tp_values)]


@pytest.mark.parametrize("num_layers", [6, 7])
def test_every_decode_rank_pulls_exactly_its_share_from_holders(num_layers):
    checked = 0
    for src, dst in itertools.product(SHAPES, SHAPES):
        for heads in _kv_heads_for((src.tp, dst.tp)):
            for dst_rank in range(dst.world):
                share = share_of(dst.rank(dst_rank), num_layers, heads)
                cells: set[tuple[int, int]] = set()
                for pull in plan_pulls(src, dst, dst_rank, num_layers=num_layers, num_kv_heads=heads):
                    held = share_of(src.rank(pull.src_rank), num_layers, heads)
                    assert pull.slice.within(held.layers, held.heads), (src, dst, dst_rank, pull)
                    new = set(itertools.product(pull.slice.layers, pull.slice.heads))
                    assert not cells & new, "a cell is pulled twice"
                    cells |= new
                assert cells == set(itertools.product(share.layers, share.heads)), (src, dst, dst_rank)
                checked += 1
    assert checked > 1000


def test_replicated_heads_spread_over_replicas():
    # 1 KV head on a tp=4 prefill stage: 4 copies; decode tp=2 ranks pull from different copies.
    src, dst = Parallelism(4, 1), Parallelism(2, 1)
    sources = {plan_pulls(src, dst, r, num_layers=2, num_kv_heads=1)[0].src_rank for r in range(2)}
    assert len(sources) == 2
    assert kv_head_range(1, 4, 3) == range(0, 1)


def test_no_decode_rank_of_a_split_instance_pulls_everything():
    for dst in (Parallelism(2, 1), Parallelism(1, 2), Parallelism(2, 2)):
        for r in range(dst.world):
            got = sum(len(p.slice.layers) * len(p.slice.heads)
                      for p in plan_pulls(Parallelism(2, 1), dst, r, num_layers=4, num_kv_heads=2))
            assert got == 4 * 2 // dst.world


def test_shapes_that_do_not_split_are_refused():
    with pytest.raises(ParallelShapeError, match="cannot split 2 layers"):
        stage_layers(2, 3)
    with pytest.raises(ParallelShapeError, match="neither be split"):
        kv_head_range(4, 3, 0)


def test_cut_and_assemble_round_trip():
    gen = torch.Generator().manual_seed(0)
    full_k = [torch.randn(5, 4, 8, generator=gen) for _ in range(6)]
    full_v = [torch.randn(5, 4, 8, generator=gen) for _ in range(6)]
    src, dst = Parallelism(2, 3), Parallelism(4, 2)
    for r in range(dst.world):
        share = share_of(dst.rank(r), 6, 4)
        pieces = []
        for pull in plan_pulls(src, dst, r, num_layers=6, num_kv_heads=4):
            held = share_of(src.rank(pull.src_rank), 6, 4)
            hk = [k[:, held.heads.start:held.heads.stop] for k in full_k[held.layer_start:held.layer_stop]]
            hv = [v[:, held.heads.start:held.heads.stop] for v in full_v[held.layer_start:held.layer_stop]]
            pieces.append((pull.slice, *cut(hk, hv, held, pull.slice)))
        keys, values = assemble(share, pieces, num_tokens=5, head_dim=8, dtype=torch.float32,
                                device=torch.device("cpu"))
        for i, layer in enumerate(share.layers):
            assert torch.equal(keys[i], full_k[layer][:, share.head_start:share.head_stop])
            assert torch.equal(values[i], full_v[layer][:, share.head_start:share.head_stop])
    with pytest.raises(ValueError, match="uncovered"):
        assemble(share, pieces[:-1] if len(pieces) > 1 else [], num_tokens=5, head_dim=8, dtype=torch.float32,
                 device=torch.device("cpu"))
    bad = KVSlice(layer_start=0, layer_stop=6, head_start=0, head_stop=4)
    with pytest.raises(ValueError, match="outside"):
        assemble(share, [(bad, [], [])], num_tokens=5, head_dim=8, dtype=torch.float32, device=torch.device("cpu"))


def test_pipeline_micro_batches_cover_the_step_in_order():
    from disagg_runtime.engine.attention import StepLayout
    from disagg_runtime.parallel.pipeline import split_step

    lens = [5, 1, 7, 3, 2]
    slots = list(range(sum(lens)))
    layout = StepLayout(is_prefill=True, seq_lens=lens, context_lens=lens, block_tables=[[i] for i in range(5)],
                        slot_mapping=slots, block_size=16)
    rows = [4, 5, 12, 15, 17]  # each prompt's last token
    for parts in (1, 2, 3, 5, 9):
        mbs = split_step(layout, rows, parts)
        assert len(mbs) == min(parts, 5)
        assert [n for mb in mbs for n in mb.layout.seq_lens] == lens
        assert [s for mb in mbs for s in mb.layout.slot_mapping] == slots
        assert [mb.tok_start + r for mb in mbs for r in mb.rows] == rows
        assert all(mb.layout.seq_lens for mb in mbs)
