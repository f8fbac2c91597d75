"""One persistent-kernel configuration, run a few times, for Nsight Compute (tools/gpu_check.sh profile).

    python3 tools/profile_case.py HIDDEN DENSITY BATCH DTYPE STEPS
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_sprnn as js

hidden, density, batch, dtype, steps = (int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]),
                                        sys.argv[4], int(sys.argv[5]))
rng = np.random.default_rng(0)
kernel = (rng.standard_normal((hidden, hidden)) / np.sqrt(density * hidden)).astype(np.float32)
w = js.SparseWeights.from_dense(kernel, density=density, dtype=jnp.dtype(dtype))
print(w)
x = jnp.asarray(rng.standard_normal((batch, steps, hidden)), dtype)
h0 = jnp.zeros((batch, hidden), dtype)
f = jax.jit(lambda x, h0: js.sparse_rnn(x, h0, w, method="native"))
for _ in range(4):
    jax.block_until_ready(f(x, h0))
