"""Corpora, audio, augmentation and batches.

Three sources, picked by ``--data``:

* ``embedded``: the corpus committed in ``examples/speech/corpus`` (built by ``make_corpus.py``);
  it is a manifest corpus.
* ``manifest``: a folder with ``train.tsv``, ``valid.tsv`` and ``test.tsv`` (other names with
  ``--splits``). One utterance per line: ``audio path<TAB>transcript``; paths are relative to the
  manifest's folder (or absolute); lines starting with ``#`` are comments.
* ``librispeech``: a LibriSpeech-format root whose split folders (``train-clean-100``,
  ``dev-clean``, ``test-clean`` by default) hold ``speaker/chapter/*.flac`` and
  ``speaker-chapter.trans.txt`` (``utterance-id TRANSCRIPT`` lines).

Audio is decoded with soundfile (any format libsndfile reads: FLAC, Ogg/Opus, WAV, ...), mixed to
mono and resampled to the model's rate when it differs. Batches are plain padded audio: the random
noise and gain of training (``features.Augmenter``) are applied on the device, inside the jitted
step, so the host's work per step is a copy.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
from pathlib import Path

import numpy as np

from . import text as text_lib
from .features import FeatureConfig

EMBEDDED = Path(__file__).resolve().parent / "corpus"
DATA_KINDS = ("embedded", "manifest", "librispeech")
DEFAULT_SPLITS = {"embedded": ("train", "valid", "test"), "manifest": ("train", "valid", "test"),
                  "librispeech": ("train-clean-100", "dev-clean", "test-clean")}
SPLIT_ROLES = ("train", "valid", "test")


class DataError(ValueError):
    """A corpus that cannot be read as asked; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class Utterance:
    path: Path
    text: str  # normalized (text.normalize)


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------

def read_manifest(path) -> list[Utterance]:
    """Utterances of a ``path<TAB>transcript`` manifest (paths relative to its folder)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest {path} not found")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        audio, sep, transcript = line.partition("\t")
        if not sep:
            raise DataError(f"{path}:{number}: expected 'audio path<TAB>transcript', got {line!r}")
        audio_path = Path(audio.strip())
        out.append(Utterance(audio_path if audio_path.is_absolute() else path.parent / audio_path,
                             text_lib.normalize(transcript)))
    if not out:
        raise DataError(f"manifest {path} lists no utterances")
    return out


def read_librispeech(folder) -> list[Utterance]:
    """Utterances of one LibriSpeech split folder (``*.trans.txt`` beside the ``.flac`` files)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"LibriSpeech split folder {folder} not found")
    out = []
    for trans in sorted(folder.rglob("*.trans.txt")):
        for number, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            utt_id, _, transcript = line.partition(" ")
            if not transcript:
                raise DataError(f"{trans}:{number}: expected 'UTTERANCE-ID TRANSCRIPT', got {line!r}")
            out.append(Utterance(trans.parent / f"{utt_id}.flac", text_lib.normalize(transcript)))
    if not out:
        raise DataError(f"no *.trans.txt files under {folder}: is it a LibriSpeech split folder "
                        "(e.g. LibriSpeech/dev-clean)?")
    return out


def load_corpus(kind: str, data_dir=None, splits=None) -> dict[str, list[Utterance]]:
    """``{"train": [...], "valid": [...], "test": [...]}`` for a ``--data`` choice.

    ``splits``: the names of the train, validation and test splits in the corpus (manifest file
    stems, or LibriSpeech folder names); default :data:`DEFAULT_SPLITS`.
    """
    if kind not in DATA_KINDS:
        raise DataError(f"--data must be one of {', '.join(DATA_KINDS)}, got {kind!r}")
    if kind == "embedded":
        if data_dir is not None:
            raise DataError("--data-dir is for --data manifest or librispeech; the embedded corpus "
                            f"lives in {EMBEDDED}")
        data_dir = EMBEDDED
        if not (data_dir / "train.tsv").is_file():
            raise DataError(f"the embedded corpus is missing from {data_dir}; rebuild it with "
                            "python examples/speech/make_corpus.py (needs espeak-ng)")
    elif data_dir is None:
        raise DataError(f"--data {kind} needs --data-dir (the corpus folder)")
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} is not a folder")
    names = tuple(DEFAULT_SPLITS[kind] if splits is None else splits)
    if len(names) != 3:
        raise DataError(f"--splits needs three names (train, valid, test), got {list(names)}")
    if kind == "librispeech":
        return {role: read_librispeech(data_dir / name) for role, name in zip(SPLIT_ROLES, names)}
    return {role: read_manifest(data_dir / f"{name}.tsv") for role, name in zip(SPLIT_ROLES, names)}


# ---------------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------------

def load_audio(path, sample_rate: int) -> np.ndarray:
    """Mono float32 samples at ``sample_rate`` (resampled with a polyphase filter if needed)."""
    import soundfile as sf

    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types; the path is what the user needs
        raise DataError(f"cannot decode {path}: {e} (Ogg/Opus needs libsndfile >= 1.0.29, which "
                        "the soundfile >= 0.12 wheels bundle)") from e
    audio = audio.mean(axis=1)
    if rate != sample_rate:
        from scipy.signal import resample_poly  # scipy comes with jax

        g = math.gcd(sample_rate, rate)
        audio = resample_poly(audio, sample_rate // g, rate // g).astype(np.float32)
    return audio


def audio_length(path, sample_rate: int) -> int:
    """Samples of ``path`` at ``sample_rate``, from the file header (no decoding)."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except Exception as e:
        raise DataError(f"cannot read {path}: {e}") from e
    return int(math.ceil(info.frames * sample_rate / info.samplerate))


class AudioSet:
    """The utterances of one split with their lengths, audio kept in memory (``cache``) or decoded
    on demand. Cached audio is stored as int16, half the memory of float32; the embedded corpus
    takes about 200 MB."""

    def __init__(self, utterances: list[Utterance], sample_rate: int, *, cache: bool,
                 jobs: int | None = None):
        self.utterances = list(utterances)
        self.sample_rate = sample_rate
        self.texts = [u.text for u in self.utterances]
        self.labels = [text_lib.encode(t) for t in self.texts]
        jobs = jobs or min(16, os.cpu_count() or 1)
        paths = [u.path for u in self.utterances]
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise DataError(f"{len(missing)} audio files are missing, e.g. {missing[0]}")
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:  # libsndfile releases the GIL
            if cache:
                self._audio = list(pool.map(self._load_int16, paths))
                self.lengths = np.array([a.size for a in self._audio], np.int64)
            else:
                self._audio = None
                self.lengths = np.array(list(pool.map(
                    lambda p: audio_length(p, sample_rate), paths)), np.int64)

    def _load_int16(self, path) -> np.ndarray:
        audio = load_audio(path, self.sample_rate)
        return np.round(np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)

    def __len__(self) -> int:
        return len(self.utterances)

    def audio(self, i: int) -> np.ndarray:
        if self._audio is not None:
            return self._audio[i].astype(np.float32) / 32767
        return load_audio(self.utterances[i].path, self.sample_rate)

    def subset(self, keep) -> "AudioSet":
        """A view with only the utterances at indices ``keep``."""
        keep = np.asarray(keep, np.int64)
        new = object.__new__(AudioSet)
        new.utterances = [self.utterances[i] for i in keep]
        new.sample_rate = self.sample_rate
        new.texts = [self.texts[i] for i in keep]
        new.labels = [self.labels[i] for i in keep]
        new._audio = None if self._audio is None else [self._audio[i] for i in keep]
        new.lengths = self.lengths[keep]
        return new


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Batch:
    """Padded arrays of one batch (NumPy); rows past ``size`` are filler with length 0."""

    waves: np.ndarray          # [B, N] float32
    wave_lengths: np.ndarray   # [B] int32
    labels: np.ndarray         # [B, L] int32, 0 past each label
    label_lengths: np.ndarray  # [B] int32
    texts: list[str]           # the real rows' transcripts
    size: int                  # real rows


BUCKET_QUANTUM_SECONDS = 0.1  # bucket bounds are multiples of this


def bucket_bounds(lengths, count: int, min_size: int, quantum: int) -> np.ndarray:
    """The padded length of each of ``lengths``: at most ``count`` buckets whose upper bounds
    (multiples of ``quantum``) minimize the total padding, each holding at least ``min_size``
    lengths where that is possible (fewer buckets otherwise). Dynamic programming over the
    distinct rounded lengths, so it is instant for any corpus size."""
    lengths = np.asarray(lengths, np.int64)
    rounded = np.maximum(1, -(-lengths // quantum)) * quantum
    bounds, inverse = np.unique(rounded, return_inverse=True)
    counts = np.bincount(inverse, minlength=bounds.size)
    sums = np.bincount(inverse, weights=lengths.astype(np.float64), minlength=bounds.size)
    n_pre = np.concatenate([[0], np.cumsum(counts)])
    s_pre = np.concatenate([[0.0], np.cumsum(sums)])
    n = bounds.size
    buckets = max(1, min(count, n))
    # cost[k, j]: the least padding of the first j distinct lengths in k buckets, the last ending
    # at bound j - 1; start[k, j]: where that last bucket starts
    cost = np.full((buckets + 1, n + 1), np.inf)
    start = np.zeros((buckets + 1, n + 1), np.int64)
    cost[0, 0] = 0.0
    for k in range(1, buckets + 1):
        for j in range(1, n + 1):
            i = np.arange(j)
            size = n_pre[j] - n_pre[i]
            total = cost[k - 1, i] + size * bounds[j - 1] - (s_pre[j] - s_pre[i])
            total = np.where(size >= min_size, total, np.inf)
            start[k, j] = int(np.argmin(total))
            cost[k, j] = total[start[k, j]]
    k_best = int(np.argmin(cost[1:, n])) + 1
    if not np.isfinite(cost[k_best, n]):  # fewer than min_size lengths in all: one bucket
        return np.full(lengths.shape, bounds[-1])
    upper, j = [], n
    for k in range(k_best, 0, -1):
        upper.append(bounds[j - 1])
        j = start[k, j]
    upper = np.array(sorted(upper))
    return upper[np.searchsorted(upper, rounded)]


class Batcher:
    """Length-bucketed batches of one :class:`AudioSet`.

    Waveforms are padded to their bucket's length and labels to the longest label of the bucket
    (over the whole set), so a jitted step compiles once per bucket, not per batch. By default
    there are ``buckets`` buckets whose bounds minimize the padding (:func:`bucket_bounds`):
    each costs a compilation of every jitted function that sees it, and fewer buckets mean more
    padding. ``bucket_seconds`` instead pads to multiples of that many seconds (one bucket per
    multiple in use). ``pad_to`` (samples) pads every batch to that one length.
    """

    def __init__(self, audio: AudioSet, batch_size: int, *, buckets: int = 3,
                 bucket_seconds: float | None = None, pad_to: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if buckets < 1:
            raise ValueError(f"buckets must be positive, got {buckets}")
        if len(audio) == 0:
            raise DataError("a split has no usable utterances")
        self.audio = audio
        self.batch_size = batch_size
        if pad_to is not None:
            if pad_to < audio.lengths.max():
                raise ValueError(f"pad_to={pad_to} is shorter than the longest utterance "
                                 f"({audio.lengths.max()} samples)")
            self.padded_lengths = np.full(audio.lengths.shape, int(pad_to))
        elif bucket_seconds is not None:
            if bucket_seconds <= 0:
                raise ValueError(f"bucket_seconds must be positive, got {bucket_seconds}")
            quantum = max(1, int(round(bucket_seconds * audio.sample_rate)))
            self.padded_lengths = np.maximum(1, -(-audio.lengths // quantum)) * quantum
        else:
            quantum = max(1, int(round(BUCKET_QUANTUM_SECONDS * audio.sample_rate)))
            self.padded_lengths = bucket_bounds(audio.lengths, buckets, batch_size, quantum)
        label_sizes = np.array([len(labels) for labels in audio.labels])
        self.label_pad = {}
        for n in np.unique(self.padded_lengths):
            longest = int(label_sizes[self.padded_lengths == n].max())
            self.label_pad[int(n)] = max(8, -(-longest // 8) * 8)

    def buckets(self) -> dict[int, np.ndarray]:
        """``{padded length: indices}``."""
        return {int(n): np.flatnonzero(self.padded_lengths == n)
                for n in np.unique(self.padded_lengths)}

    def batch_shapes(self) -> list[tuple[int, int, int]]:
        """``(rows, samples, label length)`` of the batches :meth:`epoch` makes, one per bucket
        that holds a full batch."""
        return [(self.batch_size, n, self.label_pad[n]) for n, idx in self.buckets().items()
                if len(idx) >= self.batch_size]

    def decode_shapes(self) -> list[tuple[int, int]]:
        """``(rows, samples)`` of the batches :meth:`in_order` makes, one per bucket."""
        return [(self.batch_size, n) for n in self.buckets()]

    def epoch(self, rng: np.random.Generator) -> list[np.ndarray]:
        """Full batches (index arrays) of one pass, shuffled within and across buckets; leftovers
        of a bucket (fewer than ``batch_size``) wait for a later epoch's shuffle."""
        batches = []
        for idx in self.buckets().values():
            idx = rng.permutation(idx)
            whole = len(idx) // self.batch_size * self.batch_size
            batches += list(idx[:whole].reshape(-1, self.batch_size))
        if not batches:
            raise DataError(f"no bucket has {self.batch_size} utterances: lower --batch-size")
        return [batches[i] for i in rng.permutation(len(batches))]

    def in_order(self) -> list[np.ndarray]:
        """Every utterance once, bucket by bucket, the last batch of a bucket partly filler."""
        return [idx[i:i + self.batch_size] for idx in self.buckets().values()
                for i in range(0, len(idx), self.batch_size)]

    def make(self, indices) -> Batch:
        """The padded batch of ``indices``."""
        indices = np.asarray(indices)
        n = int(self.padded_lengths[indices[0]])
        if np.any(self.padded_lengths[indices] != n):
            raise ValueError("a batch must come from one bucket")
        rows = self.batch_size
        waves = np.zeros((rows, n), np.float32)
        wave_lengths = np.zeros(rows, np.int32)
        labels = np.zeros((rows, self.label_pad[n]), np.int32)
        label_lengths = np.zeros(rows, np.int32)
        for row, i in enumerate(indices):
            audio = self.audio.audio(int(i))[:n]
            waves[row, :audio.size] = audio
            wave_lengths[row] = audio.size
            label = self.audio.labels[int(i)]
            labels[row, :label.size] = label
            label_lengths[row] = label.size
        return Batch(waves, wave_lengths, labels, label_lengths,
                     [self.audio.texts[int(i)] for i in indices], len(indices))


def trainable(audio: AudioSet, features: FeatureConfig, time_stride: int,
              max_seconds: float | None) -> np.ndarray:
    """Indices of utterances that CTC can align (enough output frames for the label) and that are
    not longer than ``max_seconds``."""
    frames = features.num_frames(audio.lengths)
    out_frames = -(-frames // time_stride)
    need = np.array([text_lib.min_ctc_frames(labels) for labels in audio.labels])
    ok = (out_frames >= need) & (need > 0)
    if max_seconds is not None:
        ok &= audio.lengths <= max_seconds * audio.sample_rate
    return np.flatnonzero(ok)
