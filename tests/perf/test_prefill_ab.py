"""perf/ab/prefill_ab.py: the per-round ratio summary (no GPU needed)."""

import pytest


def test_paired_ratio(perf_script):
    tool = perf_script("ab/prefill_ab.py")
    dense = [10.0, 12.0, 11.0, 10.0, 20.0]
    skip = [10.5, 12.0, 11.5, 10.2, 20.0]
    med, q1, q3 = tool.paired_ratio(dense, skip)
    ratios = sorted(d / s for d, s in zip(dense, skip))
    assert med == pytest.approx(ratios[2])
    assert q1 <= med <= q3
    assert q1 >= ratios[0] and q3 <= ratios[-1]
    assert tool.paired_ratio([2.0], [4.0]) == (0.5, 0.5, 0.5)
