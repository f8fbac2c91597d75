"""Log-mel features in JAX: frame, window, ``jnp.fft.rfft``, a mel filterbank, log, normalize; and
the training augmentations, also in JAX so that they run on the device inside the jitted step:
noise and gain on the waveform (:class:`Augmenter`), SpecAugment on the features.

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


@dataclasses.dataclass(frozen=True)
class Augmenter:
    """Random additive noise and gain on a batch of padded waveforms, drawn afresh for every
    utterance of every step (from the step's key).

    Noise is white, pink (1/f) or brown (1/f^2), at a signal-to-noise ratio drawn uniformly in
    ``snr_db`` (in dB, against the utterance's mean power over its loud part: samples above 1% of
    its peak) with probability ``noise_prob``. Then the gain, uniform in ``gain_db``, scales speech
    and noise together. Samples past each utterance's length stay zero.
    """

    noise_prob: float = 0.5
    snr_db: tuple[float, float] = (10.0, 40.0)
    gain_db: tuple[float, float] = (-12.0, 6.0)

    def __post_init__(self):
        if not 0.0 <= self.noise_prob <= 1.0:
            raise ValueError(f"noise_prob must be in [0, 1], got {self.noise_prob}")
        for name in ("snr_db", "gain_db"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {(lo, hi)}")

    def __call__(self, waves, lengths, key):
        """``waves [B, N]`` (zero past ``lengths [B]``) with noise and gain; ``key``: a PRNG key."""
        waves = jnp.asarray(waves, jnp.float32)
        batch, n = waves.shape
        k_noise, k_use, k_snr, k_color, k_gain = jax.random.split(key, 5)
        valid = jnp.arange(n)[None, :] < jnp.asarray(lengths)[:, None]
        magnitude = jnp.abs(waves)
        loud = valid & (magnitude > 0.01 * jnp.max(magnitude, axis=1, keepdims=True))
        loud = jnp.where(jnp.any(loud, axis=1, keepdims=True), loud, valid)  # silence: all of it
        power = (jnp.sum(jnp.where(loud, waves ** 2, 0.0), axis=1)
                 / jnp.maximum(jnp.sum(loud, axis=1), 1))
        exponent = jax.random.randint(k_color, (batch,), 0, 3).astype(jnp.float32)
        noise = colored_noise(k_noise, exponent, n, valid)
        snr = jax.random.uniform(k_snr, (batch,), minval=self.snr_db[0], maxval=self.snr_db[1])
        use = jax.random.uniform(k_use, (batch,)) < self.noise_prob
        level = jnp.where(use, jnp.sqrt(power / 10.0 ** (snr / 10.0)), 0.0)
        gain = 10.0 ** (jax.random.uniform(k_gain, (batch,), minval=self.gain_db[0],
                                           maxval=self.gain_db[1]) / 20.0)
        return jnp.where(valid, (waves + level[:, None] * noise) * gain[:, None], 0.0)


def colored_noise(key, exponent, n: int, valid):
    """``[B, n]`` noise whose power spectrum falls as ``1 / f ** exponent[b]`` (0 white, 1 pink,
    2 brown), of unit power over each row's ``valid`` samples: white Gaussian noise shaped in the
    frequency domain (at a power-of-two length, cropped to ``n``)."""
    size = 1 << max(0, (n - 1).bit_length())
    spectrum = jnp.fft.rfft(jax.random.normal(key, (exponent.shape[0], size)), axis=-1)
    freqs = np.arange(size // 2 + 1, dtype=np.float32)
    freqs[0] = 1.0
    shaped = spectrum * jnp.power(freqs[None, :], -exponent[:, None] / 2)
    noise = jnp.fft.irfft(shaped, n=size, axis=-1)[:, :n]
    rms = jnp.sqrt(jnp.sum(jnp.where(valid, noise ** 2, 0.0), axis=1, keepdims=True)
                   / jnp.maximum(jnp.sum(valid, axis=1, keepdims=True), 1))
    return noise / jnp.maximum(rms, 1e-12)
