"""The gradual pruning schedule of Zhu & Gupta (2017), "To prune, or not to prune"
(arXiv:1710.01878): the target sparsity of every step."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class CubicSchedule:
    """Zhu & Gupta (2017), eq. 1: from ``begin_step`` to ``end_step`` the target sparsity rises as

        s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (end_step - t_0)) ** power

    and is recomputed only every ``frequency`` steps (in between it holds). Before ``begin_step``
    it is ``initial_sparsity``; from ``end_step`` on, ``final_sparsity``. Pruning fast early, while
    there are many redundant weights, and slowly near the end lets the network recover.
    """

    initial_sparsity: float
    final_sparsity: float
    begin_step: int
    end_step: int
    frequency: int = 1
    power: float = 3.0

    def __post_init__(self):
        for name in ("begin_step", "end_step", "frequency"):  # 1.7 steps is a mistake, not step 1
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not float(value).is_integer():
                raise ValueError(f"{name} must be a whole number of steps, got {value!r}")
            object.__setattr__(self, name, int(value))
        for name in ("initial_sparsity", "final_sparsity"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.final_sparsity < self.initial_sparsity:
            raise ValueError(f"final_sparsity ({self.final_sparsity}) must be at least "
                             f"initial_sparsity ({self.initial_sparsity})")
        if self.begin_step < 0 or self.end_step < self.begin_step:
            raise ValueError(f"need 0 <= begin_step <= end_step, got begin_step={self.begin_step}, "
                             f"end_step={self.end_step}")
        if self.frequency < 1:
            raise ValueError(f"frequency must be at least 1, got {self.frequency}")
        if self.power <= 0:
            raise ValueError(f"power must be positive, got {self.power}")

    def __call__(self, step):
        """The target sparsity at ``step`` (a Python float for an int step; a traced scalar works)."""
        xp = np if isinstance(step, (int, np.integer)) else jnp
        t = xp.clip(step, self.begin_step, self.end_step)
        # Hold the value of the last update step at or before t.
        t = self.begin_step + ((t - self.begin_step) // self.frequency) * self.frequency
        span = max(self.end_step - self.begin_step, 1)
        frac = xp.where(step >= self.end_step, 1.0, (t - self.begin_step) / span)
        value = (self.final_sparsity + (self.initial_sparsity - self.final_sparsity) *
                 (1.0 - frac) ** self.power)
        # up to the first update after begin_step, exactly initial_sparsity (not s_f + (s_i - s_f))
        value = xp.where((t == self.begin_step) & (step < self.end_step), self.initial_sparsity, value)
        return float(value) if xp is np else value

    def is_update_step(self, step: int) -> bool:
        """Whether the masks should be recomputed at ``step``: every ``frequency`` steps from
        ``begin_step``, and at ``end_step`` so the final sparsity is reached exactly."""
        if not float(step).is_integer():
            raise ValueError(f"step must be a whole number, got {step!r}")
        step = int(step)
        if step < self.begin_step or step > self.end_step:
            return False
        return (step - self.begin_step) % self.frequency == 0 or step == self.end_step


def cubic_schedule(initial_sparsity: float, final_sparsity: float, begin_step: int, end_step: int,
                   frequency: int = 1, *, power: float = 3.0) -> CubicSchedule:
    """The gradual pruning schedule of Zhu & Gupta (2017); see :class:`CubicSchedule`."""
    return CubicSchedule(float(initial_sparsity), float(final_sparsity), begin_step, end_step,
                         frequency, float(power))
