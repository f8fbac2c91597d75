"""GPU tests of the two-plane passes of the persistent kernels (cuda/persistent_kernel.cuh, "The
batch in passes") and of the batch tiles. A call of two batch planes or more (a plane: 4 examples)
runs the kernel variant that gathers two planes a pass; every sum keeps its chain and its order
there, whatever the tile (1, 2 or 4 examples: the handler narrows it where cluster replicas allow).
So its results must equal, bit for bit, the same examples run in calls of one plane each, and in
calls of one example each (tile 1): for every cell, forward and backward, odd plane counts (a
one-plane pass at the end) and partial planes included. Skipped without a GPU and the CUDA
module."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_sprnn import _native, testing
from jax_sprnn.primitives import sprnn_backward_p, sprnn_forward_p
from jax_sprnn.testing import make_gated_problem, make_problem

pytestmark = pytest.mark.gpu

PLANE = 4  # a plane's examples at the 16-byte load of these layouts


def _batch_axis(shape, batch):
    """The batch axis of a result: the problems keep T and the widths different from B."""
    return next(axis for axis, n in enumerate(shape[:2]) if n == batch)


def assert_two_plane_passes_match_one_plane_calls(call, args, batch_axes, batch, part=PLANE):
    """``call(*args)`` on the whole batch against ``call`` on each ``part`` examples alone (a plane,
    or with ``part=1`` each example: tile 1; the last part may be shorter, which runs a narrower
    tile too) (``batch_axes[i]``: the batch axis of ``args[i]``, None where it has none)."""
    whole = jax.block_until_ready(jax.jit(call)(*args))
    parts = []
    for b0 in range(0, batch, part):
        take = jnp.arange(b0, min(b0 + part, batch))
        parts.append(jax.jit(call)(*[a if ax is None else jnp.take(a, take, axis=ax)
                                     for a, ax in zip(args, batch_axes)]))
    for i, got in enumerate(whole):
        axis = _batch_axis(got.shape, batch)
        want = np.concatenate([np.asarray(p[i]) for p in parts], axis=axis)
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"result {i}")


def _lengths(batch, steps, seed):
    lengths = np.random.default_rng(seed).integers(0, steps + 1, batch).astype(np.int32)
    lengths[0] = steps
    lengths[min(1, batch - 1)] = 0
    return jnp.asarray(lengths)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("batch", [6, 8, 13])
@pytest.mark.parametrize("reverse", [False, True])
def test_simple_cell_forward_and_backward(dtype, batch, reverse):
    steps, hidden = 19, 700
    _, w, x, h0 = make_problem(batch, hidden, batch, steps, 0.1, dtype)
    assert w.meta.load_bytes == 16 and w.meta_t.load_bytes == 16, w.meta
    lengths = _lengths(batch, steps, batch)
    for mode in ("grid", "cluster"):
        if mode == "cluster" and not (_native.current_device_spec().cluster_launch
                                      and w.meta.exchange == "cluster"):
            continue

        def forward(x, h0, lengths, mode=mode):
            return sprnn_forward_p.bind(jnp.swapaxes(x, 0, 1), h0, w.values, w.indices, w.lane_row,
                                        lengths, activation="tanh", reverse=reverse, meta=w.meta,
                                        method="native", exchange_mode=mode)

        assert_two_plane_passes_match_one_plane_calls(forward, (x, h0, lengths), (0, 0, 0), batch)
        assert_two_plane_passes_match_one_plane_calls(forward, (x, h0, lengths), (0, 0, 0), batch, part=1)
        y, _ = forward(x, h0, lengths)
        rng = np.random.default_rng(batch)
        dy = jnp.asarray(rng.standard_normal(y.shape), y.dtype)
        dh = jnp.asarray(rng.standard_normal(h0.shape), y.dtype)

        if mode == "cluster" and w.meta_t.exchange != "cluster":
            continue

        def backward(y, h0, lengths, dy, dh, mode=mode):
            return sprnn_backward_p.bind(y, h0, w.transposed_values(), w.indices_t, w.lane_row_t,
                                         lengths, dy, dh, activation="tanh", reverse=reverse,
                                         meta=w.meta_t, method="native", exchange_mode=mode)

        for part in (PLANE, 1):
            assert_two_plane_passes_match_one_plane_calls(backward, (y, h0, lengths, dy, dh),
                                                          (1, 0, 0, 1, 0), batch, part)


def test_cluster_replicas_of_several_planes():
    # 13 planes over the clusters that fit at once (9 of 14 CTAs on an H200): replicas of two
    # planes (one two-plane pass), the last of one partial plane. (56 is the batch limit here.)
    if not _native.current_device_spec().cluster_launch:
        pytest.skip("the GPU has no thread-block clusters")
    batch, steps = 50, 9
    _, w, x, h0 = make_problem(7, 1024, batch, steps, 0.1, "float16")
    assert w.meta.exchange == "cluster" and w.meta.load_bytes == 16, w.meta
    lengths = _lengths(batch, steps, 7)

    def forward(x, h0, lengths):
        return sprnn_forward_p.bind(jnp.swapaxes(x, 0, 1), h0, w.values, w.indices, w.lane_row,
                                    lengths, activation="tanh", reverse=False, meta=w.meta,
                                    method="native", exchange_mode="cluster")

    assert_two_plane_passes_match_one_plane_calls(forward, (x, h0, lengths), (0, 0, 0), batch)


@pytest.mark.parametrize("gates", [4, 3])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("batch", [7, 13])
def test_gated_forward(gates, dtype, batch):
    steps, hidden = 17, 320
    w, x, c0, h0, hn_bias = make_gated_problem(batch, gates, hidden, batch, steps, 0.1, dtype,
                                               load_bytes=16)
    lengths = _lengths(batch, steps, batch)
    for reverse in (False, True):
        def call(x, c0, h0, lengths, reverse=reverse):
            return testing.run_gated(gates, x, c0, h0, w, hn_bias, seq_lengths=lengths,
                                     reverse=reverse, method="native")

        assert_two_plane_passes_match_one_plane_calls(call, (x, c0, h0, lengths), (0, 0, 0, 0), batch)
        assert_two_plane_passes_match_one_plane_calls(call, (x, c0, h0, lengths), (0, 0, 0, 0), batch,
                                                      part=1)


@pytest.mark.parametrize("gates", [4, 3])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_gated_backward(gates, dtype):
    batch, steps, hidden = 11, 15, 192
    w, kernel, operands, lengths = testing.gated_backward_problem(batch, gates, hidden, batch, steps,
                                                                  0.1, dtype, load_bytes=16)
    assert w.meta_t.load_bytes == 16, w.meta_t
    # operands: step-ordered [T, B, .] sequences, then [B, H] carries (and the GRU's hn_bias)
    axes = tuple(1 if a.ndim == 3 else (0 if a.ndim == 2 else None) for a in operands)

    def call(*args):
        return testing.run_gated_backward(gates, w, kernel, args[:-1], args[-1], method="native")

    for part in (PLANE, 1):
        assert_two_plane_passes_match_one_plane_calls(call, (*operands, lengths), (*axes, 0), batch, part)


def test_the_two_plane_kernels_exist_for_every_tile_4_variant():
    cuda = _native.cuda_module()
    for gates in (1, 3, 4):
        for dtype in ("float16", "float32"):
            for backward in (False, True):
                for rs in cuda.supported_reg_slots(dtype, gates):
                    one = cuda.kernel_attributes(dtype, 4, rs, gates=gates, backward=backward)
                    two = cuda.kernel_attributes(dtype, 4, rs, gates=gates, backward=backward,
                                                 planes_per_pass=2)
                    # The same launch bound and no more static shared memory: the handler's plan,
                    # made for the one-plane kernel, holds for it (the handler's condition for
                    # taking it: a dynamic limit at least the one-plane kernel's).
                    assert two["max_threads_per_block"] == one["max_threads_per_block"], (gates, rs)
                    assert two["static_smem_bytes"] <= one["static_smem_bytes"], (gates, rs)
    with pytest.raises(Exception, match="plane"):
        cuda.kernel_attributes("float16", 2, 0, planes_per_pass=2)
