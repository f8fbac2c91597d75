"""cluster: small and medium layers in cluster mode (issue 16) against the grid mode and the peers.

Per case, on the same layer and inputs in the same run:
* ``ours``: ``sparse_rnn(method="native")`` on the layout the planner picks (cluster mode where it
  estimates a faster step: H <= 1024 at 10%);
* ``grid_mode``: the same layout with the grid exchange forced (the hooked target's
  ``exchange_mode="grid"``): what the cluster exchange alone gains;
* ``grid_layout``: the layout planned for a GPU without clusters (spread over every SM, the kernel
  before cluster mode);
* the default peers: dense ``lax.scan``, cuDNN ``nn.RNN``, the CUDA-graph loop, and the sync floor.

Targets (issue 16, fp16): <= 1.0 µs per step at H = 256-1024, 10%, B <= 8; faster than cuDNN's
persistent kernel at (1024, 10%, 8) and (256, 10%, 1-8); at B=32 >= 1.0x cuDNN and >= 3x lax.scan.
"""

from __future__ import annotations

import jax_sprnn as js

from .. import plots
from ..harness import Peer, Skip
from ..peers_jax import ALL_DTYPES, forward_primitive_runner, pack_without_clusters
from ..problems import Layer
from .common import Context, case_columns, case_row, print_skips

CONFIGS = [(h, 0.1, b, "float16") for h in (256, 512, 1024) for b in (1, 4, 8, 32)]
# The speech example's recurrent layer (H=256, fp32), and denser or wider neighbours.
MORE = [(256, 0.1, 1, "float32"), (256, 0.1, 8, "float32"), (1024, 0.3, 8, "float16"),
        (1152, 0.1, 8, "float16"), (512, 0.1, 64, "float16")]
QUICK = [(256, 0.1, 1, "float16"), (256, 0.1, 8, "float16"), (512, 0.1, 4, "float16"),
         (1024, 0.1, 8, "float16"), (1024, 0.1, 32, "float16"), (256, 0.1, 1, "float32")]
SMOKE = [(64, 0.2, 2, "float16")]

_PACKED: dict = {}


def _packed_on(layer: Layer, sm_count: int | None) -> js.SparseWeights:
    """``peers_jax.pack_without_clusters``, cached per layer; skipped where it does not fit."""
    key = (layer.hidden, layer.density, layer.dtype, sm_count)
    if key not in _PACKED:
        try:
            _PACKED[key] = pack_without_clusters(layer, sm_count)
        except ValueError as e:
            raise Skip(str(e)) from e
    return _PACKED[key]


def _grid_layout(layer: Layer) -> js.SparseWeights:
    return _packed_on(layer, None)


def _forced(name: str, weights, exchange_mode: str) -> Peer:
    def build(layer: Layer, batch: int, T: int):
        w = weights(layer)
        runner = forward_primitive_runner(layer, batch, T, w, exchange_mode=exchange_mode)
        runner.info.update(exchange=w.meta.exchange, ctas=w.meta.num_ctas,
                           warps_per_cta=w.meta.warps_per_cta, K=w.meta.slots_per_lane)
        return runner

    return Peer(name, f"{weights.__doc__}, exchange_mode={exchange_mode}", ALL_DTYPES, build,
                competitor=False)


def _planned(layer: Layer) -> js.SparseWeights:
    """the planned layout"""
    return layer.weights


_grid_layout.__doc__ = "the layout planned without clusters"


def _on(n: int):
    def weights(layer: Layer) -> js.SparseWeights:
        return _packed_on(layer, n)
    weights.__doc__ = f"a layout of at most {n} CTAs"
    return weights


PEERS = [_forced("grid_mode", _planned, "grid"), _forced("grid_layout", _grid_layout, "auto")]
#: The cluster-size sweep (--peers or SWEEP_SIZES): the same layer on 1-16 CTAs, in cluster mode.
SIZES = [_forced(f"n{n}", _on(n), "cluster") for n in (1, 2, 4, 8, 12, 16)]


def configs(ctx: Context) -> list[tuple]:
    """``(H, density, B, dtype)`` of the cases; --hidden/--batch/--density/--dtype replace the
    grid's values (and drop its extra cases)."""
    if not (ctx.hidden or ctx.batch or ctx.density or ctx.dtype):
        return SMOKE if ctx.smoke else QUICK if ctx.quick else CONFIGS + MORE
    return [(h, d, b, t) for t in ctx.dtype or ("float16",) for h in ctx.hidden or (256, 512, 1024)
            for d in ctx.density or (0.1,) for b in ctx.batch or (1, 4, 8, 32)]


def run(ctx: Context) -> None:
    peers = [*ctx.peers[:1], *PEERS, *SIZES, *ctx.peers[1:]]  # ours, the grid variants, the sizes
    seen: set = set()
    for hidden, density, batch, dtype in configs(ctx):
        if ctx.over_budget():
            ctx.recorder.add(dict(hidden=hidden, density=density, batch=batch, dtype=dtype,
                                  not_run="time budget"))
            continue
        layer = Layer.make(hidden, density, dtype)
        meta = layer.weights.meta
        row = case_row(ctx, layer, batch, peers=peers, exchange=meta.exchange, ctas=meta.num_ctas)
        ctx.recorder.add(row)
        print_skips(row, seen)
    ctx.recorder.set(plots=[str(plots.per_step_bars(
        ctx.recorder.rows, ctx.out_dir / "cluster.png", "µs per step: cluster mode, grid mode, peers"))])


def columns(peers):
    return case_columns([*peers[:1], *PEERS, *SIZES, *peers[1:]])
