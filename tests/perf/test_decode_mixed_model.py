"""perf/diag/decode_mixed_model.py: the per-CTA kept tiles add up to the reference's skip counts,
and both workloads (one repeated sequence, different ones) land on the target sparsity."""


def test_kept_per_cta_matches_reference_counts(perf_script):
    import torch

    from blasst_cute.kernels.launch_decode import decode_geometry_sm90
    from blasst_cute.reference import skip_counts
    from blasst_cute.workloads import synthetic_qkv

    model = perf_script("diag/decode_mixed_model.py")
    L, hq, hk = 4096, 8, 2
    geo = decode_geometry_sm90(hq // hk, 1, 64, 1, hk, L, 132)
    assert geo["num_splits"] > 1
    per, tiles, (n_skipped, n_visited) = model.kept_per_cta(
        model.tile_maxima(L, hq, hk, geo, 3), L, 300.0, geo)
    assert per.shape == (hk, geo["num_splits"]) and int(tiles.sum()) == L // geo["block_n"]
    q, k, _ = synthetic_qkv(1, 1, L, hq, hk, model.D, device="cpu", seed=3)
    kw = {kk: geo[kk] for kk in ("block_m", "block_n", "pack_gqa", "order", "num_splits",
                                  "rows_per_decision", "split_tiles", "interleave_splits")}
    vis, skp = skip_counts(q, k, factors=[300.0], causal=True, softmax_scale=model.D ** -0.5, **kw)
    assert int(per.sum()) == int(vis.sum() - skp.sum())
    assert (n_skipped, n_visited) == (float(skp.sum()), float(vis.sum()))
    assert 0 < n_skipped < n_visited
    assert torch.all(per <= tiles[None, :])


def test_rows_reach_the_target(perf_script, monkeypatch, capsys):
    model = perf_script("diag/decode_mixed_model.py")
    monkeypatch.setattr("sys.argv", ["decode_mixed_model.py", "--batch", "40", "--seqlen", "4096",
                                     "--heads-q", "8", "--heads-kv", "2", "--sequences", "2",
                                     "--target", "0.7"])
    model.main()
    rows = [r.split("|") for r in capsys.readouterr().out.strip().splitlines()[-2:]]
    assert [r[1].strip() for r in rows] == ["one, repeated", "2 different"]
    for r in rows:
        assert abs(float(r[3].strip().rstrip("%")) - 70.0) < 5.0


def test_forced_splits(perf_script, monkeypatch, capsys):
    """--splits 2 where the launcher picks 1: the geometry line says 2, the rows still reach the
    target, and against the launcher's (cheaper) dense time the speedup is not larger."""
    model = perf_script("diag/decode_mixed_model.py")
    monkeypatch.setattr("sys.argv", ["decode_mixed_model.py", "--batch", "40", "--seqlen", "4096",
                                     "--heads-q", "8", "--heads-kv", "2", "--sequences", "2",
                                     "--splits", "2"])
    model.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert "2 split(s)" in lines[0]
    for r in (x.split("|") for x in lines[-2:]):
        assert abs(float(r[3].strip().rstrip("%")) - 70.0) < 5.0
        model_speedup, vs_launcher = (float(r[i].strip().rstrip("x")) for i in (5, 7))
        assert 0.5 < vs_launcher <= model_speedup + 0.005
