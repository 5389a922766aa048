"""perf/diag/ncu_source_stalls.py on a small synthetic ncu source-page CSV (no GPU)."""

import csv

HEADER = ["Address", "Source", "Warp Stall Sampling (All Samples)",
          "Warp Stall Sampling (Not-issued Samples)", "Instructions Executed", "stall_wait",
          "stall_barrier", "stall_wait (Not Issued)"]


def _write(path):
    base = 0x7F0000000000
    rows = [("MOV R1, c[0x0][0x28]", 5, 1, 5, 0)]  # prologue
    loop = [("UIADD3 UR4, UR5, 0x1, URZ", 10, 8, 10, 0)]
    loop += [(f"HGMMA.64x128x16.F32.BF16 R24, gdesc[UR{8 + i}], R24", 20, 8, 20, 0) for i in range(16)]
    loop += [("WARPGROUP.DEPBAR.LE gsb0, 0x1", 300, 8, 0, 300), ("MUFU.EX2 R24, R24", 100, 8, 100, 0)]
    rows += loop
    rows.append((f"@P0 BRA {base + 0x10:#x}", 5, 8, 5, 0))  # back edge to the loop's first instruction
    rows.append(("EXIT", 1, 1, 1, 0))
    with open(path, "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        w.writerow(["Kernel Name", "k"])
        w.writerow(HEADER)
        for i, (src, samples, executed, wait, barrier) in enumerate(rows):
            w.writerow([f"{base + 0x10 * i:#x}", f"      {src}", samples, samples, executed, wait,
                        barrier, 0])


def test_main_loop_and_report(tmp_path, capsys, perf_script):
    tool = perf_script("diag/ncu_source_stalls.py")
    path = tmp_path / "k.csv"
    _write(path)
    ins = tool.load(str(path))
    loop = tool.main_loop(ins)
    assert loop[0]["off"] == 0x10 and "BRA" in loop[-1]["src"] and len(loop) == 20
    tool.report(str(path), 0.05)
    out = capsys.readouterr().out
    total = 5 + 10 + 16 * 20 + 300 + 100 + 5 + 1
    assert f"loop 0x10-0x140 (20 instructions), {100 * 735 / total:.1f} % of {total} samples" in out
    assert f"WARPGROUP {100 * 300 / 735:.1f}" in out and "barrier" in out
    assert "DEPBAR" in out and "MOV R1" not in out
    tool.report(str(path), 0.05, (0x10, 0x20))  # an explicit range
    assert "loop 0x10-0x20 (2 instructions)" in capsys.readouterr().out
