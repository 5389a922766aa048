"""perf/diag/mla_sparse_model.py reads the reference's decisions per CTA: they must add up to the
reference's own skip counts for the MLA kernel's geometry."""


def test_kept_per_cta_matches_reference_counts(perf_script):
    from blasst_cute.kernels.launch_mla import mla_decode_geometry_sm90
    from blasst_cute.reference import skip_counts
    from blasst_cute.workloads import synthetic_qkv

    model = perf_script("diag/mla_sparse_model.py")
    H, L, D = 128, 2048, 576
    q, k, _ = synthetic_qkv(1, 1, L, H, 1, D, device="cpu", seed=3)
    geo = mla_decode_geometry_sm90(H, 1, 64, 1, L, 132)
    assert geo["num_splits"] > 1  # several splits, dealt round-robin
    per, tiles, (n_skipped, n_visited) = model.kept_per_cta(model.tile_maxima(q, k, geo), 300.0,
                                                             geo)
    sp = n_skipped / n_visited
    assert per.shape == (H // 64, geo["num_splits"])
    assert int(tiles.sum()) == L // 64
    kw = {kk: geo[kk] for kk in ("block_m", "block_n", "pack_gqa", "order", "num_splits",
                                  "rows_per_decision", "split_tiles", "interleave_splits")}
    vis, skp = skip_counts(q, k, factors=[300.0], causal=True, softmax_scale=D ** -0.5, **kw)
    assert int(per.sum()) == int(vis.sum() - skp.sum())
    assert (n_skipped, n_visited) == (float(skp.sum()), float(vis.sum()))
    assert 0.0 < sp < 1.0


def test_makespan_is_a_list_schedule(perf_script):
    model = perf_script("diag/mla_sparse_model.py")
    assert model.makespan([3.0, 1.0, 1.0, 1.0], 2) == 3.0
    assert model.makespan([1.0] * 5, 2) == 3.0


def test_different_sequences_set_the_slowest_cta(perf_script, monkeypatch, capsys):
    """--sequences N deals N different sequences over the batch; the row names them, and the
    slowest CTA keeps at least as large a share as with one sequence repeated."""
    model = perf_script("diag/mla_sparse_model.py")
    rows = {}
    for extra in ([], ["--sequences", "3"]):
        monkeypatch.setattr("sys.argv", ["mla_sparse_model.py", "--shapes", "6x2048",
                                         "--splits", "1"] + extra)
        model.main()
        rows[bool(extra)] = capsys.readouterr().out.strip().splitlines()[-1].split("|")
    assert rows[False][3].strip() == "one, repeated"
    assert rows[True][3].strip() == "3 different"
    worst = {k: float(v[8].strip().rstrip("%")) for k, v in rows.items()}
    assert worst[True] >= worst[False]
    for v in rows.values():
        assert abs(float(v[7].strip().rstrip("%")) - 70.0) < 5.0  # bisected to the target
