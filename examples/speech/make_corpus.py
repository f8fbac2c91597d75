"""Synthesize a small English speech corpus with espeak-ng: the default corpus of the speech example.

    python examples/speech/make_corpus.py                          # rebuild examples/speech/corpus
    python examples/speech/make_corpus.py --scale 50 --out ~/data/espeak50 --codec flac

Each utterance is a few words (2 to 5) drawn from ``VOCABULARY`` (a few hundred common English words
and the ten digits), or a string of 3 to 6 digits, spoken by a random voice: one of several English
accents (espeak-ng languages) combined with one of many voice variants, at a random speaking rate,
pitch and gap between words. The audio is resampled to 16 kHz mono, trimmed to the speech plus a
random margin of silence, and peak-normalized to -6 dBFS (noise and gain are added when the training
data is loaded, not here).

Codecs: the committed default corpus must fit in 25 MB. Ogg/Opus at about 21 kbit/s takes about
4 KB per utterance, 16-bit FLAC about 28 KB, so Opus carries seven times more
utterances at the same rate and bandwidth as LibriSpeech (whose audio also went through a lossy
codec, MP3, before it became FLAC). ``--codec flac`` writes lossless files for larger corpora.

Output layout (the manifest format that ``data.read_manifest`` reads)::

    OUT/train.tsv, valid.tsv, test.tsv   one utterance a line: audio path <TAB> transcript
    OUT/<split>/<id>.opus                 the audio (paths in the manifests are relative to OUT)
    OUT/utterances.tsv                    how each utterance was made (voice, rate, pitch, ...)
    OUT/corpus.json                       the settings, counts and durations

Texts are unique across the whole corpus, so no test sentence occurs in training (its words do).
The corpus is a pure function of ``--seed`` and ``--scale`` (and the espeak-ng version).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parent / "corpus"
SAMPLE_RATE = 16_000
#: Utterances per split at --scale 1 (the committed corpus).
BASE_COUNTS = {"train": 3200, "valid": 200, "test": 300}
# format, subtype, extension, compression level (libsndfile's 0-1 scale; for Opus 0.95 is about
# 21 kbit/s, where wideband speech is still clean: its log-mel distortion is a quarter of that of
# the weakest noise the augmentation adds, 30 dB SNR)
CODECS = {"opus": ("OGG", "OPUS", ".opus", 0.95), "flac": ("FLAC", "PCM_16", ".flac", None)}

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Common English words with varied spellings (doubled letters, silent letters, apostrophes), so the
# character model has to learn spelling, not only sounds.
WORDS = """
about after again air all always animal answer apple arm away baby back bad ball bank bed before
begin bird black blue boat body book bottle box boy bread bridge bring brother brown build bus buy
call can can't car cat catch chair child city class clean clear close cloud coffee cold color come
cook corner could country cup dark day deep dinner doctor dog don't door down draw dream dress drink
drive dry early earth easy eat egg end evening every eye face fall family far farm fast father field
find fire first fish floor flower fly food foot forest four free friend front fruit full game garden
girl give glass go gold good great green ground grow hand happy hard have head hear heart heavy help
here high hill home horse hot hour house how idea island it's job just keep key kind king kitchen
knife know lake large last late laugh learn left letter light like line listen little live long
look lost loud love low make man many map market milk minute money moon more morning mother mountain
music name near never new next nice night noise north nothing number ocean office old open orange
other page paint paper park party pen people picture place plant play please pocket poor push queen
question quick quiet rain read ready red river road rock room round run safe salt sand school sea
second see send seven shape ship shoe shop short show sign sing sister sit sky sleep slow small smile
snow soft song sound south speak spring square star station stay stone stop story street strong
summer sun table talk tall teacher thank the thing think three through time today tomorrow tree
true turn under very voice wait walk wall want warm wash watch water weather week west what wheel
when where white why wide wind window winter woman wood word work world write wrong yard year yellow
yes yesterday young zoo
""".split()

VOCABULARY = tuple(sorted(set(WORDS) | set(DIGITS)))

# espeak-ng English languages (accents); all ship with espeak-ng.
ACCENTS = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan",
           "en-gb-x-gbcwmd")
# Voice variants (espeak-ng-data/voices/!v): formant settings, breathiness, tone. Robotic and
# whispering variants are left out; variants missing from an older espeak-ng are skipped.
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5", "klatt",
            "klatt2", "klatt3", "klatt4", "adam", "Alex", "Andy", "Annie", "aunty", "belinda",
            "benjamin", "boris", "caleb", "david", "ed", "edward", "grandma", "grandpa", "iven",
            "iven2", "john", "linda", "max", "Michael", "norbert", "paul", "quincy", "rob",
            "robert", "shelby", "steph", "steph2", "travis", "victor", "zac")
RATE_WPM = (120, 200)      # espeak-ng's default is 175
PITCH = (20, 80)           # espeak-ng's 0-99 scale, default 50
WORD_GAP = (0, 4)          # extra pause between words, in units of 10 ms
MARGIN_S = (0.03, 0.20)    # silence kept before and after the speech
PEAK = 0.5                 # -6 dBFS: headroom for gain augmentation


@dataclass(frozen=True)
class Recipe:
    """Everything that determines one utterance."""

    id: str
    split: str
    text: str
    voice: str
    rate: int
    pitch: int
    gap: int
    margins: tuple[float, float]


def espeak_binary() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise SystemExit("make_corpus: espeak-ng not found on PATH. Install it (Debian/Ubuntu: "
                         "apt-get install espeak-ng; macOS: brew install espeak-ng).")
    return path


def available_variants(espeak: str) -> list[str]:
    """The variants of ``VARIANTS`` this espeak-ng has (it silently ignores unknown ones)."""
    listing = subprocess.run([espeak, "--voices=variant"], capture_output=True, text=True,
                             check=True).stdout
    files = {line.split()[-1].split("/")[-1].lower() for line in listing.splitlines()[1:]
             if line.strip()}
    found = [v for v in VARIANTS if v.lower() in files]
    if not found:
        raise SystemExit("make_corpus: espeak-ng lists none of the expected voice variants "
                         f"({', '.join(VARIANTS[:5])}, ...); is espeak-ng-data installed?")
    return found


def random_text(rng: np.random.Generator) -> str:
    """A few words from the vocabulary, or (one time in five) a string of digits."""
    if rng.random() < 0.2:
        return " ".join(rng.choice(DIGITS, size=rng.integers(3, 7)))
    count = rng.choice([2, 3, 4, 5], p=[0.25, 0.35, 0.25, 0.15])
    return " ".join(rng.choice(VOCABULARY, size=count))


def make_recipes(scale: float, seed: int, variants: list[str]) -> list[Recipe]:
    """The utterances of the corpus, with unique texts; a pure function of its arguments."""
    rng = np.random.default_rng(seed)
    counts = {split: max(1, round(n * scale)) for split, n in BASE_COUNTS.items()}
    seen: set[str] = set()
    recipes = []
    for split, count in counts.items():
        for i in range(count):
            text = random_text(rng)
            while text in seen:
                text = random_text(rng)
            seen.add(text)
            voice = f"{rng.choice(ACCENTS)}+{rng.choice(variants)}"
            recipes.append(Recipe(
                id=f"{split}-{i:06d}", split=split, text=text, voice=voice,
                rate=int(rng.integers(RATE_WPM[0], RATE_WPM[1] + 1)),
                pitch=int(rng.integers(PITCH[0], PITCH[1] + 1)),
                gap=int(rng.integers(WORD_GAP[0], WORD_GAP[1] + 1)),
                margins=tuple(float(m) for m in np.round(rng.uniform(*MARGIN_S, size=2), 3))))
    return recipes


def synthesize(espeak: str, recipe: Recipe) -> np.ndarray:
    """The utterance as float32 samples at SAMPLE_RATE: synthesized, resampled, trimmed, normalized."""
    import soundfile as sf
    from scipy.signal import resample_poly

    cmd = [espeak, "-v", recipe.voice, "-s", str(recipe.rate), "-p", str(recipe.pitch),
           "-g", str(recipe.gap), "--stdout", recipe.text]
    wav = subprocess.run(cmd, capture_output=True, check=True).stdout
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    g = np.gcd(SAMPLE_RATE, rate)
    audio = resample_poly(audio, SAMPLE_RATE // g, rate // g).astype(np.float32)
    loud = np.flatnonzero(np.abs(audio) > 1e-3 * np.abs(audio).max())
    if loud.size == 0:
        raise RuntimeError(f"espeak-ng produced silence for {recipe}")
    speech = audio[loud[0]:loud[-1] + 1]
    before, after = (np.zeros(round(m * SAMPLE_RATE), np.float32) for m in recipe.margins)
    audio = np.concatenate([before, speech, after])
    return audio * (PEAK / np.abs(audio).max())


def write_audio(path: Path, audio: np.ndarray, codec: str) -> None:
    import soundfile as sf

    fmt, subtype, _, level = CODECS[codec]
    sf.write(path, audio, SAMPLE_RATE, format=fmt, subtype=subtype, compression_level=level)


def build(out: Path, scale: float, seed: int, codec: str, jobs: int, progress: bool = True) -> dict:
    """Synthesize the corpus into ``out`` (replacing one that is there) and return its summary."""
    espeak = espeak_binary()
    variants = available_variants(espeak)
    recipes = make_recipes(scale, seed, variants)
    ext = CODECS[codec][2]
    if out.exists():
        for split in BASE_COUNTS:  # only what this script writes; nothing else in `out` is touched
            shutil.rmtree(out / split, ignore_errors=True)
    for split in BASE_COUNTS:
        (out / split).mkdir(parents=True, exist_ok=True)

    def make_one(recipe: Recipe) -> float:
        audio = synthesize(espeak, recipe)
        write_audio(out / recipe.split / f"{recipe.id}{ext}", audio, codec)
        return len(audio) / SAMPLE_RATE

    seconds = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        for n, duration in enumerate(pool.map(make_one, recipes), 1):
            seconds.append(duration)
            if progress and (n % 500 == 0 or n == len(recipes)):
                print(f"  {n}/{len(recipes)} utterances", file=sys.stderr, flush=True)

    for split in BASE_COUNTS:
        with open(out / f"{split}.tsv", "w") as f:
            f.write("# path\ttranscript\n")
            for r in recipes:
                if r.split == split:
                    f.write(f"{split}/{r.id}{ext}\t{r.text}\n")
    with open(out / "utterances.tsv", "w") as f:
        f.write("id\tsplit\tvoice\trate_wpm\tpitch\tword_gap\tseconds\ttext\n")
        for r, s in zip(recipes, seconds):
            f.write(f"{r.id}\t{r.split}\t{r.voice}\t{r.rate}\t{r.pitch}\t{r.gap}\t{s:.3f}\t{r.text}\n")
    version = subprocess.run([espeak, "--version"], capture_output=True, text=True).stdout.strip()
    summary = {
        "generator": "examples/speech/make_corpus.py", "espeak_ng": version, "seed": seed,
        "scale": scale, "codec": codec, "sample_rate": SAMPLE_RATE,
        "counts": {s: sum(r.split == s for r in recipes) for s in BASE_COUNTS},
        "hours": {s: round(sum(d for r, d in zip(recipes, seconds) if r.split == s) / 3600, 3)
                  for s in BASE_COUNTS},
        "mean_seconds": round(float(np.mean(seconds)), 3),
        "vocabulary_size": len(VOCABULARY), "accents": list(ACCENTS), "variants": variants,
        "rate_wpm": list(RATE_WPM), "pitch": list(PITCH), "word_gap_10ms": list(WORD_GAP),
        "bytes": sum(p.stat().st_size for s in BASE_COUNTS for p in (out / s).iterdir()),
    }
    (out / "corpus.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"output folder (default: the embedded corpus, {DEFAULT_OUT})")
    p.add_argument("--scale", type=float, default=1.0,
                   help=f"size relative to the default corpus ({sum(BASE_COUNTS.values())} "
                        "utterances); e.g. 50 for a corpus 50 times larger")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--codec", choices=sorted(CODECS), default="opus",
                   help="opus (small, lossy; the default corpus) or flac (lossless)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="parallel espeak-ng processes")
    args = p.parse_args(argv)
    if not args.scale > 0:
        p.error(f"--scale must be positive, got {args.scale}")
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    print(f"make_corpus: {args.scale:g}x the default corpus into {args.out}", file=sys.stderr)
    summary = build(args.out, args.scale, args.seed, args.codec, args.jobs)
    print(json.dumps({k: summary[k] for k in ("counts", "hours", "mean_seconds", "bytes")}))


if __name__ == "__main__":
    main()
