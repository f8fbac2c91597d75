"""The tools/ scripts: the profile readers kernel_time.py (device time per step from Nsight Compute's
per-launch metrics), ncu_lines.py (a profile's instructions by source line) and sass_lines.py
(a build's instructions by source line, and what a change moved), on small hand-made reports in
the formats those tools read."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
if str(TOOLS) not in sys.path:
    sys.path.append(str(TOOLS))

import kernel_time  # noqa: E402
import ncu_lines  # noqa: E402
import sass_lines  # noqa: E402

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
          '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')


def _ncu_csv(path, launches):
    """An `ncu --csv --metrics ...` log: one row per (launch, metric), ncu's own lines between."""
    rows = ["==PROF== Connected to process 1", HEADER]
    for i, (ns, inst, unit) in enumerate(launches):
        metrics = (("gpu__time_duration.sum", ns, unit), ("smsp__inst_executed.sum", inst, "inst"))
        for name, value, u in metrics:
            rows.append(f'"{i}","1","python3","h","void k<>(P)","1","7","(128, 1, 1)","(8, 1, 1)","0",'
                        f'"9.0","Command line profiler metrics","{name}","{u}","{value:,}"')
    rows.append("==PROF== Disconnected from process 1")
    path.write_text("\n".join(rows) + "\n")


def test_kernel_time_takes_the_slope_of_the_median_launches(tmp_path, capsys):
    warm, timed = kernel_time.WARMUP, kernel_time.CALLS
    t1, t2 = kernel_time.STEPS
    launches, order = [], []
    cases = (("simple 256 0.1 1 float16", 1.5, 20.0), ("gru 256 0.1 8 float16", 2.0, 9.0))
    for case, us_per_step, fixed in cases:
        for steps in (t1, t2):
            order.append({"case": case, "steps": steps, "launches": warm + timed})
            us = fixed + us_per_step * steps
            # warm-up launches far off (compilation), the timed ones around `us`, one outlier
            launches += [(int(us * 1e3 * 50), 10, "nsecond")] * warm
            launches += [(int(us * 1e3) + d, 1000 + 64 * steps, "nsecond") for d in (0, 40, -40, 20)]
            launches += [(int(us * 1e3 * 3), 1000 + 64 * steps, "nsecond")][:timed - 4]
    _ncu_csv(tmp_path / "k.csv", launches)
    (tmp_path / "m.json").write_text(json.dumps(order))
    rows = {r["case"]: r for r in kernel_time.summarize(tmp_path / "k.csv", tmp_path / "m.json")}
    assert rows["simple 256 0.1 1 float16"]["us_per_step"] == pytest.approx(1.5, abs=1e-3)
    assert rows["gru 256 0.1 8 float16"]["us_per_step"] == pytest.approx(2.0, abs=1e-3)
    assert rows["gru 256 0.1 8 float16"]["inst_per_step"] == pytest.approx(64)
    assert "1.500 µs/step" in capsys.readouterr().out


def test_kernel_time_reads_scaled_units_and_refuses_a_short_report(tmp_path):
    order = [{"case": "c", "steps": s, "launches": kernel_time.WARMUP + kernel_time.CALLS}
             for s in kernel_time.STEPS]
    (tmp_path / "m.json").write_text(json.dumps(order))
    n = kernel_time.WARMUP + kernel_time.CALLS
    launches = [(100, 1, "usecond")] * n + [(400, 1, "usecond")] * n
    _ncu_csv(tmp_path / "k.csv", launches)
    (row,) = kernel_time.summarize(tmp_path / "k.csv", tmp_path / "m.json")
    t1, t2 = kernel_time.STEPS
    assert row["us_per_step"] == pytest.approx(300 / (t2 - t1))
    _ncu_csv(tmp_path / "short.csv", launches[:-1])
    with pytest.raises(SystemExit, match="expects"):
        kernel_time.summarize(tmp_path / "short.csv", tmp_path / "m.json")
    # launches past the manifest (a case cut off by the time limit) are left out
    _ncu_csv(tmp_path / "long.csv", launches + [(999, 1, "usecond")] * 3)
    assert kernel_time.summarize(tmp_path / "long.csv", tmp_path / "m.json") == [row]
    _ncu_csv(tmp_path / "odd.csv", [(100, 1, "cycle")] * n)
    with pytest.raises(ValueError, match="unknown unit 'cycle'"):
        kernel_time.launches(tmp_path / "odd.csv")


def test_kernel_time_summarizes_runs_in_chunks_and_skips_a_run_that_lost_its_launches(tmp_path, capsys):
    # tools/gpu_check.sh runs the cases a few at a time, one Nsight Compute process each: a run
    # that crashed (no launches, or no manifest) loses its own cases only, and the exit says so.
    n = kernel_time.WARMUP + kernel_time.CALLS
    for i, case in enumerate(("a", "b", "c")):
        order = [{"case": case, "steps": s, "launches": n} for s in kernel_time.STEPS]
        (tmp_path / f"m{i}.json").write_text(json.dumps(order))
        us = 100 * (i + 1)
        _ncu_csv(tmp_path / f"k{i}.csv", [(us, 1, "usecond")] * n + [(4 * us, 1, "usecond")] * n)
    _ncu_csv(tmp_path / "k1.csv", [])  # the second run's ncu crashed
    (tmp_path / "m2.json").unlink()  # the third finished no case
    csvs = [str(tmp_path / f"k{i}.csv") for i in range(3)]
    manifests = [str(tmp_path / f"m{i}.json") for i in range(3)]
    with pytest.raises(SystemExit, match="2 of 3 runs summarized nothing"):
        kernel_time.main(["summarize", *csvs, "--manifest", *manifests, "--json", str(tmp_path / "o.json")])
    (row,) = json.loads((tmp_path / "o.json").read_text())
    t1, t2 = kernel_time.STEPS
    assert row["case"] == "a" and row["us_per_step"] == pytest.approx(300 / (t2 - t1))
    err = capsys.readouterr().err
    assert "0 kernel launches" in err and "no manifest" in err
    kernel_time.main(["summarize", csvs[0], "--manifest", manifests[0]])  # one run, as before
    with pytest.raises(SystemExit):  # a CSV without its manifest
        kernel_time.main(["summarize", *csvs[:2], "--manifest", manifests[0]])


KERNEL = ("void jax_sprnn::cuda::sprnn_persistent_kernel<jax_sprnn::cuda::PersistentConfig<"
          "(jax_sprnn::cuda::Direction)0, __half, (int)1, (int)8, (bool)0, (int)1, (bool)0>>"
          "(jax_sprnn::cuda::PersistentParams)")
MANGLED = ("_ZN9jax_sprnn4cuda23sprnn_persistent_kernelINS0_16PersistentConfigILNS0_9DirectionE0E6"
           "__halfLi1ELi8ELb0ELi1ELb0EEEEEvNS0_16PersistentParamsE")


def _sass(path, instructions):
    """nvdisasm -gi output: each instruction after its inlining chain, innermost line first."""
    out = [f"\t.section\t.text.{MANGLED},\"ax\",@progbits", f".text.{MANGLED}:"]
    for offset, (chain, text) in enumerate(instructions):
        for i, (f, line) in enumerate(chain):
            outer = chain[i + 1] if i + 1 < len(chain) else None
            tail = f' inlined at "/src/{outer[0]}", line {outer[1]}' if outer else ""
            out.append(f'\t//## File "/src/{f}", line {line}{tail}')
        out.append(f"        /*{offset * 16:04x}*/                   {text} ;")
    out.append("\t.section\t.text.other,\"ax\",@progbits")
    path.write_text("\n".join(out) + "\n")


def _profile(path, rows):
    lines = [f'"Kernel Name","{KERNEL}",',
             '"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed"']
    for offset, (text, stalls, executed) in enumerate(rows):
        lines.append(f'"0x{0x7f0000 + 16 * offset:x}","      {text}","{stalls}","{executed}"')
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")


def test_ncu_lines_counts_each_instruction_at_its_line_of_the_body(tmp_path, capsys):
    body = ("persistent_kernel.cuh", 1600)
    kernel_line = ("persistent_kernel.cuh", 1800)
    call_site = ("persistent_kernel.cuh", 1748)  # a lambda of the body, called from the body
    _sass(tmp_path / "k.sass", [
        ([("persistent_kernel.cuh", 700), body, call_site, kernel_line], "FFMA R1, R2, R3, R1"),
        ([("sprnn_common.h", 25), ("persistent_kernel.cuh", 1650), kernel_line], "MUFU.TANH R4, R1"),
        ([body, kernel_line], "@P0 BRA 0x10"),
    ])
    _profile(tmp_path / "p.csv.gz", [("FFMA R1, R2, R3, R1", 6, 800), ("MUFU.TANH R4, R1", 2, 400),
                                     ("@P0 BRA 0x7f0000", 2, 800)])
    ncu_lines.main([str(tmp_path / "p.csv.gz"), str(tmp_path / "k.sass"), "--per", "8",
                    "--body", "persistent_kernel.cuh:1346-1790"])
    out = capsys.readouterr().out
    assert "250.0 instructions executed" in out
    assert "    1600     200.0  80.0%" in out  # the FFMA and the branch, at their body line
    assert "    1650      50.0  20.0%" in out
    assert "sprnn_common.h:25      50.0  20.0%" in out


def test_ncu_lines_finds_the_kernel_body_in_the_source(tmp_path):
    source = tmp_path / "persistent_kernel.cuh"
    source.write_text("template <class Cfg>\n__device__ void persistent_body(const P& p) {\n"
                      "  if (x) {\n  }\n}\n\n__global__ void k() {\n}\n")
    assert ncu_lines.body_lines(source) == "persistent_kernel.cuh:2-5"


def test_ncu_lines_refuses_a_profile_of_another_build(tmp_path):
    chain = [("persistent_kernel.cuh", 1600), ("persistent_kernel.cuh", 1800)]
    _sass(tmp_path / "k.sass", [(chain, "FFMA R1, R2, R3, R1"), (chain, "EXIT")])
    _profile(tmp_path / "p.csv.gz", [("FFMA R1, R2, R3, R1", 1, 32), ("IADD3 R1, R1, 1, RZ", 0, 32)])
    with pytest.raises(SystemExit, match="not the same build"):
        ncu_lines.main([str(tmp_path / "p.csv.gz"), str(tmp_path / "k.sass")])


def test_sass_lines_counts_each_instruction_once_and_diffs_two_builds(tmp_path, capsys):
    body, kernel_line = ("persistent_kernel.cuh", 1600), ("persistent_kernel.cuh", 1800)
    gather = [("persistent_kernel.cuh", 560), ("persistent_kernel.cuh", 1642), kernel_line]
    old = [(gather, "LDS R1, [R2]"), (gather, "FFMA R3, R1, R4, R3"), ([body, kernel_line], "BAR.SYNC 0x0"),
           ([kernel_line], "EXIT")]
    _sass(tmp_path / "old.sass", old)
    _sass(tmp_path / "new.sass", old[:2] + [(gather, "FFMA R3, R1, R5, R3")] + old[3:])
    sass_lines.main([str(tmp_path / "new.sass"), "--body", "persistent_kernel.cuh:1346-1790"])
    out = capsys.readouterr().out
    assert "4 instructions, 3 in the body" in out and "    1642      3" in out
    sass_lines.main([str(tmp_path / "new.sass"), "--against", str(tmp_path / "old.sass"),
                     "--body", "persistent_kernel.cuh:1346-1790"])
    out = capsys.readouterr().out
    assert "    1642      2 ->      3 (+1)" in out and "    1600      1 ->      0 (-1)" in out
    with pytest.raises(SystemExit, match="0 persistent kernels match"):
        sass_lines.main([str(tmp_path / "new.sass"), "--kernel", "Li4ELi8E"])


def test_a_kernel_time_case_packs_for_fewer_sms_and_cost_fit_reads_its_row(tmp_path):
    """`ctas=N` packs the case on at most N CTAs (the cluster suite's nN layouts); the summary
    carries the layout that ran, and benchmarks.cost_fit turns its cluster-mode rows into points."""
    import profile_case

    from benchmarks import cost_fit
    from jax_sprnn import planner

    rows = []
    for ctas in (2, 8):
        w, _ = profile_case.case_call("simple", 96, 0.2, 3, "float16", 4, ctas)
        assert 1 <= w.meta.num_ctas <= ctas
        rows.append(dict(case=f"simple 96 0.2 3 float16 ctas={ctas}", cell="simple", hidden=96,
                         batch=3, dtype="float16", K=w.meta.slots_per_lane, ctas=w.meta.num_ctas,
                         warps_per_cta=w.meta.warps_per_cta, exchange="cluster", us_per_step=1.5))
    w, _ = profile_case.case_call("gru", 32, 0.2, 2, "float32", 4, 3)
    assert w.meta.num_ctas <= 3 and w.meta.gates == 3
    rows.append(dict(rows[0], cell="gru", K=32, ctas=w.meta.num_ctas, warps_per_cta=w.meta.warps_per_cta))
    rows.append(dict(rows[0], exchange="grid"))  # (grid mode's rows are not the cluster estimate's)
    rows.append(dict(rows[0], cell="bidir"))  # (nor a paired launch's)
    (tmp_path / "kt.json").write_text(json.dumps(rows))
    points = list(cost_fit.points([tmp_path / "kt.json"]))
    assert [(p[2], p[3].num_ctas, p[3].gates, p[4], p[5]) for p in points] == [
        (f"kt n{r['ctas']}", r["ctas"], gates, 3, 1.5) for r, gates in zip(rows[:3], (1, 1, 3))]
    assert points[2][3].reg_slots in dict(planner.H200.thread_limits("float16", 3))  # a gated tier
    for bad in (["ctas=0"], ["sms=4"], ["ctas=x"], ["k=-1"], ["plan=0"]):
        with pytest.raises(SystemExit, match="ctas=N, k=K or plan=B"):
            profile_case.parse_options(bad)
    with pytest.raises(SystemExit, match="k=5: the kernels take K in"):
        profile_case.parse_options(["k=5"])
    assert profile_case.parse_options([]) == {}
    # k=K holds the planner to K slots a lane, alone or with ctas=N
    for options in (["k=32"], ["ctas=1", "k=32"], ["k=8", "ctas=4"]):
        k = profile_case.parse_options(options)["k"]
        w, _ = profile_case.option_call("simple", 96, 0.2, 3, "float16", 4, options)
        assert w.meta.slots_per_lane == k and w.meta_t.slots_per_lane == k
    w, _ = profile_case.option_call("simple", 96, 0.2, 3, "float16", 4, [])
    assert w.meta.slots_per_lane != 32  # (the planner's own pick, after the patch is undone)
    with pytest.raises(SystemExit, match="not 'bidir'"):
        profile_case.case_call("bidir", 32, 0.2, 2, "float32", 4, 2)
    # plan=B packs the layout planned for a batch of B (H=1024, 10%, fp16: the grid layout at B=1)
    for cell in ("simple", "lstm"):
        planned, _ = profile_case.option_call(cell, 256, 0.1, 2, "float16", 4, ["plan=8"])
        assert planned.meta.reason.endswith("planned for batch 8"), planned.meta.reason
    planned, _ = profile_case.option_call("simple", 1024, 0.1, 2, "float16", 4, ["plan=1"])
    default, _ = profile_case.option_call("simple", 1024, 0.1, 2, "float16", 4, [])
    assert planned.meta.num_ctas != default.meta.num_ctas
    with pytest.raises(SystemExit, match="not 'bidir'"):
        profile_case.option_call("bidir", 32, 0.2, 2, "float32", 4, ["plan=4"])


def test_a_backward_kernel_time_case_runs_the_backward_recurrence_alone():
    """simple_bwd / lstm_bwd / gru_bwd: one call of the cell's backward primitive on the layer's
    transposed layout (ctas= and plan= as for the forward cases), equal to its XLA scan; and they
    stay out of cost_fit's forward points."""
    import profile_case

    from benchmarks import cost_fit
    from jax_sprnn import fallback, testing

    w, f = profile_case.option_call("simple_bwd", 48, 0.3, 3, "float32", 5, ["ctas=2"])
    assert w.meta.num_ctas <= 2
    dx, dh0 = f()
    want_dx, want_dh0 = fallback.backward(*profile_case.simple_backward_args(w, 3, "float32", 5),
                                          activation="tanh", reverse=False, meta=w.meta_t)
    assert testing.rel_err(dx, want_dx) < 1e-5 and testing.rel_err(dh0, want_dh0) < 1e-5
    assert dx.shape == (5, 3, 48) and float(abs(dx).max()) > 0
    for cell, gates in (("lstm_bwd", 4), ("gru_bwd", 3)):
        w, f = profile_case.option_call(cell, 40, 0.3, 2, "float32", 4, ["plan=2"])
        assert w.meta.gates == gates and w.meta.reason.endswith("planned for batch 2")
        got = f()
        w2, kernel, operands, lengths = testing.gated_backward_problem(0, gates, 40, 2, 4, 0.3,
                                                                       "float32", plan_batch=2)
        want = testing.run_gated_backward(gates, w2, kernel, operands, lengths, xla=True)
        for g, r in zip(got, want):
            assert testing.rel_err(g, r) < 1e-5
    assert "simple_bwd" not in cost_fit.GATES and "lstm_bwd" not in cost_fit.GATES
    with pytest.raises(SystemExit, match="one of simple, .*, simple_bwd, lstm_bwd, gru_bwd, got 'tanh_bwd'"):
        profile_case.case_call("tanh_bwd", 32, 0.2, 2, "float32", 4)


def test_a_kernel_time_run_skips_a_case_whose_layout_does_not_fit(tmp_path, monkeypatch, capsys):
    """A sweep goes on past a layout that does not fit (K = 1 puts a row of ~19 nonzeros on 19
    lanes: 60 warps, past one CTA), and the manifest holds the cases that ran, with their layouts."""
    monkeypatch.setattr(kernel_time, "STEPS", (2, 3))
    cases = ["simple 96 0.2 3 float32 ctas=1 k=1", "simple 96 0.2 3 float32 ctas=2"]
    kernel_time.run(cases, tmp_path / "m.json")
    order = json.loads((tmp_path / "m.json").read_text())
    assert [(o["case"], o["steps"]) for o in order] == [(cases[1], 2), (cases[1], 3)]
    assert order[0]["layout"]["ctas"] <= 2 and order[0]["layout"]["hidden"] == 96
    assert "skipped 'simple 96 0.2 3 float32 ctas=1 k=1'" in capsys.readouterr().err
    # the summary's row carries the layout that ran (what benchmarks.cost_fit reads)
    n = kernel_time.WARMUP + kernel_time.CALLS
    _ncu_csv(tmp_path / "k.csv", [(100, 1, "usecond")] * n + [(400, 1, "usecond")] * n)
    (row,) = kernel_time.summarize(tmp_path / "k.csv", tmp_path / "m.json")
    assert {k: row[k] for k in order[0]["layout"]} == order[0]["layout"]


def test_a_kernel_time_run_skips_a_call_the_dispatcher_refuses(tmp_path, monkeypatch, capsys):
    """A call that fails before any launch (method='native' past the layout's batch limit raises
    ValueError in compilation) skips its case and the run goes on; a case left without its second
    length's launches is dropped from the summary, not given a slope."""
    import profile_case

    monkeypatch.setattr(kernel_time, "STEPS", (2, 3))
    real = profile_case.option_call

    def refusing(cell, hidden, density, batch, dtype, steps, options):
        w, f = real(cell, hidden, density, batch, dtype, steps, options)
        if batch == 5:
            def refused():
                raise ValueError("method='native': batch 5 exceeds the persistent kernel's limit")
            return w, refused
        return w, f

    monkeypatch.setattr(profile_case, "option_call", refusing)
    cases = ["simple 96 0.2 5 float32 ctas=2", "simple 96 0.2 3 float32 ctas=2"]
    kernel_time.run(cases, tmp_path / "m.json")
    order = json.loads((tmp_path / "m.json").read_text())
    assert [(o["case"], o["steps"]) for o in order] == [(cases[1], 2), (cases[1], 3)]
    assert "skipped 'simple 96 0.2 5 float32 ctas=2' (T=2): method='native'" in capsys.readouterr().err
    # A manifest whose first case has only its first length (a refusal at the second).
    n = kernel_time.WARMUP + kernel_time.CALLS
    cut = [dict(order[0], case="cut")] + order
    (tmp_path / "cut.json").write_text(json.dumps(cut))
    _ncu_csv(tmp_path / "k.csv", [(100, 1, "usecond")] * 2 * n + [(400, 1, "usecond")] * n)
    rows = kernel_time.summarize(tmp_path / "k.csv", tmp_path / "cut.json")
    assert [r["case"] for r in rows] == [cases[1]]
    assert rows[0]["us_per_step"] == pytest.approx(300)
    assert "'cut': no T=3 launches, skipped" in capsys.readouterr().err


def test_the_sanitizer_grid_case_runs_grid_layouts_correctly_on_the_cpu(capsys):
    # tools/sanitizer_case.py --cases grid: the grid's exchange, which the other cases' small layers
    # never take on a GPU with clusters; on the CPU the same runs check the plumbing and the results.
    import numpy as np
    import sanitizer_case

    runs = sanitizer_case.planned_runs("grid", ["float32"])
    assert [label for label, _ in runs] == [
        "grid simple H=128 B=3 T=4 float32", "grid simple H=300 B=5 T=6 float32",
        "grid lstm H=48 B=3 T=4 float32", "grid gru H=48 B=3 T=4 float32",
        "grid lstm H=96 B=5 T=6 float32", "grid gru H=96 B=5 T=6 float32"]
    for i in (0, 2, 3):
        assert runs[i][1](np.random.default_rng(i))
    out = capsys.readouterr().out
    assert out.count("exchange=grid") == 3 and "exchange=cluster" not in out and "WRONG" not in out
    with pytest.raises(SystemExit, match="unknown case 'grids'"):
        sanitizer_case.planned_runs("grids", ["float32"])


def test_the_sanitizer_case_can_route_u_through_a_fusion(monkeypatch, capsys):
    # --u-through-fusion: the gated backward's u gets an elementwise op after the product (what
    # initcheck's reports on the LSTM backward's loads of u need to be decided), same values.
    import jax
    import jax.numpy as jnp
    import numpy as np
    import sanitizer_case

    from jax_sprnn import fallback

    monkeypatch.setattr(fallback, "storage_matvec", fallback.storage_matvec)  # (restored after)
    product = fallback.storage_matvec
    sanitizer_case.route_u_through_a_fusion()
    rng = np.random.default_rng(0)
    kernel = jnp.asarray(rng.standard_normal((6, 24)), jnp.float32)
    h = jnp.asarray(rng.standard_normal((5, 6)), jnp.float32)
    routed = fallback.storage_matvec(kernel, jnp.float16)
    np.testing.assert_array_equal(routed(h), product(kernel, jnp.float16)(h))
    assert "select_n" in str(jax.make_jaxpr(routed)(h))
    runs = sanitizer_case.planned_runs("grid", ["float32"])
    assert runs[2][0] == "grid lstm H=48 B=3 T=4 float32" and runs[2][1](np.random.default_rng(2))
    assert "WRONG" not in capsys.readouterr().out


@pytest.mark.parametrize("path", sorted((TOOLS / "kt_cases").glob("*.txt")), ids=lambda p: p.name)
def test_every_kernel_time_case_file_names_cases_that_kernel_time_takes(path):
    # (tools/gpu_check.sh kerneltime reads them on a device: a bad line would cost device time)
    import profile_case

    cases = [line.split() for line in path.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert cases
    for cell, hidden, density, batch, dtype, *options in cases:
        assert cell in profile_case.CELLS
        assert int(hidden) > 0 and 0 < float(density) <= 1 and int(batch) > 0
        assert dtype in ("float32", "float16", "bfloat16")
        profile_case.parse_options(options)  # SystemExit on a bad option


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (no GPU)")
def test_variant_ptxas_reports_each_variant_and_refuses_one_that_does_not_exist():
    """tools/variant_ptxas.sh: one line per variant (registers, frame, spills), matched back to its
    spec; a variant outside the tier tables is the compiler's static_assert, and a failure."""
    script = str(TOOLS / "variant_ptxas.sh")
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run([script, "kForward __half 1 8 false 1", "kGru float 2 16 false 1"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2, lines
    assert sorted(", __half, 1, 8, false" in line for line in lines) == [False, True]
    assert sorted(", float, 2, 16, false" in line for line in lines) == [False, True]
    for line in lines:
        regs = int(line.split(" regs")[0].split()[-1])
        assert 64 <= regs <= 255 and "B spill stores" in line
    bad = subprocess.run([script, "kLstm __half 1 24 false 1"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert bad.returncode != 0 and "no such variant" in bad.stdout + bad.stderr


def test_ab_table_gives_each_variant_its_change_against_the_base(tmp_path):
    import ab_table

    def side(name, rows):
        (tmp_path / name).mkdir()
        path = tmp_path / name / "kernel_time.json"
        path.write_text(json.dumps([dict(case=c, us_per_step=us, inst_per_step=inst)
                                    for c, us, inst in rows]))
        return path

    base = side("base", [("simple 256 0.1 8 float16", 1.2, 1000.0), ("lstm 256 0.1 8 float16", 1.6, 2000.0)])
    a = side("a", [("simple 256 0.1 8 float16", 1.08, 900.0)])
    b = side("b", [("lstm 256 0.1 8 float16", 1.68, 2000.0), ("gru 1024 0.1 1 float16", 2.1, 5.0)])
    lines = ab_table.table([(p.parent.name, ab_table.load(p)) for p in (base, a, b)])
    assert lines[0].split() == ["case", "base", "a", "b"]
    simple, lstm, gru = (next(line for line in lines if line.startswith(cell))
                         for cell in ("simple", "lstm", "gru"))
    assert "1.080 (-10.0%, -10.0% inst)" in simple and simple.rstrip().endswith("-")
    assert "1.680 ( +5.0%,  +0.0% inst)" in lstm
    assert gru.split()[5:] == ["-", "-", "2.100"]  # a case the base did not run: no change
    with pytest.raises(SystemExit, match="no base summary"):
        ab_table.main([str(tmp_path / "missing" / "kernel_time.json"), str(a)])


def test_ab_check_times_each_variant_against_the_base_and_leaves_the_tree_as_it_was(tmp_path):
    """tools/ab_check.sh with AB_VARIANTS, on a stand-in tree whose gpu_check.sh writes a kernel
    time that depends on the tree: each patch applied alone and reverted, the table at the end,
    each side's logs in an archive of its own."""
    if shutil.which("patch") is None:
        pytest.skip("needs patch")
    root = tmp_path / "repo"
    (root / "tools").mkdir(parents=True)
    for name in ("ab_check.sh", "ab_table.py"):
        (root / "tools" / name).write_text((TOOLS / name).read_text())
    (root / "tools" / "gpu_check.sh").write_text(
        'mkdir -p "$OUT"; us=$(cat speed.txt); '
        'echo "[{\\"case\\": \\"simple 256\\", \\"us_per_step\\": $us, \\"inst_per_step\\": 100}]" '
        '> "$OUT/kernel_time.json"\n')
    (root / "speed.txt").write_text("1.0\n")
    for name, speed in (("fast", "0.9"), ("slow", "1.1")):
        (root / f"{name}.patch").write_text(
            f"--- a/speed.txt\n+++ b/speed.txt\n@@ -1 +1 @@\n-1.0\n+{speed}\n")
    out = tmp_path / "out"
    done = subprocess.run(["bash", "tools/ab_check.sh"], cwd=root, capture_output=True, text=True,
                          env=dict(os.environ, OUT=str(out), AB_VARIANTS="fast.patch slow.patch"),
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith("simple 256"))
    assert "0.900 (-10.0%" in row and "1.100 (+10.0%" in row
    assert (root / "speed.txt").read_text() == "1.0\n"  # every patch reverted
    assert sorted(p.name for p in out.iterdir()) == ["ab_table.txt", "base.tar.gz", "fast.tar.gz",
                                                      "slow.tar.gz"]
    with tarfile.open(out / "fast.tar.gz") as side:
        assert json.load(side.extractfile("fast/kernel_time.json"))[0]["us_per_step"] == 0.9


def test_fresh_build_inputs_touches_exactly_the_inputs_that_changed_since_the_recorded_build(tmp_path):
    # A checkout copied with old mtimes over a build of another source: ninja sees nothing to do
    # unless the changed inputs are touched.
    for name, text in {"cuda/a.cu": "a", "cuda/b.cuh": "b", "jax_sprnn/c.py": "c",
                       "CMakeLists.txt": "cm", "pyproject.toml": "pp"}.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    build = tmp_path / "build"
    script = str(TOOLS / "fresh_build_inputs.sh")

    def run(action):
        subprocess.run(["bash", script, action, str(build)], cwd=tmp_path, check=True, timeout=60)

    def age_all():
        for f in tmp_path.rglob("*"):
            if f.is_file() and build not in f.parents:
                os.utime(f, (1_000_000, 1_000_000))

    def touched():
        return {str(f.relative_to(tmp_path)) for f in tmp_path.rglob("*")
                if f.is_file() and build not in f.parents and f.stat().st_mtime > 2_000_000}

    run("touch")  # no build folder yet: nothing to do
    age_all()
    assert touched() == set()
    build.mkdir()
    run("touch")  # a build folder without a record: every input
    assert touched() == {"cuda/a.cu", "cuda/b.cuh", "jax_sprnn/c.py", "CMakeLists.txt", "pyproject.toml"}
    run("record")
    (tmp_path / "cuda/b.cuh").write_text("b, another source")
    (tmp_path / "cuda/new.cu").write_text("new")
    age_all()
    run("touch")
    assert touched() == {"cuda/b.cuh", "cuda/new.cu"}
