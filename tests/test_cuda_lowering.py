"""What the CUDA lowering of the recurrences emits, checked on any machine (lowered for CUDA with
jax.export, never run): production calls bind the production targets with the layout attributes
only; a call that sets a test hook binds the hooked target, hooks included (docs/format.md)."""

import re

import jax
import numpy as np
import jax.numpy as jnp
import pytest

import jax_sprnn as js
from jax_sprnn import _constants, _native
from jax_sprnn.primitives import sprnn_backward_p, sprnn_forward_p, sprnn_gru_p, sprnn_lstm_p
from jax_sprnn.testing import make_problem, make_twin_problem

LAYOUT_ATTRS = {"activation", "load_bytes", "reg_slots", "reverse", "slots_per_lane", "warps_per_cta"}
# The CUDA recurrences also take the sequences' memory layout and the number of stacked problems.
RECURRENCE_ATTRS = LAYOUT_ATTRS | {"batch_major", "problems"}
# The forward targets also say whether the layout runs on tensor cores (a tile layout).
FORWARD_ATTRS = RECURRENCE_ATTRS | {"tiles"}
HOOK_ATTRS = {"debug_stall_cta", "grid_barrier", "spin_timeout_us", "exchange_mode"}


def _custom_calls(fn, *args):
    """(target, attribute names) of each custom call in fn lowered for CUDA."""
    checks = [jax.export.DisabledSafetyCheck.custom_call(name) for name in _native.cuda_targets()]
    text = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args).mlir_module()
    calls = []
    for target, config in re.findall(r"stablehlo\.custom_call @(\w+)\(.*?backend_config = \{([^}]*)\}",
                                     text):
        calls.append((target, set(re.findall(r"(\w+) = ", config))))
    return calls


@pytest.mark.parametrize("hooks, target, attrs", [
    ({}, "forward", FORWARD_ATTRS),
    ({"spin_timeout_us": 2000, "debug_stall_cta": 0}, "forward_hooked", FORWARD_ATTRS | HOOK_ATTRS),
    ({"grid_barrier": True}, "forward_hooked", FORWARD_ATTRS | HOOK_ATTRS),
    ({"exchange_mode": "cluster"}, "forward_hooked", FORWARD_ATTRS | HOOK_ATTRS),
    ({"exchange_mode": "auto"}, "forward", FORWARD_ATTRS),
])
def test_forward_binds_the_hooked_target_only_for_a_hook(cuda_targets_registered, hooks, target, attrs):
    _, w, x, h0 = make_problem(4, 300, 2, 16, 0.1, "float16")
    x_tm = jnp.swapaxes(x, 0, 1)
    lengths = jnp.full((2,), 16, jnp.int32)

    def fn(x_tm, h0):
        return sprnn_forward_p.bind(x_tm, h0, w.values, w.indices, w.lane_row, lengths,
                                    activation="tanh", reverse=False, meta=w.meta, method="native",
                                    **hooks)
    assert _custom_calls(fn, x_tm, h0) == [(_constants.ffi_target(target), attrs)]


def _forward_layouts(text):
    """(batch_major attribute, x's operand layout, y's result layout) of the forward custom call."""
    call = re.search(r"stablehlo\.custom_call @jax_sprnn_forward_v\d+\(.*", text).group(0)
    major = int(re.search(r"batch_major = (\d+)", call).group(1))
    x_layout = re.search(r"operand_layouts = \[dense<\[([\d, ]+)\]>", call).group(1)
    y_layout = re.search(r"result_layouts = \[dense<\[([\d, ]+)\]>", call).group(1)
    return major, x_layout, y_layout


@pytest.mark.parametrize("time_major", [False, True])
def test_a_batch_major_call_asks_for_the_batch_major_layout(cuda_targets_registered, time_major):
    # [B, T, H] in and out (the default): the custom call takes x and gives y with B outermost in
    # memory (minor to major 2, 0, 1), so XLA turns the API's swapaxes into bitcasts (on the GPU,
    # tests/test_cuda.py checks the compiled program); [T, B, H] callers keep the row-major layout.
    _, w, x, h0 = make_problem(8, 300, 3, 5, 0.1, "float16")
    x = jnp.swapaxes(x, 0, 1) if time_major else x
    fn = jax.jit(lambda x, h0: js.sparse_rnn(x, h0, w, method="native", time_major=time_major))
    checks = [jax.export.DisabledSafetyCheck.custom_call(name) for name in _native.cuda_targets()]
    text = jax.export.export(fn, platforms=["cuda"], disabled_checks=checks)(x, h0).mlir_module()
    want = "2, 1, 0" if time_major else "2, 0, 1"
    assert _forward_layouts(text) == (int(not time_major), want, want)


def test_backward_production_call_has_no_hook_attributes(cuda_targets_registered):
    _, w, x, h0 = make_problem(7, 300, 2, 16, 0.1, "float16")
    y = jnp.swapaxes(x, 0, 1)
    lengths = jnp.full((2,), 16, jnp.int32)

    def fn(y, h0, **hooks):
        return sprnn_backward_p.bind(y, h0, w.transposed_values(), w.indices_t, w.lane_row_t, lengths,
                                     jnp.ones_like(y), jnp.zeros_like(h0), activation="tanh",
                                     reverse=False, meta=w.meta_t, method="native", **hooks)
    assert _custom_calls(fn, y, h0) == [(_constants.ffi_target("backward"), RECURRENCE_ATTRS)]
    assert _custom_calls(lambda y, h0: fn(y, h0, debug_stall_cta=0), y, h0) == [
        (_constants.ffi_target("backward_hooked"), RECURRENCE_ATTRS | HOOK_ATTRS)]


def test_forward_mode_runs_the_forward_kernel_and_reverse_mode_the_backward_one(
        cuda_targets_registered):
    """jax.jvp evaluates the tangent primitive (jax_sprnn.forward_mode): the kernel's outputs and
    the fallback's tangents, so the forward target and no other; jax.grad transposes it into the
    backward target."""
    _, w, x, h0 = make_problem(5, 300, 2, 16, 0.1, "float16")

    def outputs(x):
        return js.sparse_rnn(x, h0, w, method="native")
    pushed = {t for t, _ in _custom_calls(lambda x, dx: jax.jvp(outputs, (x,), (dx,)), x, x)}
    assert pushed == {_constants.ffi_target("forward")}
    pulled = {t for t, _ in _custom_calls(
        jax.grad(lambda x: jnp.sum(outputs(x)[0].astype(jnp.float32))), x)}
    assert {_constants.ffi_target("forward"), _constants.ffi_target("backward")} <= pulled


def _exported_text(fn, platform, *args):
    checks = [jax.export.DisabledSafetyCheck.custom_call(name)
              for name in _native.cuda_targets() | _native.cpu_targets()]
    return jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(
        *args).mlir_module()


def test_a_bidirectional_pair_is_one_launch_on_cuda_and_two_calls_on_the_cpu(cuda_targets_registered):
    # Two directions of one layout: on CUDA one forward call of both, stacked [2, T, B, H] with B
    # before T in memory, the backward direction's bit set in reverse; its gradient one backward
    # call. On the CPU two forward calls (the CPU kernels, where built) and no stacking.
    (_, w_f, x_f, h_f), (_, w_b, x_b, h_b) = make_twin_problem(3, 300, 2, 7, 0.1, "float16")
    xs, hs, ws = (x_f, x_b), (h_f, h_b), (w_f, w_b)

    def forward(xs, hs):
        return js.sparse_rnn_bidirectional(xs, hs, ws, method="native")[0]

    def grad(xs, hs):
        return jax.grad(lambda xs: jnp.sum(forward(xs, hs).astype(jnp.float32)))(xs)

    text = _exported_text(forward, "cuda", xs, hs)
    calls = re.findall(r"stablehlo\.custom_call @(\w+)\(.*", text)
    assert [name for name in calls] == [_constants.ffi_target("forward")]
    call = re.search(r"stablehlo\.custom_call @jax_sprnn_forward_v\d+\(.*", text).group(0)
    assert re.search(r"problems = 2 : i64", call) and re.search(r"reverse = 2 : i64", call)
    assert "dense<[3, 1, 2, 0]>" in call
    assert re.search(r"tensor<2x7x2x300xf16>", call)
    names = re.findall(r"stablehlo\.custom_call @(\w+)\(", _exported_text(grad, "cuda", xs, hs))
    assert names.count(_constants.ffi_target("backward")) == 1
    assert names.count(_constants.ffi_target("forward")) == 1
    cpu = re.findall(r"stablehlo\.custom_call @(\w+)\(", _exported_text(forward, "cpu", xs, hs))
    expected = 2 if _constants.ffi_target("forward") in _native.cpu_targets() else 0
    assert cpu.count(_constants.ffi_target("forward")) == expected


GATED_ATTRS = {"gates", "load_bytes", "reg_slots", "reverse", "slots_per_lane", "warps_per_cta"}
GATED_RECURRENCE_ATTRS = GATED_ATTRS | {"batch_major", "problems", "tiles"}  # (x's layout; stacked
# problems; a tile layout)
GATED_BACKWARD_ATTRS = GATED_ATTRS - {"reverse"} | {"batch_major", "problems"}  # (step order)


@pytest.mark.parametrize("gates", [3, 4])
def test_gated_cells_bind_the_gated_target(cuda_targets_registered, gates):
    """The LSTM and the GRU lower to the one gated target (with the gate count), hooks to its hooked
    twin; their gradients add the gated backward target."""
    H, B, T = 40, 3, 9
    rng = np.random.default_rng(gates)
    kernel = (rng.standard_normal((H, gates * H)) * 0.2).astype(np.float16)
    w = js.SparseWeights.from_dense(kernel, density=0.2)
    x = jnp.asarray(rng.standard_normal((B, T, gates * H)), jnp.float16)
    h0 = jnp.zeros((B, H), jnp.float16)

    def fn(x, h0):
        if gates == 4:
            return js.sparse_lstm(x, (h0, h0), w, method="native")
        return js.sparse_gru(x, h0, w, method="native")
    assert _custom_calls(fn, x, h0) == [(_constants.ffi_target("gated_forward"), GATED_RECURRENCE_ATTRS)]
    # The backward pass starts from the forward kernel's outputs: the forward and the backward
    # recurrence, one kernel call each.
    loss = lambda x, h0: jnp.sum(fn(x, h0)[0].astype(jnp.float32))  # noqa: E731
    for transform in (jax.grad, jax.value_and_grad):
        assert _custom_calls(transform(loss), x, h0) == [
            (_constants.ffi_target("gated_forward"), GATED_RECURRENCE_ATTRS),
            (_constants.ffi_target("gated_backward"), GATED_BACKWARD_ATTRS)]

    lengths = jnp.full((B,), T, jnp.int32)
    x_tm = jnp.swapaxes(x, 0, 1)

    def hooked(x_tm, h0):
        params = dict(reverse=False, meta=w.meta, method="native", exchange_mode="grid")
        if gates == 4:
            return sprnn_lstm_p.bind(x_tm, h0, h0, w.values, w.indices, w.lane_row, lengths, **params)
        return sprnn_gru_p.bind(x_tm, h0, w.values, w.indices, w.lane_row, lengths,
                                jnp.zeros((H,), jnp.float32), **params)
    assert _custom_calls(hooked, x_tm, h0) == [(_constants.ffi_target("gated_forward_hooked"),
                                                GATED_RECURRENCE_ATTRS | HOOK_ATTRS)]


def _layouts(call: str, kind: str) -> list[str]:
    """The minor-to-major layouts of a custom call's operands or results (kind), in order."""
    found = re.search(rf"{kind}_layouts = \[(.*?)\]\s*(,|\}})", call)
    return re.findall(r"dense<\[?([\d, ]*)\]?>", found.group(1)) if found else []


@pytest.mark.parametrize("gates", [3, 4])
@pytest.mark.parametrize("time_major", [False, True])
def test_a_batch_major_gated_call_asks_for_the_batch_major_layout(cuda_targets_registered, gates,
                                                                   time_major):
    # As the simple cell's: a [B, T, G*H] call's x, y (and, for the gradient, the LSTM's cells)
    # have B outermost in memory at the custom call, so XLA compiles the swapaxes to bitcasts;
    # [T, B, .] callers keep the row-major layout.
    H, B, T = 40, 3, 9
    rng = np.random.default_rng(10 + gates)
    kernel = (rng.standard_normal((H, gates * H)) * 0.2).astype(np.float16)
    w = js.SparseWeights.from_dense(kernel, density=0.2)
    shape = (T, B, gates * H) if time_major else (B, T, gates * H)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float16)
    h0 = jnp.zeros((B, H), jnp.float16)

    def fn(x, h0):
        if gates == 4:
            return js.sparse_lstm(x, (h0, h0), w, method="native", time_major=time_major)[0]
        return js.sparse_gru(x, h0, w, method="native", time_major=time_major)[0]
    loss = lambda x, h0: jnp.sum(fn(x, h0).astype(jnp.float32))  # noqa: E731
    checks = [jax.export.DisabledSafetyCheck.custom_call(name) for name in _native.cuda_targets()]
    want = "2, 1, 0" if time_major else "2, 0, 1"
    for f, seq_results in ((fn, (0,)), (jax.grad(loss), (0, 3) if gates == 4 else (0,))):
        text = jax.export.export(jax.jit(f), platforms=["cuda"], disabled_checks=checks)(x, h0).mlir_module()
        target = _constants.ffi_target("gated_forward")
        call = re.search(rf"stablehlo\.custom_call @{target}\(.*", text).group(0)
        assert int(re.search(r"batch_major = (\d+)", call).group(1)) == int(not time_major)
        if time_major:
            continue  # (row-major everywhere: the call may leave its layouts unstated)
        operands, results = _layouts(call, "operand"), _layouts(call, "result")
        assert operands[0] == want and results[0] == want, (operands, results)
        for i in seq_results[1:]:  # the LSTM's cells, which its backward pass reads
            assert results[i] == want, results
        assert all(layout != want for i, layout in enumerate(results) if i not in seq_results)



def _lengths_operand(text: str, kind: str) -> str:
    """The MLIR type of the lengths operand of the first `kind` custom call in `text`."""
    call = re.search(rf"stablehlo\.custom_call @{_constants.ffi_target(kind)}\(.*", text).group(0)
    types = re.search(r"\}\s*:\s*\((.*?)\)\s*->", call).group(1)
    operands = re.findall(r"tensor<[^>]*>", types)
    at = {"forward": 5, "gated_forward": 6}[kind]  # (the gated target's c0 comes before lengths)
    return operands[at]


@pytest.mark.parametrize("cell", ["simple", "lstm", "gru"])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_a_call_without_seq_lengths_passes_no_lengths(cuda_targets_registered, cell, with_lengths):
    # Every sequence runs all T steps: the target gets an empty lengths operand (the kernel then
    # runs T steps for every example), so XLA builds no [B] array of T, which in a short call is a
    # kernel launch of its own (issue 18, item 6). Given lengths reach the kernel.
    H, B, T = 40, 3, 5
    gates = {"simple": 1, "lstm": 4, "gru": 3}[cell]
    rng = np.random.default_rng(gates)
    kernel = (rng.standard_normal((H, gates * H)) * 0.2).astype(np.float16)
    w = js.SparseWeights.from_dense(kernel, density=0.2)
    x = jnp.asarray(rng.standard_normal((B, T, gates * H)), jnp.float16)
    h0 = jnp.zeros((B, H), jnp.float16)
    kw = dict(method="native", seq_lengths=jnp.array([5, 2, 0]) if with_lengths else None)

    def fn(x, h0):
        if cell == "lstm":
            return js.sparse_lstm(x, (h0, h0), w, **kw)
        if cell == "gru":
            return js.sparse_gru(x, h0, w, **kw)
        return js.sparse_rnn(x, h0, w, **kw)
    checks = [jax.export.DisabledSafetyCheck.custom_call(name) for name in _native.cuda_targets()]
    for f, batch in ((fn, B), (jax.vmap(fn), 2 * B)):  # (vmap folds its axis into the batch)
        args = (x, h0) if f is fn else (jnp.stack([x, x]), jnp.stack([h0, h0]))
        text = jax.export.export(jax.jit(f), platforms=["cuda"], disabled_checks=checks)(*args).mlir_module()
        want = f"tensor<{batch}xi32>" if with_lengths else "tensor<0xi32>"
        assert _lengths_operand(text, "forward" if cell == "simple" else "gated_forward") == want


def test_a_symbolic_length_keeps_the_kernel_and_a_symbolic_batch_takes_the_dense_path(
        cuda_targets_registered, monkeypatch):
    """jax.export shape polymorphism for the GPU (docs/export.md, "Symbolic shapes"): the launch
    is planned for a known batch, so a symbolic batch lowers XLA's dense path; a symbolic length
    alone keeps the persistent kernel, forward and backward."""
    from jax_sprnn import primitives
    monkeypatch.setattr(primitives, "_warned", set())
    _, w, _, _ = make_problem(4, 300, 2, 16, 0.1, "float16")

    def fn(x, h0):
        return jax.grad(lambda x: js.sparse_rnn(x, h0, w)[0].astype(jnp.float32).sum())(x)
    b, t = jax.export.symbolic_shape("b, t")
    targets = [c[0] for c in _custom_calls(fn, jax.ShapeDtypeStruct((2, t, 300), jnp.float16),
                                           jax.ShapeDtypeStruct((2, 300), jnp.float16))]
    assert _constants.ffi_target("forward") in targets and _constants.ffi_target("backward") in targets
    with pytest.warns(RuntimeWarning, match="the batch is symbolic"):
        calls = _custom_calls(fn, jax.ShapeDtypeStruct((b, t, 300), jnp.float16),
                              jax.ShapeDtypeStruct((b, 300), jnp.float16))
    assert calls == []
