"""perf/diag/decode_ncu_variants.py: argument parsing and the report from a saved ncu CSV, run
without a GPU (profiling itself needs one)."""


def test_variants(perf_script):
    tool = perf_script("diag/decode_ncu_variants.py")
    a = tool.parse_args(["out", "--variant", 'dense:0:{"fused_merge": false}',
                         "--variant", "skip0:1e-6:{}"])
    assert a.variants == [("dense", 0.0, {"fused_merge": False}), ("skip0", 1e-6, {})]
    assert (a.batch, a.seqlen, a.heads_q, a.heads_kv, a.page_size) == (1, 8192, 64, 4, 64)


def test_report_groups_launches_by_call(tmp_path, capsys, perf_script):
    """A call is its decode launch plus, unless the merge is fused, its combine launch."""
    tool = perf_script("diag/decode_ncu_variants.py")
    out = tmp_path / "run"
    out.mkdir()
    launches = [  # (kernel name, duration ns, cycles, instructions, DRAM bytes)
        ("kernel_BlasstDecodeSm90_0", 13000.0, 19000.0, 1200000.0, 16.8e6),
        ("kernel_BlasstDecodeCombineSm90_0", 5000.0, 7800.0, 160000.0, 1.1e6),
        ("kernel_BlasstDecodeSm90_1", 25500.0, 39000.0, 1400000.0, 16.9e6),  # fused merge
        ("kernel_BlasstDecodeSm90_2", 12000.0, 18000.0, 1250000.0, 16.8e6),
        ("kernel_BlasstDecodeCombineSm90_0", 4900.0, 7700.0, 160000.0, 1.1e6),
    ]
    lines = ['==PROF== Connected to process 1',
             '"ID","Process ID","Kernel Name","Metric Name","Metric Unit","Metric Value"']
    for i, (name, *vals) in enumerate(launches):
        lines += [f'"{i}","1","{name}","{m}","x","{v:,}"' for m, v in zip(tool.METRICS, vals)]
    (out / "ncu-decode-variants.csv").write_text("\n".join(lines) + "\n")
    (out / "ncu-decode-variants.log").write_text(
        "VARIANT dense bits_equal_first=-\nVARIANT fused bits_equal_first=True\n"
        "VARIANT skip0 bits_equal_first=True\n")
    a = tool.parse_args([str(out), "--report", "--variant", "dense:0:{}",
                         "--variant", 'fused:0:{"fused_merge": true}', "--variant", "skip0:1e-6:{}"])
    tool.report(a, str(out / "ncu-decode-variants.csv"),
                (out / "ncu-decode-variants.log").read_text())
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ") and "---" not in r]
    assert rows[1:] == [
        "| dense | - | decode | 13.00 | 19000 | 1200000 | 16.80 |",
        "| dense | - | combine | 5.00 | 7800 | 160000 | 1.10 |",
        "| fused | True | decode | 25.50 | 39000 | 1400000 | 16.90 |",
        "| skip0 | True | decode | 12.00 | 18000 | 1250000 | 16.80 |",
        "| skip0 | True | combine | 4.90 | 7700 | 160000 | 1.10 |",
    ]
