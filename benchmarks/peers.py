"""Every peer by name, in the order tables list them."""

from __future__ import annotations

from . import peers_jax, peers_torch

ALL = {p.name: p for p in (*peers_jax.PEERS, *peers_torch.PEERS)}


def select(names: str | None, default=tuple(ALL)):
    """Peers named in a comma-separated list (None: ``default``), in table order."""
    wanted = default if names is None else [n.strip() for n in names.split(",") if n.strip()]
    unknown = sorted(set(wanted) - set(ALL))
    if unknown:
        raise SystemExit(f"unknown peers {unknown}; known: {', '.join(ALL)}")
    return [p for name, p in ALL.items() if name in wanted]
