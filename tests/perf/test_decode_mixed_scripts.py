"""perf/decode_mixed.py and perf/decode_split_sweep.py (GPU scripts): they import without a GPU,
and their fixed inputs are sane."""


def test_decode_mixed_factor_grid(perf_script):
    mod = perf_script("decode_mixed.py")
    grid = mod.GRID
    assert grid[0] == 1.0 and grid[-1] > 1e5
    assert all(b > a for a, b in zip(grid, grid[1:]))
    # 6 points a decade: neighbours within ~1.5x, so some point lands near each target sparsity
    assert max(b / a for a, b in zip(grid, grid[1:])) < 1.5


def test_split_sweep_default_shapes(perf_script):
    mod = perf_script("decode_split_sweep.py")
    for shape in mod.DEFAULT_SHAPES:
        B, L, hq, hk = (int(x) for x in shape.split(","))
        assert B >= 1 and L % 128 == 0 and hq % hk == 0
