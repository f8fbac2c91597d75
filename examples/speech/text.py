"""Characters: the alphabet of the model, transcript normalization, greedy CTC decoding, CER/WER."""

from __future__ import annotations

import re

import numpy as np

#: The output characters. Class 0 is the CTC blank; character ``ALPHABET[i]`` is class ``i + 1``.
ALPHABET = " abcdefghijklmnopqrstuvwxyz'"
BLANK = 0
NUM_CLASSES = len(ALPHABET) + 1

_CLASS = {c: i + 1 for i, c in enumerate(ALPHABET)}
_OUTSIDE = re.compile(f"[^{re.escape(ALPHABET)}]")


def normalize(text: str) -> str:
    """Lowercase, map everything outside the alphabet to a space, and collapse spaces.

    LibriSpeech transcripts (upper case, apostrophes) come through unchanged apart from the case;
    punctuation in a manifest becomes a word break. Digits are not spelled out: write them as
    words in the transcripts.
    """
    return " ".join(_OUTSIDE.sub(" ", text.lower()).split())


def encode(text: str) -> np.ndarray:
    """Class ids (int32) of a normalized transcript."""
    try:
        return np.fromiter((_CLASS[c] for c in text), np.int32, count=len(text))
    except KeyError as e:
        raise ValueError(f"character {e.args[0]!r} of {text!r} is outside the alphabet; "
                         "normalize the transcript first") from None


def decode(ids) -> str:
    """The text of class ids (blanks are skipped)."""
    return "".join(ALPHABET[i - 1] for i in np.asarray(ids).tolist() if i != BLANK)


def min_ctc_frames(ids: np.ndarray) -> int:
    """The fewest output frames a CTC alignment of ``ids`` needs: one per label, plus a blank
    between each pair of equal neighbours."""
    ids = np.asarray(ids)
    return int(ids.size + np.count_nonzero(ids[1:] == ids[:-1]))


def greedy_decode(best, lengths) -> list[str]:
    """Best-path CTC decoding: per utterance, take the argmax classes of the first ``lengths[b]``
    frames, merge repeats, drop blanks.

    Args:
      best: ``[B, T]`` argmax class per frame (or ``[B, T, C]`` scores, reduced here).
      lengths: ``[B]`` valid frames per utterance.
    """
    best = np.asarray(best)
    if best.ndim == 3:
        best = best.argmax(-1)
    out = []
    for row, n in zip(best, np.asarray(lengths)):
        row = row[:int(n)]
        keep = np.ones(row.shape, bool)
        keep[1:] = row[1:] != row[:-1]
        out.append(decode(row[keep & (row != BLANK)]))
    return out


def error_rates(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """Character and word error rates in percent (jiwer), over the whole set."""
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    pairs = [(r, h) for r, h in zip(references, hypotheses) if r]  # jiwer rejects empty references
    if not pairs:
        raise ValueError("no non-empty references to score")
    refs, hyps = zip(*pairs)
    return {"cer": 100.0 * float(jiwer.cer(list(refs), list(hyps))),
            "wer": 100.0 * float(jiwer.wer(list(refs), list(hyps)))}
