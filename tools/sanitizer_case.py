"""A small persistent-kernel run for compute-sanitizer (tools/gpu_check.sh sanitize)."""
import jax
import jax.numpy as jnp
import numpy as np

import jax_sprnn as js

rng = np.random.default_rng(0)
for hidden, batch, dtype in ((300, 3, jnp.float16), (97, 1, jnp.float32), (200, 5, jnp.bfloat16)):
    kernel = rng.standard_normal((hidden, hidden)).astype(np.float32) / np.sqrt(0.2 * hidden)
    w = js.SparseWeights.from_dense(kernel, density=0.2, dtype=dtype)
    x = jnp.asarray(rng.standard_normal((batch, 20, hidden)), dtype)
    h0 = jnp.zeros((batch, hidden), dtype)
    lengths = np.minimum(20, rng.integers(0, 25, size=batch)).astype(np.int32)
    y, h = js.sparse_rnn(x, h0, w, method="native", seq_lengths=lengths, reverse=bool(batch % 2))
    ref, _ = js.reference_rnn(x, h0, w.to_dense(), seq_lengths=lengths, reverse=bool(batch % 2))
    err = float(jnp.linalg.norm((y - ref).astype(jnp.float32)) / jnp.linalg.norm(ref.astype(jnp.float32)))
    print(hidden, batch, np.dtype(dtype).name, "rel_err", err)
    assert err < 2e-2
