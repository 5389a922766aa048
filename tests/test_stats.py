"""BlasstStats: sparsities, the sum of two calls' counters, the repr."""

import torch

from blasst_cute import BlasstStats


def _t(values):
    return torch.tensor(values, dtype=torch.int64)


def test_sparsities_and_sum():
    a = BlasstStats(_t([8, 4]), _t([6, 1]), pv_visited=_t([2, 1]), pv_skipped=_t([1, 0]))
    b = BlasstStats(_t([4, 4]), _t([0, 1]), pv_visited=_t([1, 1]), pv_skipped=_t([0, 1]))
    assert a.sparsity == 7 / 12 and a.pv_sparsity == 1 / 3
    c = a + b
    assert c.visited.tolist() == [12, 8] and c.skipped.tolist() == [6, 2]
    assert c.pv_visited.tolist() == [3, 2] and c.pv_skipped.tolist() == [1, 1]
    assert c.v_loaded is None and c.pv_sparsity == 2 / 5
    assert "pv_sparsity=0.4000" in repr(c) and "sparsity=0.4000" in repr(c)


def test_optional_counters_kept_only_when_both_have_them():
    a = BlasstStats(_t([2]), _t([1]), pv_visited=_t([1]), pv_skipped=_t([1]))
    b = BlasstStats(_t([2]), _t([0]), v_loaded=_t([2]))
    c = a + b
    assert c.pv_visited is None and c.pv_sparsity is None and c.v_loaded is None
    assert "pv_" not in repr(c)


def test_nothing_visited_is_zero_sparsity():
    z = BlasstStats(_t([0]), _t([0]), pv_visited=_t([0]), pv_skipped=_t([0]))
    assert z.sparsity == 0.0 and z.pv_sparsity == 0.0
