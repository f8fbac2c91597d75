"""The benchmark suites (python -m benchmarks.run) run end to end in smoke mode: tiny layers, every
peer either timed or skipped with a reason, JSON and plots written. On CPU the GPU-only peers skip;
on a GPU the same tests exercise every peer at tiny sizes."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jax
import pytest

pytest.importorskip("matplotlib", reason="the benchmark plots need matplotlib")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # appended: the jax_sprnn under test is the one already imported

from benchmarks import run as bench  # noqa: E402


def _run(suite, tmp_path, *extra):
    path = bench.main(["--suite", suite, "--smoke", "--out", str(tmp_path), *extra])
    data = json.loads(Path(path).read_text())
    assert {"suite", "info", "timing", "peers", "rows", "plots", "elapsed_s"} <= data.keys()
    assert data["suite"] == suite and data["smoke"] is True
    for plot in data["plots"]:
        assert Path(plot).stat().st_size > 0
    return data


def _check_case(row, must_run):
    assert {"hidden", "density", "batch", "dtype", "peers", "auto", "best_peer"} <= row.keys()
    for name, result in row["peers"].items():
        assert "error" not in result, (name, result)
        if "skipped" in result:
            assert result["skipped"], name  # a reason
            continue
        assert math.isfinite(result["us_per_step"]) and math.isfinite(result["fixed_us"]), name
        assert result["call_ms"] > 0, name
        if "rel_err" in result:
            assert result["rel_err"] < 5e-2, (name, result["rel_err"])
    for name in must_run:
        assert row["peers"][name]["us_per_step"] > 0, (name, row["peers"][name])


def test_paper_suite(tmp_path):
    data = _run("paper", tmp_path)
    rows = data["rows"]
    _check_case(rows[0], must_run=("ours", "dense"))
    assert rows[0]["speedup_vs_best"] > 0
    claim = data["claim"]
    assert claim["sparse_hidden"] > claim["dense_hidden"] > 0
    assert claim["size_ratio"] >= 4  # 5x fewer weights, rounded down to the grid step
    assert claim["time_ratio_vs_dense_scan"] > 0


def test_sweep_suite_and_resume(tmp_path):
    data = _run("sweep", tmp_path)
    assert len(data["rows"]) == 2 and set(data["crossovers"]) == {"float16/64/2"}
    for row in data["rows"]:
        _check_case(row, must_run=("ours",))
        assert row["auto"]["pick"]
    again = _run("sweep", tmp_path / "again", "--resume", str(tmp_path / "sweep.json"))
    assert again["rows"] == data["rows"]  # nothing measured twice
    part = _run("sweep", tmp_path / "part", "--resume", str(tmp_path / "sweep.json"),
                "--density", "0.1")
    by_density = lambda rows: sorted(rows, key=lambda r: r["density"])
    assert by_density(part["rows"]) == by_density(data["rows"])  # the other part's rows are kept


def test_capacity_suite(tmp_path):
    # The planner's whole grid runs in every mode (no GPU needed); smoke verifies tiny layers only.
    data = _run("capacity", tmp_path, "--verify")
    limits = data["limits"]
    assert limits["dense_register_limit_hidden"] > limits["cudnn_persistent_max_hidden"]
    rows = {(r["density"], r["dtype"]): r for r in data["rows"]}
    assert len(rows) == 10
    for dtype in ("float16", "float32"):
        largest = [rows[d, dtype]["largest_hidden"] for d in (0.01, 0.05, 0.1, 0.2, 0.3)]
        assert all(a >= b for a, b in zip(largest, largest[1:])), largest  # denser: no larger
        assert largest[0] > largest[-1]
        for d in (0.01, 0.05, 0.1, 0.2, 0.3):
            assert 0 < rows[d, dtype]["largest_hidden_b4"] <= rows[d, dtype]["largest_hidden"]
    for d in (0.01, 0.05, 0.1, 0.2, 0.3):  # 4-byte pairs hold at least as much as 8-byte ones
        assert rows[d, "float16"]["largest_hidden"] >= rows[d, "float32"]["largest_hidden"]
    assert rows[0.1, "float16"]["largest_hidden"] > rows[0.1, "float32"]["largest_hidden"]
    verified = [r["verified"] for r in data["rows"] if "verified" in r]
    assert len(verified) == 4
    for v in verified:
        assert v["ran"] and v["rel_err"] < 5e-2
    assert len(data["cudnn_probe"]) == 2


def test_training_suite(tmp_path):
    data = _run("training", tmp_path)
    for row in data["rows"]:
        _check_case(row, must_run=("ours", "dense", "fwd"))
        assert math.isfinite(row["backward_over_forward"])


def test_ablation_suite(tmp_path):
    data = _run("ablation", tmp_path)
    for row in data["rows"]:
        _check_case(row, must_run=("naive", "wide", "bank", "ours"))
        assert set(row["peers"]["naive"]) >= {"rel_err"}


def test_cpu_suite(tmp_path):
    if jax.default_backend() != "cpu":
        pytest.skip("the cpu suite measures the CPU backend (it refuses to run beside a GPU)")
    data = _run("cpu", tmp_path)
    assert [(r["hidden"], r["dtype"]) for r in data["rows"]] == [(64, "float32"), (64, "float16")]
    for row in data["rows"]:
        for name in ("ours", "dense", "auto", "dense_path", "ours_grad", "dense_grad"):
            result = row["peers"][name]
            assert result["call_ms"] > 0 and result["rel_err"] < 5e-2, (name, result)
        # (A smoke run's per-step slope is noise on a loaded machine and may even be negative: the
        # ratios must exist, not have a sign.)
        assert math.isfinite(row["speedup_forward"]) and math.isfinite(row["speedup_grad"])
        assert math.isfinite(row["auto_over_best"])
    assert {t["direction"] for t in data["targets"]} == {"auto"}  # (H = 64: no speed goal)
    assert set(data["crossovers"]) == {f"{d}/2/{k}" for d in ("float32", "float16")
                                       for k in ("forward", "grad")}
    assert data["cpu_before"]["cores"] >= 1


def test_gated_suite(tmp_path):
    data = _run("gated", tmp_path)
    rows = data["rows"]
    assert [(r["kind"], r["cell"]) for r in rows] == [("training", "gru"), ("forward", "lstm"),
                                                      ("forward", "gru")]
    competitors = {"cudnn", "flax", "jax_rnn"}
    for row in rows:
        _check_case(row, must_run=())
        peers = row["peers"]
        assert ("jax_rnn" in peers) == (row["kind"] == "forward" and row["cell"] == "lstm")
        for name in ("ours_auto", "flax", "in_gemm"):  # these run on every backend
            assert 0 < peers[name]["call_ms"] < math.inf, (name, peers[name])
        for name in ("ours_auto", "flax"):  # Flax's parameters mapped from the layer's arrays
            assert peers[name]["rel_err"] < 5e-2, (name, peers[name])
        path = peers["ours_auto"]["path"]  # what the compiled program called
        assert path == "XLA dense path" or path.startswith("native (jax_sprnn"), path
        native = peers["ours_native"]
        assert "us_per_step" in native or "method='native'" in native["skipped"], native
        # The ratios are same-run quotients of the recorded per-step times, where both are positive.
        timed = {n: r["us_per_step"] for n, r in peers.items() if r.get("us_per_step", 0) > 0}
        best = min(((us, n) for n, us in timed.items() if n in competitors), default=(None, None))
        assert (row["best_us"], row["best_peer"]) == best
        for method in ("native", "auto"):
            ours = timed.get(f"ours_{method}")
            expected = best[0] / ours if ours and best[0] else None
            assert row[f"x_best_{method}"] == pytest.approx(expected), method
            layer = best[0] / (ours + timed["in_gemm"]) if ours and best[0] and "in_gemm" in timed \
                else None
            assert row[f"x_layer_{method}"] == pytest.approx(layer), method
    capacity = {(r["cell"], r["density"]): r for r in data["capacity"]}
    assert len(capacity) == 6
    for cell in ("lstm", "gru"):
        largest = [capacity[cell, d]["largest_hidden"] for d in (0.05, 0.1, 0.2)]
        assert largest[0] > largest[1] > largest[2] > 0, (cell, largest)  # denser: smaller
        assert all(h % 256 == 0 for h in largest)
        for d in (0.05, 0.1, 0.2):
            row = capacity[cell, d]
            assert 0 < row["largest_hidden_b4"] <= row["largest_hidden"]
            assert row["max_batch"] >= 1 and row["next_refused"]
    for d in (0.05, 0.1, 0.2):  # four gate rows per unit take more room than three
        assert capacity["lstm", d]["largest_hidden"] <= capacity["gru", d]["largest_hidden"]
    goals = {t["case"]: t for t in data["targets"]}
    for cell, goal in (("lstm", 4096), ("gru", 4608)):
        target = goals[f"capacity {cell.upper()} 10% fp16"]
        assert target["goal"] == goal and target["met"] == (target["value"] >= goal)


def test_cluster_suite_takes_the_cases_it_is_given(tmp_path):
    data = _run("cluster", tmp_path, "--hidden", "48,64", "--batch", "1,3", "--density", "0.2")
    cases = [(r["hidden"], r["batch"], r["density"], r["dtype"]) for r in data["rows"]]
    assert cases == [(h, b, 0.2, "float16") for h in (48, 64) for b in (1, 3)]
    for row in data["rows"]:
        _check_case(row, must_run=["ours"])
        assert {"grid_mode", "grid_layout", "n1", "n12", "n16"} <= row["peers"].keys()


@pytest.mark.parametrize("exchange, least", [("cluster", 90), ("grid", 15)])
def test_cost_fit_reads_the_kernel_time_runs_and_cost_py_matches_them(exchange, least):
    """benchmarks/cost_fit.py on the committed runs: every timed layout of the branch becomes a point
    with its own register tier (and, in cluster mode, its day's batch tile), and cost.py's constants
    are the branch's fit to the kernel-time points (a change to either without refitting moves the
    median off 1 or the fit off the constants)."""
    import numpy as np

    from benchmarks import cost_fit
    from jax_sprnn import cost

    results = ROOT / "benchmarks" / "results"
    kernel_time = sorted(results.glob("kernel_time_*_h100_2026-12-0[56].json"))
    points = list(cost_fit.points(kernel_time, exchange))
    assert len(points) >= least
    estimates, ratios = [], []
    for path, row, name, meta, batch, us in points:
        assert meta.exchange == exchange and meta.reg_slots <= meta.slots_per_lane
        assert name == (f"kt n{meta.num_ctas}" if exchange == "cluster" else "kt grid")
        estimates.append(cost_fit.estimate(path, meta, batch, row["dtype"]))
        ratios.append(us / estimates[-1])
    assert 0.95 < np.median(ratios) < 1.05
    assert np.percentile(ratios, 10) > 0.88 and np.percentile(ratios, 90) < 1.15
    # The constants are the non-negative least-squares solution, rounded: refit, they hardly move.
    x = np.array([cost_fit.features(p, m, b, r["dtype"]) for p, r, _, m, b, _ in points])
    coef = cost_fit.fit(x, np.array([us for *_, us in points]))
    ours = [getattr(cost, name) for name in cost_fit.CONSTANTS[exchange]]
    assert len(ours) == len(cost_fit.NAMES[exchange]) == x.shape[1]
    np.testing.assert_allclose(ours, coef, rtol=0.12, atol=0.002)
    # The fit's linear form is cost.py's estimate, term for term (the formula is written twice).
    np.testing.assert_allclose(x @ np.array(ours), estimates, rtol=1e-9)


def test_cost_fit_features_carry_the_split_factor_of_a_split_era_run():
    """A point of a run with the split phase loop (2026-12-07 on) is estimated with
    cost.CLUSTER_SPLIT_FACTOR on its split variants: the fit's linear form must carry it too, or a
    refit to such runs fits the unsplit kernel's constants to the split kernel's times."""
    import numpy as np

    from benchmarks import cost_fit
    from jax_sprnn import cost

    path = ROOT / "benchmarks" / "results" / "kernel_time_cluster_layouts_s34_h100_2026-12-07.json"
    assert cost_fit.split_era(path)
    points = list(cost_fit.points([path]))
    ours = np.array([getattr(cost, name) for name in cost_fit.CONSTANTS["cluster"]])
    split = 0
    for p, row, _, meta, batch, _ in points:
        tile, _, planes = cost_fit.launch(p, meta, batch, row["dtype"])
        split += cost.split_factor(meta, tile, planes, row["dtype"]) != 1.0
        np.testing.assert_allclose(cost_fit.features(p, meta, batch, row["dtype"]) @ ours,
                                   cost_fit.estimate(p, meta, batch, row["dtype"]), rtol=1e-9)
    assert len(points) >= 45 and split >= 10  # (the sweep holds split variants, or this checks nothing)


def test_cost_fit_dates_the_narrow_tile_handler_and_reads_the_wall_clock_runs():
    from benchmarks import cost_fit

    results = ROOT / "benchmarks" / "results"
    # The runs of 2026-12-06 had the narrow-tile handler (cost.cluster_launch), earlier ones did not.
    assert cost_fit.narrowed(results / "kernel_time_refit_check_h100_2026-12-06.json")
    assert not cost_fit.narrowed(results / "kernel_time_layouts_h100_2026-12-05.json")
    # The H200's wall-clock cluster runs still read (the suite's JSON): a check, not fitted; they
    # hold no grid points.
    wall = sorted(results.glob("cluster_*_2026-12-04.json"))
    assert len(list(cost_fit.points(wall))) > 300
    assert not list(cost_fit.points(wall, "grid"))


@pytest.mark.parametrize("cell", ["simple", "lstm", "gru"])
def test_the_bidirectional_probe_times_one_launch_against_two_calls(tmp_path, cell):
    # Tiny sizes: every row timed, the paired call found in the program, the JSON written.
    from benchmarks.probes import bidirectional as probe

    out = tmp_path / "probe.json"
    probe.main(["--cell", cell, "--hidden", "24", "--batches", "2", "--steps", "5", "--reps", "2",
                "--out", str(out)])
    row = json.loads(out.read_text())["rows"]["2"]
    assert row["one launch"] is True
    for name in ("stacked", "two calls", "grad stacked", "grad two calls"):
        assert row[name] > 0
    assert ("dense scan" in row) == (cell == "simple")


def test_the_kernel_time_plot_has_a_panel_per_layer_and_a_line_per_run_and_layout(tmp_path):
    from benchmarks import plots

    def row(cell, hidden, batch, ctas, us):
        return dict(cell=cell, hidden=hidden, batch=batch, exchange="cluster", ctas=ctas,
                    warps_per_cta=4, K=8, us_per_step=us)

    before = [row("simple", 256, b, 3, 1.5) for b in (1, 8, 32)] + [row("lstm", 256, 8, 6, 1.9)]
    after = [row("simple", 256, b, 3, 1.4) for b in (1, 8)] + [row("simple", 256, 8, 4, 1.45)]
    fig = plots.kernel_time_figure({"before": before, "after": after})
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["lstm H=256", "simple H=256"]
    lines = {line.get_label(): list(line.get_xdata()) for line in panels[1].get_lines()}
    assert lines == {"before: cluster 3x4 K8": [1, 8, 32], "after: cluster 3x4 K8": [1, 8],
                     "after: cluster 4x4 K8": [8]}
    runs = []
    for name, rows in (("kernel_time_a", before), ("kernel_time_b", after)):
        runs.append(tmp_path / f"{name}.json")
        runs[-1].write_text(json.dumps(rows))
    plots.main(["kernel-time", str(tmp_path / "k.png"), *map(str, runs)])
    assert (tmp_path / "k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_speech_layers_probe_times_the_example_stack_and_traces_it(tmp_path):
    from benchmarks.probes import speech_layers as probe

    out = tmp_path / "speech.json"
    probe.main(["--hidden", "24", "--steps", "6", "--reps", "2", "--out", str(out),
                "--trace", str(tmp_path / "trace"),
                "--hlo", str(tmp_path / "hlo.txt")])
    data = json.loads(out.read_text())
    assert data["config"]["rnn_impl"] == "layer" and data["config"]["hidden"] == 24
    assert data["ms"]["sparse"] > 0 and data["ms"]["dense lax.scan"] > 0
    assert data["ms"]["sparse, pipelined"] > 0
    assert 0 <= data["ours_us"] <= data["device_busy_us"]  # (no device plane on the CPU: both 0)
    per_call = [e["us_per_call"] for e in data["trace"]]
    assert per_call[0] > 0 and per_call == sorted(per_call, reverse=True)  # the costliest first
    # (2 traced calls: an event that runs once a call reads 1 a call, whatever the program)
    assert any(e["per_call"] == 1 for e in data["trace"])
    assert "HloModule" in (tmp_path / "hlo.txt").read_text()


def test_the_speech_layers_probe_counts_only_the_device_streams_as_device_time():
    from benchmarks.probes.speech_layers import device_us

    def event(plane, line, name, us):
        return dict(plane=plane, line=line, event=name, us_per_call=us)

    gpu, stream = "/device:GPU:0", "Stream #14(Compute,Memset)"
    events = [event(gpu, stream, "void jax_sprnn::cuda::sprnn_persistent_kernel<", 242.5),
              event(gpu, stream, "gemm_fusion_dot_6", 4.0),
              event(gpu, stream, "Memset 0", 1.5),
              event(gpu, "XLA Ops", "sprnn_forward_stack.8", 250.0),  # not a stream
              event("/host:CPU", "python3", "jax_sprnn_forward_v7 handler (sprnn)", 30.0)]
    assert device_us(events) == (242.5, 248.0)


def test_cost_fit_lists_the_defaults_a_refit_would_move_and_restores_the_constants():
    from benchmarks import cost_fit
    from jax_sprnn import cost

    names = cost_fit.CONSTANTS["cluster"]
    today = [getattr(cost, name) for name in names]
    which = dict(hiddens=(512,), dtypes=("float16",), cells=("simple",))
    assert cost_fit.moved_defaults("cluster", today, **which) == []  # the same constants move none
    # The thirty-fourth session's refit (its sweep's fit): the simple cell's 512 layer moves from
    # 5 CTAs of 13 warps, K 16, to 6 of 8, K 24 (benchmarks/RESULTS.md).
    refit = [0.833, 0.0861, 0.00125, 0.00285, 0.0206, 0.362, 0.204, 0.00900]
    [(key, before, after)] = cost_fit.moved_defaults("cluster", refit, **which)
    assert key == ("simple", 512, "float16")
    assert before[:4] == ("cluster", 5, 13, 16) and after[:4] == ("cluster", 6, 8, 24)
    assert [getattr(cost, name) for name in names] == today
