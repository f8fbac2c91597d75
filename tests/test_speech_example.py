"""The speech example (examples/speech_model.py): its pieces, and a tiny end-to-end run on CPU.

The end-to-end run trains a small model for a few steps on a slice of the embedded corpus (dense
and pruned, with the branch and a resume), decodes the test split with the packed sparse weights,
and checks every output file. It takes well under a minute.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

for module in ("soundfile", "jiwer", "optax", "orbax.checkpoint", "matplotlib", "tqdm"):
    pytest.importorskip(module, reason="the speech example's dependencies: pip install '.[speech]'")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import speech_model  # noqa: E402
from speech import data, features, model, text, train  # noqa: E402


# ---- text -----------------------------------------------------------------------------------

def test_text_round_trip_and_greedy_ctc_decoding():
    assert text.normalize("HE'S  Here, 3 times!") == "he's here times"
    ids = text.encode("hello")
    assert text.decode(ids) == "hello"
    assert text.min_ctc_frames(ids) == 6  # the double l needs a blank between
    b = text.BLANK
    h, e, ell, o = (int(i) for i in text.encode("helo"))
    frames = np.array([[h, h, b, e, ell, ell, b, ell, o, o, b, b]])
    assert text.greedy_decode(frames, [12]) == ["hello"]
    assert text.greedy_decode(frames, [6]) == ["hel"]  # frames past the length are ignored
    with pytest.raises(ValueError, match="outside the alphabet"):
        text.encode("Hello")
    rates = text.error_rates(["abc de", "fg"], ["abd de", "fg"])
    assert rates["cer"] == pytest.approx(100 * 1 / 8)
    assert rates["wer"] == pytest.approx(100 * 1 / 3)


# ---- features -------------------------------------------------------------------------------

def test_mel_filterbank_shape_and_coverage():
    bank = features.mel_filterbank(16000, 512, 40)
    assert bank.shape == (257, 40)
    assert np.all(bank >= 0) and np.all(bank.max(axis=0) > 0.5)  # every filter has a peak
    peaks = bank.argmax(axis=0)
    assert np.all(np.diff(peaks) >= 0)  # centres rise with the filter index
    assert np.diff(peaks)[-5:].mean() > np.diff(peaks)[:5].mean()  # mel spacing widens


def test_log_mel_puts_a_tone_in_the_right_channel_and_masks_padding():
    cfg = features.FeatureConfig(sample_rate=16000, n_mels=40)
    t = np.arange(16000) / 16000
    low = np.sin(2 * np.pi * 300 * t).astype(np.float32)
    high = np.sin(2 * np.pi * 3000 * t).astype(np.float32)
    waves = np.stack([low, np.concatenate([high[:8000], np.zeros(8000, np.float32)])])
    feats, frames = features.log_mel(waves, np.array([16000, 8000]), cfg)
    feats, frames = np.asarray(feats), np.asarray(frames)
    assert list(frames) == [int(cfg.num_frames(16000)), int(cfg.num_frames(8000))]
    # Features are normalized per utterance and channel, so a steady tone is checked before the
    # normalization: its power lands in the filter centred nearest its frequency.
    bank = features.mel_filterbank(16000, cfg.n_fft, 40)
    for freq in (300, 3000):
        spectrum = np.abs(np.fft.rfft(np.sin(2 * np.pi * freq * t[:cfg.n_fft]) *
                                      np.hanning(cfg.n_fft))) ** 2
        expected = bank[int(round(freq / 16000 * cfg.n_fft))].argmax()
        assert abs(int((spectrum @ bank).argmax()) - int(expected)) <= 1
    assert np.all(feats[1, frames[1]:] == 0)
    valid = feats[0, :frames[0]]
    np.testing.assert_allclose(valid.mean(axis=0), 0, atol=1e-3)


def test_spec_augment_masks_bands_inside_each_utterance():
    import jax

    aug = features.SpecAugment(freq_masks=2, freq_width=3, time_masks=2, time_fraction=0.2)
    feats = np.ones((2, 50, 16), np.float32)
    frames = np.array([50, 20])
    masked_somewhere = False
    for seed in range(20):
        out = np.asarray(aug(feats, frames, jax.random.key(seed)))
        freq_cut = np.all(out == 0, axis=1)           # [B, F]: channels zeroed at every frame
        assert freq_cut.sum(axis=1).max() <= 2 * 3
        time_cut = np.all(out == 0, axis=2)           # [B, T]: frames zeroed in every channel
        assert not time_cut[1, 20:].any()              # never past the utterance's end
        assert time_cut[1].sum() <= 2 * int(0.2 * 20)
        masked_somewhere |= bool(freq_cut.any() and time_cut.any())
    assert masked_somewhere


# ---- data -----------------------------------------------------------------------------------

def _write_tone(path: Path, seconds: float, rate: int = 16000):
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, 0.3 * np.sin(2 * np.pi * 440 * t), rate)


def test_readers_of_librispeech_folders_and_manifests(tmp_path):
    chapter = tmp_path / "LibriSpeech" / "dev-clean" / "84" / "121123"
    chapter.mkdir(parents=True)
    for i in range(2):
        _write_tone(chapter / f"84-121123-000{i}.flac", 0.5)
    (chapter / "84-121123.trans.txt").write_text("84-121123-0000 GO DO YOU HEAR\n"
                                                 "84-121123-0001 BUT IN LESS THAN FIVE MINUTES\n")
    utts = data.read_librispeech(tmp_path / "LibriSpeech" / "dev-clean")
    assert [u.text for u in utts] == ["go do you hear", "but in less than five minutes"]
    assert all(u.path.is_file() for u in utts)

    _write_tone(tmp_path / "a.wav", 0.25, rate=8000)  # another rate: resampled on load
    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.tsv").write_text("# path\ttranscript\na.wav\tHello, World\n")
    corpus = data.load_corpus("manifest", tmp_path)
    assert corpus["test"][0].text == "hello world"
    audio = data.AudioSet(corpus["train"], 16000, cache=False)
    assert audio.lengths[0] == 4000 and audio.audio(0).shape == (4000,)

    (tmp_path / "bad.tsv").write_text("no tab here\n")
    with pytest.raises(data.DataError, match="bad.tsv:1"):
        data.read_manifest(tmp_path / "bad.tsv")
    with pytest.raises(data.DataError, match="needs --data-dir"):
        data.load_corpus("librispeech")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="no \\*.trans.txt"):
        data.read_librispeech(tmp_path / "empty")


def test_augmentation_sets_the_signal_to_noise_ratio_and_keeps_padding_zero():
    import jax

    speech = (0.5 * np.sin(np.arange(16000) / 5)).astype(np.float32)
    waves = np.stack([speech, np.concatenate([speech[:9000], np.zeros(7000, np.float32)])])
    lengths = np.array([16000, 9000])
    aug = features.Augmenter(noise_prob=1.0, snr_db=(10.0, 10.0), gain_db=(0.0, 0.0))
    noisy = np.asarray(aug(waves, lengths, jax.random.key(0)))
    for row, n in enumerate(lengths):
        noise = noisy[row, :n] - waves[row, :n]
        snr = 10 * np.log10(np.mean(waves[row, :n] ** 2) / np.mean(noise ** 2))
        assert abs(snr - 10.0) < 0.5
    assert np.all(noisy[1, 9000:] == 0)
    quiet = features.Augmenter(noise_prob=0.0, gain_db=(-6.0, -6.0))(waves, lengths,
                                                                       jax.random.key(1))
    np.testing.assert_allclose(quiet, waves * 10 ** (-6 / 20), rtol=1e-5)
    # a step's key decides its draws: the same key gives the same audio, another key other audio
    again = np.asarray(aug(waves, lengths, jax.random.key(0)))
    np.testing.assert_array_equal(noisy, again)
    assert not np.allclose(noisy, np.asarray(aug(waves, lengths, jax.random.key(2))))


@pytest.mark.parametrize("exponent", [0.0, 1.0, 2.0])
def test_colored_noise_has_unit_power_and_its_spectral_slope(exponent):
    import jax

    n = 1 << 14
    valid = np.ones((8, n), bool)
    noise = np.asarray(features.colored_noise(jax.random.key(3), np.full(8, exponent, np.float32),
                                              n, valid))
    np.testing.assert_allclose(np.mean(noise ** 2, axis=1), 1.0, rtol=1e-4)
    power = np.mean(np.abs(np.fft.rfft(noise, axis=1)) ** 2, axis=0)
    # power in two octaves, an octave apart: the ratio is 2 ** exponent
    low, high = power[64:128].mean(), power[128:256].mean()
    assert abs(np.log2(low / high) - exponent) < 0.3


def test_buckets_minimize_padding_and_hold_a_batch_each():
    rng = np.random.default_rng(0)
    lengths = rng.integers(8_000, 60_000, 500)
    padded = data.bucket_bounds(lengths, 3, 32, 1600)
    bounds, counts = np.unique(padded, return_counts=True)
    assert len(bounds) == 3 and counts.min() >= 32 and np.all(bounds % 1600 == 0)
    assert np.all(padded >= lengths) and padded.max() == -(-lengths.max() // 1600) * 1600
    # against every other choice of two inner bounds on the 0.1 s grid: none pads less
    grid = np.arange(1600, padded.max() + 1, 1600)
    best = min(
        np.sum(np.where(lengths <= a, a, np.where(lengths <= b, b, padded.max())) - lengths)
        for i, a in enumerate(grid) for b in grid[i + 1:]
        if min(np.sum(lengths <= a), np.sum((lengths > a) & (lengths <= b)),
               np.sum(lengths > b)) >= 32)
    assert np.sum(padded - lengths) == best
    # too few lengths for a batch in each bucket: fewer buckets; for one batch: one bucket
    assert len(np.unique(data.bucket_bounds(lengths[:70], 3, 32, 1600))) == 2
    assert len(np.unique(data.bucket_bounds(lengths[:10], 3, 32, 1600))) == 1


def test_embedded_corpus_is_there_and_fits_the_budget():
    corpus = data.load_corpus("embedded")
    counts = {k: len(v) for k, v in corpus.items()}
    assert counts["train"] >= 2000 and counts["valid"] >= 100 and counts["test"] >= 200
    train_texts = {u.text for u in corpus["train"]}
    assert not train_texts & {u.text for u in corpus["test"]}  # unseen sentences
    size = sum(p.stat().st_size for p in data.EMBEDDED.rglob("*") if p.is_file())
    assert size <= 25 * 2 ** 20


# ---- model ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cell", ["simple", "lstm", "gru"])
def test_cell_and_layer_forms_and_the_packed_export_agree(cell, exact_matmuls):
    import dataclasses

    import jax
    import jax.numpy as jnp
    from jax_sprnn import pruning

    cell_cfg = model.ModelConfig(hidden=24, layers=2, conv_channels=4, n_mels=16, time_stride=2,
                                 cell=cell)
    params = model.init_variables(cell_cfg, jax.random.key(0))["params"]
    layer = model.init_variables(dataclasses.replace(cell_cfg, rnn_impl="layer"), jax.random.key(0))
    assert (jax.tree_util.tree_structure(layer["params"])
            == jax.tree_util.tree_structure(params))  # one checkpoint fits both forms
    paths = model.recurrent_kernel_paths(params)
    gates = {"simple": 1, "lstm": 4, "gru": 3}[cell]
    assert len(paths) == 4 and all(model.kernel_at(params, p).shape == (24, gates * 24)
                                   for p in paths)
    assert set(pruning.masks_of(layer[pruning.COLLECTION]).keys()) == {"rnn"}
    params, masks = pruning.update_sparsity(params, model.dense_masks(params), 0.75)
    x = jax.random.normal(jax.random.key(1), (3, 20, 16))
    lengths = jnp.array([20, 13, 5])
    ref, out_len = jax.jit(model.SpeechModel(cell_cfg).apply)({"params": params}, x, lengths)
    assert list(np.asarray(out_len)) == [10, 7, 3]
    layer_cfg, packed = model.export(cell_cfg, params, masks)
    assert layer_cfg.rnn_impl == "layer"
    assert not model.recurrent_kernel_paths(packed["params"])  # dense kernels are gone
    out, _ = jax.jit(model.SpeechModel(layer_cfg).apply)(packed, x, lengths)
    valid = (np.arange(10)[None] < np.asarray(out_len)[:, None])[..., None]
    np.testing.assert_allclose(np.where(valid, out, 0), np.where(valid, ref, 0), atol=2e-5)
    assert model.density(masks) == pytest.approx(6 / 24)
    for path in paths:  # the recurrent kernels go from the served params, their biases stay
        kept = model._get(packed["params"], path[:-2])
        names = path[-2].split("+")
        assert not any("kernel" in kept.get(n, {}) for n in names)
        assert any("bias" in kept.get(n, {}) for n in names) == (cell != "simple")


# ---- command line ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--density", "1.5"], "--density must be in"),
    (["--prune-begin", "0.8", "--prune-end", "0.5"], "--prune-begin"),
    (["--data", "librispeech"], "needs --data-dir"),
    (["--data-dir", "/tmp"], "--data-dir is for"),
    (["--snr-db", "5"], "--snr-db"),
    (["--bench-batches", "1,0"], "positive integers"),
    (["--resume", "--overwrite"], "exclude each other"),
    (["--density", "1", "--no-compare-dense"], "nothing to train"),
])
def test_bad_command_lines_name_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit):
        speech_model.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("begin, end", [(1.0, 1.0), (0.5, 1.0), (0.25, 0.75)])
def test_the_pruning_schedule_reaches_its_target_within_the_run(begin, end):
    """Steps run 0 .. steps - 1: a schedule that ends at 1.0 still applies its final mask (it
    used to fall on step `steps`, which never runs, and leave the "pruned" model dense)."""
    cfg = train.TrainConfig(steps=40, target_density=0.1, prune_begin=begin, prune_end=end,
                            prune_every=7)
    schedule = cfg.schedule()
    updates = [s for s in range(cfg.steps) if schedule.is_update_step(s)]
    assert updates and updates[0] == cfg.branch_step < cfg.steps
    assert float(schedule(updates[-1])) == pytest.approx(0.9)


def test_the_prune_rule_reaches_the_training_config():
    args = speech_model.parse_args(["--prune-rule", "layer"])
    assert speech_model.train_config(args, 0.1).prune_rule == "layer"
    assert speech_model.train_config(speech_model.parse_args([]), 0.1).prune_rule == "row_balanced"
    with pytest.raises(ValueError, match="rule must be one of"):
        train.TrainConfig(prune_rule="largest")


def test_bad_data_is_one_line_not_a_traceback(tmp_path):
    with pytest.raises(SystemExit, match=r"^speech_model.py: error: --data-dir .*missing is not a "
                                         r"folder$"):
        speech_model.main(["--data", "manifest", "--data-dir", str(tmp_path / "missing"),
                           "--out", str(tmp_path / "run"), "--no-progress"])


def test_tiny_end_to_end_run_with_resume(tmp_path):
    out = tmp_path / "run"
    argv = ["--out", str(out), "--limit", "48", "--batch-size", "8", "--hidden", "32",
            "--layers", "1", "--conv-channels", "4", "--n-mels", "16", "--steps", "6",
            "--prune-begin", "0.34", "--prune-end", "0.67", "--prune-every", "1",
            "--density", "0.25", "--eval-every", "6", "--checkpoint-every", "3",
            "--lr", "2e-2", "--warmup", "1",  # six steps that learn something
            "--buckets", "2", "--one-shot-densities", "0.5", "--latency-densities", "0.25",
            "--latency-batches", "2", "--bench-steps", "8", "--bench-reps", "2",
            "--no-progress"]
    results = speech_model.main(argv)
    assert set(results["models"]) == {"dense", "pruned"}
    pruned = results["models"]["pruned"]
    assert pruned["density"] == pytest.approx(8 / 32)  # round(0.25 * 32) per output unit
    # Six steps are enough to beat silence: an empty transcript scores 100% CER (every character
    # deleted), the untrained model about 110% (insertions); these runs score 83-86% on CPU.
    assert text.error_rates(["go do you hear", "hello"], ["", ""])["cer"] == 100
    for name in ("dense", "pruned"):
        losses = [r["loss"] for r in results["history"][name]["train"]]
        assert losses[-1] < 0.75 * losses[0], (name, losses)  # 5.1 -> 3.1 on CPU
        for split in ("valid", "test"):
            assert results["models"][name][split]["cer"] < 95, (name, split)
    # The packed weights served the same decisions as the training form.
    assert pruned["test"]["cer"] == pytest.approx(pruned["test_training_form"]["cer"], abs=1.0)
    assert results["history"]["pruned"]["train"][-1]["density"] == pytest.approx(0.25)
    assert results["history"]["dense"]["train"][-1]["density"] == 1.0
    assert set(results["latency_vs_density"]["by_batch"]["2"]["sparse"]) == {"0.25"}
    # Compilations: the step once per training bucket (six steps cover both), decoding once per
    # program (training form, served form: evaluation has one shape per split).
    timing = results["timing"]
    assert len(timing["train_buckets_seconds"]) == 2
    assert timing["compiles_by_function"]["jit(_train_step)"]["count"] == 2
    assert timing["compiles_by_function"]["jit(_decode_step)"]["count"] == 2
    for name, steps in (("dense", 6), ("pruned", 4)):
        t = results["history"][name]["timing"]
        assert t["steps"] == steps and 0 < t["steps_per_second"] <= t["steady_steps_per_second"]
        assert t["wall_seconds"] >= t["dispatch_seconds"] + t["eval_seconds"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["target"]["pruned_test_cer"] == pruned["test"]["cer"]
    for png in ("training_curves.png", "cer_vs_density.png", "latency_vs_density.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert (out / "checkpoints" / "pruned" / "6").is_dir()

    # A second run into the same folder must be told what to do with the old one.
    with pytest.raises(SystemExit, match="--resume"):
        speech_model.main(argv)

    # Interrupt the pruned run after its step-3 checkpoint: --resume continues it from there.
    import shutil
    shutil.rmtree(out / "checkpoints" / "pruned" / "6")
    resumed = speech_model.main(argv + ["--resume"])
    steps = [r["step"] for r in resumed["history"]["pruned"]["train"]]
    assert steps == sorted(set(steps)) and steps[-1] == 5  # no step twice, none missing at the end
    assert resumed["models"]["pruned"]["density"] == pytest.approx(8 / 32)
    with pytest.raises(SystemExit, match="different settings"):
        speech_model.main([a if a != "0.25" else "0.5" for a in argv] + ["--resume"])


@pytest.mark.parametrize("cell, impl", [("lstm", "cell"), ("gru", "layer")])
def test_tiny_run_with_a_gated_cell(cell, impl, tmp_path, capsys, monkeypatch):
    rules = []  # the rule each update_sparsity call names (the schedule's: --prune-rule global)
    update = train.pruning.update_sparsity
    monkeypatch.setattr(train.pruning, "update_sparsity",
                        lambda *a, **k: rules.append(k.get("rule")) or update(*a, **k))
    argv = ["--prune-rule", "global", "--cell", cell, "--rnn-impl", impl,
            "--out", str(tmp_path / "run"), "--limit", "48",
            "--batch-size", "8", "--hidden", "32", "--layers", "1", "--conv-channels", "4",
            "--n-mels", "16", "--steps", "4", "--prune-begin", "0.25", "--prune-end", "0.5",
            "--prune-every", "1", "--density", "0.5", "--no-compare-dense", "--eval-every", "4",
            "--checkpoint-every", "4", "--lr", "2e-2", "--warmup", "1", "--buckets", "1",
            "--one-shot-densities", "0.5", "--latency-densities", "0.5", "--latency-batches", "2",
            "--bench-steps", "8", "--bench-reps", "2", "--no-progress", "--profile"]
    results = speech_model.main(argv)
    assert "global" in rules
    printed = capsys.readouterr().out
    assert "profile: training loops" in printed and "jit(_train_step)" in printed
    assert "[pruned] 4 steps in" in printed and "steps/s steady" in printed
    pruned = results["models"]["pruned"]
    assert results["model"]["cell"] == cell and pruned["density"] == pytest.approx(0.5)
    gates = {"lstm": 4, "gru": 3}[cell]
    assert results["recurrent_parameters"] == 2 * gates * 32 * 32  # two directions' [H, G*H]
    # served packed (SparseLSTM / SparseGRU) it decides as its training form does
    assert pruned["test"]["cer"] == pytest.approx(pruned["test_training_form"]["cer"], abs=1.0)
    losses = [r["loss"] for r in results["history"]["pruned"]["train"]]
    assert np.all(np.isfinite(losses)) and results["timing"]["compiles_by_function"][
        "jit(_train_step)"]["count"] == 1
