"""perf/diag/prefill_ncu_variants.py: argument parsing, the tile count and the report from a saved
ncu CSV run without a GPU (profiling itself needs one)."""


def test_variants_and_tile_count(perf_script):
    tool = perf_script("diag/prefill_ncu_variants.py")
    a = tool.parse_args(["out", "--seqlen", "512", "--batch", "2", "--variant", "dense:0:{}",
                         "--variant", 'nopv:1e-30:{"pv_skip": false, "v_load_skip": false}'])
    assert a.variants == [("dense", 0.0, {}), ("nopv", 1e-30, {"pv_skip": False, "v_load_skip": False})]
    # 4 x 4 tiles of 128 x 128 per (batch, head), 8 consumer warps per q-tile
    assert tool.tiles_per_consumer_warp(a, 128, 128, 8) == 16 * 2 * 32 * 8
    a.causal = True  # q-tile i sees i + 1 key tiles
    assert tool.tiles_per_consumer_warp(a, 128, 128, 8) == 10 * 2 * 32 * 8


def test_report_from_saved_csv(tmp_path, capsys, perf_script):
    tool = perf_script("diag/prefill_ncu_variants.py")
    out = tmp_path / "run"
    out.mkdir()
    values = {0: (1000.0, 2000.0, 4096.0 * 8, 80.0, 1.5), 1: (1100.0, 2200.0, 4096.0 * 9, 75.0, 2.0)}
    names = [*tool.METRICS, "extra.metric"]
    lines = ['==PROF== Connected to process 1',
             '"ID","Process ID","Kernel Name","Metric Name","Metric Unit","Metric Value"']
    for i, vals in values.items():
        lines += [f'"{i}","1","k","{n}","x","{v:,}"' for n, v in zip(names, vals)]
    (out / "ncu-variants.csv").write_text("\n".join(lines) + "\n")
    (out / "ncu-variants.log").write_text("VARIANT dense sparsity=- bits_equal_first=-\n"
                                          "VARIANT skip sparsity=0.5000 bits_equal_first=True\n")
    a = tool.parse_args([str(out), "--seqlen", "256", "--batch", "1", "--heads-q", "1",
                         "--extra-metrics", "extra.metric", "--report",
                         "--variant", "dense:0:{}", "--variant", "skip:1e-30:{}"])
    tool.report(a, str(out / "ncu-variants.csv"), (out / "ncu-variants.log").read_text())
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| skip")]
    # 2 x 2 tiles, 8 consumer warps: 36864 instructions / 32 warp-tiles; cycles 2200 / 2000
    assert rows == ["| skip | 0.5000 | True | 1 | 0.002 | 1.1000 | 1152.0 | 75.0 | 2.00 |"]
