"""Log-mel features in JAX: frame, window, ``jnp.fft.rfft``, a mel filterbank, log, normalize.

The filterbank is the usual triangular one on the HTK mel scale, ``mel(f) = 2595 log10(1 + f/700)``
(as in HTK and ``librosa.filters.mel(htk=True)`` without area normalization). Each utterance's
features are normalized to zero mean and unit variance per mel channel over its own valid frames
(cepstral mean and variance normalization), which also makes the model blind to the recording gain.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

LOG_FLOOR = 1e-6  # added to the mel power before the log: digital silence stays finite


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """Framing and filterbank settings. The defaults are the speech-recognition usual: 25 ms
    Hann windows every 10 ms."""

    sample_rate: int = 16_000
    n_mels: int = 40
    window_ms: float = 25.0
    hop_ms: float = 10.0
    fmin: float = 20.0
    fmax: float | None = None  # default: the Nyquist frequency

    def __post_init__(self):
        if self.sample_rate < 1000:
            raise ValueError(f"sample_rate must be at least 1000 Hz, got {self.sample_rate}")
        if self.n_mels < 1:
            raise ValueError(f"n_mels must be positive, got {self.n_mels}")
        if not 0 < self.hop_ms <= self.window_ms:
            raise ValueError(f"need 0 < hop_ms <= window_ms, got {self.hop_ms}, {self.window_ms}")

    @property
    def window(self) -> int:
        return int(round(self.sample_rate * self.window_ms / 1000))

    @property
    def hop(self) -> int:
        return int(round(self.sample_rate * self.hop_ms / 1000))

    @property
    def n_fft(self) -> int:
        return 1 << (self.window - 1).bit_length()

    def num_frames(self, num_samples):
        """Frames of ``num_samples`` samples (works on ints and integer arrays)."""
        return np.maximum(0, (np.asarray(num_samples) - self.window) // self.hop + 1)


def hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=8)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 20.0,
                   fmax: float | None = None) -> np.ndarray:
    """``[n_fft // 2 + 1, n_mels]`` triangular filters, equally spaced on the HTK mel scale.

    Filter ``m`` rises from centre ``m - 1`` to centre ``m`` and falls to centre ``m + 1``, where
    the ``n_mels + 2`` centres span ``[fmin, fmax]`` evenly in mels.
    """
    fmax = sample_rate / 2 if fmax is None else fmax
    if not 0 <= fmin < fmax <= sample_rate / 2:
        raise ValueError(f"need 0 <= fmin < fmax <= sample_rate / 2, got {fmin}, {fmax}")
    centres = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    lower, centre, upper = centres[:-2], centres[1:-1], centres[2:]
    rising = (freqs[:, None] - lower) / (centre - lower)
    falling = (upper - freqs[:, None]) / (upper - centre)
    bank = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
    bank.setflags(write=False)
    return bank


def log_mel(waves, lengths, config: FeatureConfig):
    """Normalized log-mel features of a batch of padded waveforms.

    Args:
      waves: ``[B, N]`` float samples, zero-padded past each utterance.
      lengths: ``[B]`` valid samples per utterance.
      config: a :class:`FeatureConfig` (static).

    Returns:
      ``(features [B, T, n_mels], frames [B])``, ``T = config.num_frames(N)``; features past an
      utterance's ``frames`` are zero.
    """
    waves = jnp.asarray(waves, jnp.float32)
    n = waves.shape[1]
    steps = int(config.num_frames(n))
    if steps < 1:
        raise ValueError(f"waves of {n} samples are shorter than one window ({config.window})")
    index = (np.arange(steps)[:, None] * config.hop + np.arange(config.window)[None, :])
    window = np.hanning(config.window + 1)[:-1].astype(np.float32)  # periodic Hann
    frames = waves[:, index] * window                                # [B, T, window]
    spectrum = jnp.fft.rfft(frames, n=config.n_fft, axis=-1)
    power = jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2
    bank = mel_filterbank(config.sample_rate, config.n_fft, config.n_mels, config.fmin,
                          config.fmax)
    feats = jnp.log(power @ bank + LOG_FLOOR)                        # [B, T, n_mels]

    num = jnp.maximum(0, (jnp.asarray(lengths) - config.window) // config.hop + 1)
    valid = (jnp.arange(steps)[None, :] < num[:, None])[..., None]
    count = jnp.maximum(num, 1)[:, None, None].astype(jnp.float32)
    mean = jnp.sum(jnp.where(valid, feats, 0.0), axis=1, keepdims=True) / count
    var = jnp.sum(jnp.where(valid, (feats - mean) ** 2, 0.0), axis=1, keepdims=True) / count
    feats = (feats - mean) * jax.lax.rsqrt(var + 1e-5)
    return jnp.where(valid, feats, 0.0), num.astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class SpecAugment:
    """SpecAugment's masking (Park et al., 2019), without time warping: ``freq_masks`` bands of up
    to ``freq_width`` mel channels and ``time_masks`` spans of up to ``time_fraction`` of each
    utterance's frames are set to zero (the mean, after normalization). For training only."""

    freq_masks: int = 2
    freq_width: int = 6
    time_masks: int = 2
    time_fraction: float = 0.08

    def __call__(self, feats, frames, key):
        batch, steps, channels = feats.shape
        k_fw, k_fs, k_tw, k_ts = jax.random.split(key, 4)
        freq = _bands(k_fw, k_fs, self.freq_masks, jnp.full((batch,), channels),
                      jnp.full((batch,), self.freq_width), channels)           # [B, F]
        limit = jnp.asarray(frames, jnp.int32)
        cap = jnp.floor(self.time_fraction * limit).astype(jnp.int32)
        time = _bands(k_tw, k_ts, self.time_masks, limit, cap, steps)          # [B, T]
        return jnp.where(freq[:, None, :] | time[:, :, None], 0.0, feats)


def _bands(key_width, key_start, count: int, length, max_width, axis_len: int):
    """``[B, axis_len]`` booleans: ``count`` random spans per row, each of a width drawn from
    ``[0, max_width[b]]`` and lying inside ``[0, length[b])``."""
    batch = length.shape[0]
    if count == 0:
        return jnp.zeros((batch, axis_len), bool)
    width = jax.random.randint(key_width, (batch, count), 0, max_width[:, None] + 1)
    room = jnp.maximum(length[:, None] - width, 0)
    start = jnp.floor(jax.random.uniform(key_start, (batch, count)) * (room + 1)).astype(jnp.int32)
    pos = jnp.arange(axis_len)[None, None, :]
    inside = (pos >= start[..., None]) & (pos < (start + width)[..., None])
    return jnp.any(inside, axis=1)
