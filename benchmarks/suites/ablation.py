"""ablation: the paper's Table 1 on this GPU. Each row adds one optimization to the persistent
forward kernel, on the same layer and inputs, in the same run:

1. naive: 4-byte loads of the staged state (one example per load), unordered slots, and a grid-wide
   barrier before every step (the kernel's ``grid_barrier`` ablation knob);
2. + wide loads: 16-byte loads (a batch tile of 4 examples per load);
3. + bank-aware order: the packer's conflict-aware slot order;
4. + timestamps: Lamport-tagged words instead of the grid barrier (the shipped kernel).

Every variant is checked against the float32 reference; the synchronization floor is measured too.
"""

from __future__ import annotations

import jax

import jax_sprnn as js
from jax_sprnn.layout import bank_conflicts

from .. import plots
from ..harness import Peer
from ..peers_jax import ALL_DTYPES, FLOOR, forward_primitive_runner
from ..problems import Layer
from .common import Context, case_columns, case_row, print_skips

# (load_bytes, bank_aware, grid_barrier) per step of the table
VARIANTS = {
    "naive": (4, False, True),
    "wide": (16, False, True),
    "bank": (16, True, True),
    "ours": (16, True, False),  # + timestamps: the shipped kernel
}
CONFIGS = [(1152, 0.1, 4, "float16"), (2304, 0.1, 4, "float16")]
MORE = [(4608, 0.1, 4, "float16"), (2304, 0.3, 4, "float16")]
SMOKE = [(64, 0.2, 4, "float16")]


_PACKED: dict = {}


def _packed(layer: Layer, load_bytes: int, bank_aware: bool) -> js.SparseWeights:
    """The layer packed one way, once per run (both sequence lengths share it)."""
    key = (layer.hidden, layer.density, layer.dtype, load_bytes, bank_aware)  # layers are seeded by these
    if key not in _PACKED:
        _PACKED[key] = js.SparseWeights.from_dense(layer.kernel, layer.mask, dtype=layer.jnp_dtype,
                                                   load_bytes=load_bytes, bank_aware=bank_aware)
    return _PACKED[key]


def _variant(name: str) -> Peer:
    load_bytes, bank_aware, grid_barrier = VARIANTS[name]

    def build(layer: Layer, batch: int, T: int):
        w = _packed(layer, load_bytes, bank_aware)
        runner = forward_primitive_runner(layer, batch, T, w, grid_barrier=grid_barrier)
        runner.info.update(bank_conflicts=bank_conflicts(jax.device_get(w.indices), load_bytes))
        return runner

    return Peer(name, f"load_bytes={load_bytes}, bank_aware={bank_aware}, "
                      f"{'grid barrier' if grid_barrier else 'timestamps'}",
                ALL_DTYPES, build, competitor=name != "ours")


PEERS = [_variant(name) for name in VARIANTS]


def run(ctx: Context) -> None:
    peers = [*PEERS, FLOOR]
    seen: set = set()
    for hidden, density, batch, dtype in SMOKE if ctx.smoke else CONFIGS + ([] if ctx.quick else MORE):
        if ctx.over_budget():
            ctx.recorder.add(dict(hidden=hidden, density=density, batch=batch, dtype=dtype,
                                  not_run="time budget"))
            continue
        row = case_row(ctx, Layer.make(hidden, density, dtype), batch, peers=peers)
        ctx.recorder.add(row)
        print_skips(row, seen)
    ctx.recorder.set(plots=[str(plots.per_step_bars(
        ctx.recorder.rows, ctx.out_dir / "ablation.png", "µs per step, one optimization at a time"))])


def columns(peers):
    # "best"/"x best": the best variant without timestamps, and what the timestamps gain over it
    return [c for c in case_columns([*PEERS, FLOOR]) if c.header != "auto"]
