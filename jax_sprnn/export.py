"""Deployment with ``jax.export``: what a serialized program that calls jax_sprnn needs.

jax.export refuses custom calls that have no compatibility guarantee unless the caller disables that
check per target. Our targets are stable within a jax_sprnn release; the process that deserializes
the program must have imported ``jax_sprnn`` (which registers the targets) before calling it.

    exported = jax.export.export(jitted, disabled_checks=jax_sprnn.export.disabled_checks())(*args)
    blob = exported.serialize()
    # elsewhere: import jax_sprnn; jax.export.deserialize(blob).call(*args)

Serializing needs flatbuffers (``pip install 'jax_sprnn[export]'``).
"""

from __future__ import annotations

from jax import export as _export

from ._native import TARGETS


def disabled_checks() -> list:
    """The ``disabled_checks`` that let ``jax.export.export`` serialize calls to our targets."""
    return [_export.DisabledSafetyCheck.custom_call(name) for name in TARGETS]
