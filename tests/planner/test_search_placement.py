"""Packing instances onto nodes: TP groups stay inside a node, no GPU is shared, low affinity pairs stages."""

from collections import Counter

from disagg_planner.search.placement import (
    InstanceRequest,
    UnitRequest,
    pack_colocated,
    pack_instances,
    pack_units,
)


def _used(placement):
    return Counter((p.node, g) for p in placement for g in p.gpus)


def test_instances_fill_nodes_without_sharing_gpus_and_keep_tp_aligned():
    reqs = [InstanceRequest("prefill", 2, 2, 3), InstanceRequest("decode", 4, 1, 2), InstanceRequest("decode", 1, 1, 0)]
    placement = pack_instances(reqs, nodes=3, gpus_per_node=8)
    assert placement is not None
    assert max(_used(placement).values()) == 1
    assert len(_used(placement)) == 3 * 2 * 2 + 2 * 4
    for p in placement:
        tp = len(p.gpus)
        assert p.gpus == list(range(p.gpus[0], p.gpus[0] + tp)) and p.gpus[0] % tp == 0
    stages = Counter((p.phase, p.instance) for p in placement)
    assert stages == {("prefill", i): 2 for i in range(3)} | {("decode", i): 1 for i in range(2)}


def test_an_instance_that_fits_a_node_stays_on_it():
    placement = pack_instances([InstanceRequest("prefill", 2, 4, 2)], nodes=2, gpus_per_node=8)
    for i in range(2):
        assert len({p.node for p in placement if p.instance == i}) == 1


def test_large_instances_span_nodes_by_whole_tp_groups():
    placement = pack_instances([InstanceRequest("decode", 8, 3, 1)], nodes=3, gpus_per_node=8)
    assert sorted(p.node for p in placement) == [0, 1, 2]
    assert all(len(p.gpus) == 8 for p in placement)


def test_too_large_returns_none():
    assert pack_instances([InstanceRequest("prefill", 4, 1, 5)], nodes=2, gpus_per_node=8) is None
    assert pack_instances([InstanceRequest("prefill", 16, 1, 1)], nodes=4, gpus_per_node=8) is None
    # 3 GPUs free on each of two nodes cannot hold a tp=4 group even though 6 >= 4
    assert pack_instances([InstanceRequest("prefill", 1, 5, 2), InstanceRequest("decode", 4, 1, 1)],
                          nodes=2, gpus_per_node=8) is not None
    assert pack_colocated(2, 1, 9, nodes=2, gpus_per_node=8) is None


def test_low_affinity_units_put_same_stage_segments_on_one_node():
    placement = pack_units(UnitRequest(prefill_tp=2, decode_tp=4, pp=3, count=2), nodes=6, gpus_per_node=8)
    assert placement is not None
    assert max(_used(placement).values()) == 1
    for unit in range(2):
        for stage in range(3):
            pre = [p for p in placement if p.phase == "prefill" and p.instance == unit and p.stage == stage]
            dec = [p for p in placement if p.phase == "decode" and p.instance == unit and p.stage == stage]
            assert len(pre) == len(dec) == 1 and pre[0].node == dec[0].node
            assert len(pre[0].gpus) == 2 and len(dec[0].gpus) == 4
    assert pack_units(UnitRequest(4, 8, 1, 1), nodes=4, gpus_per_node=8) is None


def test_units_that_leave_unusable_gaps_do_not_pack():
    # six 6-GPU stage blocks need six 8-GPU nodes: the 2-GPU gaps left on each cannot host another block
    assert pack_units(UnitRequest(prefill_tp=2, decode_tp=4, pp=3, count=2), nodes=5, gpus_per_node=8) is None
