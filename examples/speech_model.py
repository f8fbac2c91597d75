"""Train a DeepSpeech2-like speech recognizer with sparse recurrent layers, pruned gradually to 10%.

    python examples/speech_model.py                        # embedded corpus, dense baseline + pruned
    python examples/speech_model.py --resume               # continue an interrupted run
    python examples/speech_model.py --data librispeech --data-dir ~/LibriSpeech --hidden 768
    python examples/speech_model.py --bench-only --hidden 2048 --density 0.1   # GPU speed only

The model (examples/speech/model.py): log-mel features, two strided convolutions, a stack of
(bidirectional) jax_sprnn SparseRNN layers (--cell lstm or gru: SparseLSTM, SparseGRU), a linear
layer to characters, CTC loss. The default run trains it twice on the embedded espeak-ng corpus,
dense and pruned to 10% recurrent density with Zhu & Gupta's schedule, and writes into --out
(default runs/speech): results.json (every number), training_curves.png, cer_vs_density.png,
latency_vs_density.png, and orbax checkpoints. On a GPU it also times the recurrent layers and the
whole model at batch 1, 4 and 16 against dense lax.scan layers. It ends with each training run's
pace (steps per second, compilations; --profile: where the time went). docs/speech.md describes
the example.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent
if str(EXAMPLES) not in sys.path:  # `speech` is the package beside this script
    sys.path.insert(0, str(EXAMPLES))

from speech import data as data_lib  # noqa: E402
from speech.features import Augmenter, FeatureConfig, SpecAugment  # noqa: E402
from speech.model import CELLS, RNN_IMPLS, ModelConfig  # noqa: E402
from speech.train import TrainConfig  # noqa: E402

from jax_sprnn.pruning import RULES as PRUNE_RULES  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def _numbers(cast=float, low: float = 0.0, high: float = float("inf"),
             count: int | None = None):
    """An argparse type: comma-separated numbers of type ``cast`` in [low, high] (``count`` of
    them when given)."""
    kind = "integers" if cast is int else "numbers"

    def parse(text: str) -> tuple:
        try:
            values = tuple(cast(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind}, got "
                                             f"{text!r}") from None
        if not values or (count is not None and len(values) != count):
            raise argparse.ArgumentTypeError(f"expected {count or 'one or more'} "
                                             f"comma-separated {kind}, got {text!r}")
        if any(not low <= v <= high for v in values):
            bound = ("positive integers" if cast is int and low == 1 and high == float("inf")
                     else f"values in [{low}, {high}]")
            raise argparse.ArgumentTypeError(f"expected {bound}, got {text!r}")
        return values
    return parse


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in --help, except None: those options say in their help what they default to."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", choices=data_lib.DATA_KINDS, default="embedded",
                   help="embedded: the espeak-ng corpus in examples/speech/corpus; manifest: "
                        "DATA_DIR/{train,valid,test}.tsv with 'path<TAB>transcript' lines; "
                        "librispeech: DATA_DIR/<split>/**/*.flac + *.trans.txt")
    d.add_argument("--data-dir", type=Path, help="the corpus folder (manifest, librispeech)")
    d.add_argument("--splits", type=lambda s: tuple(x.strip() for x in s.split(",")),
                   help="train,valid,test split names (default: train,valid,test; LibriSpeech: "
                        "train-clean-100,dev-clean,test-clean)")
    d.add_argument("--limit", type=int, help="use at most this many utterances of each split")
    d.add_argument("--max-seconds", type=float, default=20.0,
                   help="drop longer training utterances")
    d.add_argument("--buckets", type=int, default=3,
                   help="training batches come in this many lengths, chosen to minimize the "
                        "padding; each compiles the step once (evaluation pads every batch to "
                        "the longest validation or test utterance: one shape)")
    d.add_argument("--bucket-seconds", type=float,
                   help="instead of --buckets, pad audio to a multiple of this many seconds "
                        "(training and evaluation)")
    d.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                   help="keep decoded audio in memory (default: for the embedded corpus and "
                        "splits under 20,000 utterances)")
    d.add_argument("--sample-rate", type=int, default=16000)
    d.add_argument("--n-mels", type=int, default=40)
    d.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="random noise and gain on training audio")
    d.add_argument("--noise-prob", type=float, default=0.5)
    d.add_argument("--snr-db", type=_numbers(float, -50, 100, 2), default=(10.0, 40.0),
                   metavar="LOW,HIGH")
    d.add_argument("--gain-db", type=_numbers(float, -60, 60, 2), default=(-12.0, 6.0),
                   metavar="LOW,HIGH")
    d.add_argument("--spec-augment", action=argparse.BooleanOptionalAction, default=False,
                   help="SpecAugment time and frequency masks on training features (off by "
                        "default: at the default budget it slows learning more than it helps)")

    m = p.add_argument_group("model")
    m.add_argument("--cell", choices=tuple(CELLS), default="simple",
                   help="the recurrent cell: simple (tanh; SparseRNN), lstm (SparseLSTM) or gru "
                        "(SparseGRU), each pruned in its recurrent kernels")
    m.add_argument("--hidden", type=int, default=256, help="recurrent units per direction")
    m.add_argument("--layers", type=int, default=2, help="recurrent layers")
    m.add_argument("--bidirectional", action=argparse.BooleanOptionalAction, default=True)
    m.add_argument("--conv-channels", type=int, default=16)
    m.add_argument("--time-stride", type=int, choices=(1, 2, 4), default=4,
                   help="subsampling in time by the convolutions (frames are 10 ms): 4 gives 25 "
                        "outputs a second; CTC needs one per character, so speech faster than "
                        "about 20 characters a second needs 2")
    m.add_argument("--rnn-impl", choices=("auto",) + RNN_IMPLS, default="auto",
                   help="training form of the recurrent layers: layer (SparseRNN, one sparse_rnn "
                        "call per sequence) or cell (nn.RNN of SparseRNNCell, dense lax.scan); "
                        "auto: layer on a GPU, cell on a CPU, where XLA's dense scan is faster")
    m.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="dtype of the recurrence and the packed weights at inference")

    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=1600)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--weight-decay", type=float, default=1e-2)
    t.add_argument("--clip", type=float, default=1.0, help="global gradient norm clip")
    t.add_argument("--density", type=float, default=0.1,
                   help="final density of the recurrent kernels (1.0: no pruning)")
    t.add_argument("--prune-begin", type=float, default=0.25, help="fraction of --steps")
    t.add_argument("--prune-end", type=float, default=0.75, help="fraction of --steps")
    t.add_argument("--prune-every", type=int, default=50, help="steps between mask updates")
    t.add_argument("--prune-rule", choices=PRUNE_RULES, default="row_balanced",
                   help="how a mask update ranks the recurrent weights: row_balanced keeps the same "
                        "count in every row of U (what the kernel balances best), layer one "
                        "threshold per kernel, global one over all of them")
    t.add_argument("--compare-dense", action=argparse.BooleanOptionalAction, default=True,
                   help="also train the same model dense, as the CER baseline")
    t.add_argument("--eval-every", type=int, default=400)
    t.add_argument("--checkpoint-every", type=int, default=400)
    t.add_argument("--seed", type=int, default=0)

    o = p.add_argument_group("output and timing")
    o.add_argument("--out", type=Path, default=Path("runs/speech"))
    o.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    o.add_argument("--overwrite", action="store_true",
                   help="delete the checkpoints in --out and start over")
    o.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    o.add_argument("--profile", action="store_true",
                   help="print where each training run's time went (input waits, step dispatch, "
                        "logging, evaluation, checkpoints, pruning) and every XLA compilation by "
                        "function; the summary line (steps/s, compilations) is always printed")
    o.add_argument("--one-shot-densities", type=_numbers(float, 0, 1),
                   default=(0.5, 0.3, 0.2, 0.1),
                   help="densities at which the dense model is also pruned once, without "
                        "retraining, for the CER-against-density plot")
    o.add_argument("--latency-densities", type=_numbers(float, 0, 1),
                   default=(1.0, 0.3, 0.1, 0.05))
    o.add_argument("--latency-batches", type=_numbers(int, 1), default=(1, 16))
    o.add_argument("--bench-batches", type=_numbers(int, 1), default=(1, 4, 16))
    o.add_argument("--bench-steps", type=int, default=250,
                   help="recurrent steps per timed sequence (250 = 10 s of audio at stride 4)")
    o.add_argument("--bench-reps", type=int, default=20)
    o.add_argument("--speed-table", action=argparse.BooleanOptionalAction, default=None,
                   help="time layers and whole model at --bench-batches (default: on a GPU only)")
    o.add_argument("--bench-only", action="store_true",
                   help="skip training: time the recurrent layers (random weights, --hidden, "
                        "--layers, --density) sparse against dense and exit")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    checks = [
        (args.steps >= 1, f"--steps must be at least 1, got {args.steps}"),
        (args.batch_size >= 1, f"--batch-size must be at least 1, got {args.batch_size}"),
        (0.0 < args.density <= 1.0, f"--density must be in (0, 1], got {args.density}"),
        (0.0 <= args.prune_begin <= args.prune_end <= 1.0,
         f"need 0 <= --prune-begin <= --prune-end <= 1, got {args.prune_begin}, {args.prune_end}"),
        (args.prune_every >= 1, f"--prune-every must be at least 1, got {args.prune_every}"),
        (args.hidden >= 1 and args.layers >= 1 and args.conv_channels >= 1,
         "--hidden, --layers and --conv-channels must be positive"),
        (args.n_mels >= 4, f"--n-mels must be at least 4, got {args.n_mels}"),
        (args.sample_rate >= 4000, f"--sample-rate must be at least 4000, got {args.sample_rate}"),
        (args.lr > 0 and args.clip > 0 and args.weight_decay >= 0 and args.warmup >= 0,
         "--lr and --clip must be positive, --weight-decay and --warmup non-negative"),
        (args.limit is None or args.limit >= 1, f"--limit must be positive, got {args.limit}"),
        (args.max_seconds > 0, f"--max-seconds must be positive, got {args.max_seconds}"),
        (args.bucket_seconds is None or args.bucket_seconds > 0,
         f"--bucket-seconds must be positive, got {args.bucket_seconds}"),
        (args.buckets >= 1, f"--buckets must be at least 1, got {args.buckets}"),
        (0.0 <= args.noise_prob <= 1.0, f"--noise-prob must be in [0, 1], got {args.noise_prob}"),
        (args.snr_db[0] <= args.snr_db[1] and args.gain_db[0] <= args.gain_db[1],
         "--snr-db and --gain-db are LOW,HIGH with LOW <= HIGH"),
        (args.eval_every >= 1 and args.checkpoint_every >= 1,
         "--eval-every and --checkpoint-every must be positive"),
        (args.bench_steps >= 1 and args.bench_reps >= 1,
         "--bench-steps and --bench-reps must be positive"),
        (all(d > 0 for d in args.latency_densities + args.one_shot_densities),
         "densities must be positive"),
        (not (args.resume and args.overwrite), "--resume and --overwrite exclude each other"),
        (args.bench_only or args.compare_dense or args.density < 1,
         "nothing to train: --density 1 with --no-compare-dense"),
        (args.data != "embedded" or args.data_dir is None,
         "--data-dir is for --data manifest or librispeech (the embedded corpus has a fixed place)"),
        (args.data == "embedded" or args.data_dir is not None, f"--data {args.data} needs --data-dir"),
        (args.splits is None or len(args.splits) == 3,
         f"--splits needs three comma-separated names (train,valid,test), got {args.splits}"),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    return args


# ---------------------------------------------------------------------------------------------
# Pieces of the run
# ---------------------------------------------------------------------------------------------

def model_config(args, impl: str) -> ModelConfig:
    return ModelConfig(n_mels=args.n_mels, hidden=args.hidden, layers=args.layers,
                       bidirectional=args.bidirectional, conv_channels=args.conv_channels,
                       time_stride=args.time_stride, cell=args.cell, rnn_impl=impl,
                       dtype=args.dtype)


def train_config(args, density: float) -> TrainConfig:
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                       warmup_steps=args.warmup, weight_decay=args.weight_decay,
                       clip_norm=args.clip, target_density=density, prune_begin=args.prune_begin,
                       prune_end=args.prune_end, prune_every=args.prune_every,
                       prune_rule=args.prune_rule,
                       eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
                       seed=args.seed)


def on_gpu() -> bool:
    import jax

    return jax.default_backend() == "gpu"


def run_config(args, impl: str) -> dict:
    """What a checkpoint depends on; --resume refuses to continue under a different one."""
    return {"data": args.data, "data_dir": None if args.data_dir is None else str(args.data_dir),
            "splits": list(args.splits) if args.splits else None, "limit": args.limit,
            "max_seconds": args.max_seconds, "bucket_seconds": args.bucket_seconds,
            "buckets": args.buckets,
            "sample_rate": args.sample_rate,
            "augment": [args.augment, args.noise_prob, list(args.snr_db), list(args.gain_db),
                        args.spec_augment],
            "model": model_config(args, impl).shape_fields(), "rnn_impl": impl,
            "train": dataclasses.asdict(train_config(args, args.density)),
            "compare_dense": args.compare_dense}


def prepare_out(args, config: dict) -> None:
    """Create --out; check that --resume continues the same run and that a new run does not mix
    with old checkpoints."""
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "config.json"
    checkpoints = args.out / "checkpoints"
    if args.overwrite and checkpoints.exists():
        shutil.rmtree(checkpoints)
    if args.resume:
        if not path.exists():
            raise SystemExit(f"--resume: {args.out} holds no run to resume (no config.json)")
        old = json.loads(path.read_text())
        if old != config:
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise SystemExit(f"--resume: the run in {args.out} was made with different settings "
                             f"({', '.join(diff)}); use the same flags, or another --out")
    elif checkpoints.exists() and any(checkpoints.iterdir()):
        raise SystemExit(f"{args.out} already holds checkpoints: pass --resume to continue that "
                         "run, --overwrite to start over, or another --out")
    path.write_text(json.dumps(config, indent=1) + "\n")


def load_data(args, features: FeatureConfig):
    """AudioSets of the three splits (train filtered to what CTC can align)."""
    corpus = data_lib.load_corpus(args.data, args.data_dir, args.splits)
    if args.limit:
        corpus = {k: v[:args.limit] for k, v in corpus.items()}
    sets = {}
    for role, utterances in corpus.items():
        cache = args.cache if args.cache is not None else (
            args.data == "embedded" or len(utterances) <= 20_000)
        sets[role] = data_lib.AudioSet(utterances, args.sample_rate, cache=cache)
    keep = data_lib.trainable(sets["train"], features, args.time_stride, args.max_seconds)
    dropped = len(sets["train"]) - len(keep)
    if dropped:
        print(f"training on {len(keep)} utterances; {dropped} dropped (too long, empty, or too "
              "few frames for their transcript at this --time-stride)")
    sets["train"] = sets["train"].subset(keep)
    return sets


def bench_only(args) -> None:
    """Time the recurrent layers and the whole model (random weights, recurrent kernels pruned to
    --density) sparse against dense."""
    from speech import bench, report

    config = model_config(args, "layer")
    config = dataclasses.replace(config, method="native" if on_gpu() else "auto")
    device = bench.device_description()
    print(f"timing {args.layers} {'bidirectional ' if args.bidirectional else ''}layer(s) of "
          f"{args.hidden} units at density {args.density:g}, {args.bench_steps} steps, "
          f"{args.dtype}, on {device['device']}")
    whole = bench.random_whole_model(config, args.density, seed=args.seed)
    rows = bench.speed_table(config, args.density, args.bench_batches, args.bench_steps,
                             reps=args.bench_reps, whole_model=whole)
    table = bench.format_table(rows, f"Recurrent layers and whole model, {device['device']}, "
                                     f"H={args.hidden}, density {args.density:g}, "
                                     f"T={args.bench_steps}, {args.dtype}")
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"command": sys.argv, "device": device, "hidden": args.hidden, "layers": args.layers,
              "bidirectional": args.bidirectional, "density": args.density,
              "steps": args.bench_steps, "dtype": args.dtype, "rows": rows, "table": table}
    report.write_json(args.out / "bench.json", result)
    print(f"wrote {args.out / 'bench.json'}")


def train_runs(args, program, config: ModelConfig, train, valid, impl: str, compiles=None):
    """The dense and the pruned run (whichever the flags ask for). Returns ``(states, histories,
    timing)``. The pruned run starts from the dense run's checkpoint at the branch step, where
    the two are still identical."""
    from speech import train as train_lib

    runs = (["dense"] if args.compare_dense else []) + (["pruned"] if args.density < 1 else [])
    pruned_cfg = train_config(args, args.density)
    branch = train_lib.Checkpoints(args.out / "checkpoints" / "branch", keep=1)
    states, histories, timing = {}, {}, {}
    for name in runs:
        start_state = start_history = None
        if name == "pruned" and branch.latest_step() == pruned_cfg.branch_step:
            start_state, start_history = branch.restore(
                pruned_cfg.branch_step, train_lib.state_like(program, args.seed))
            start_history = {"train": start_history["train"], "valid": start_history["valid"],
                             "seconds": 0.0}
        began = time.perf_counter()
        states[name], histories[name] = train_lib.train_run(
            name, program, train_config(args, 1.0 if name == "dense" else args.density), train,
            valid, args.out, resume=args.resume, start_state=start_state,
            start_history=start_history,
            branch=branch if name == "dense" and "pruned" in runs else None,
            progress=args.progress, compiles=compiles)
        print(timing_line(name, histories[name]["timing"]))
        timing[f"{name}_train_seconds"] = round(time.perf_counter() - began, 1)
        timing[f"{name}_train_seconds_total"] = round(histories[name]["seconds"], 1)
    branch.close()
    return states, histories, timing


def cell_program(config: ModelConfig, features: FeatureConfig, impl: str, program=None):
    """The program of the cell form (dense lax.scan), which runs the parameters of either form
    as they are (SparseRNN's are nn.RNN(SparseRNNCell)'s); ``program``: the training program,
    reused when it is already the cell form."""
    from speech import train as train_lib

    if impl == "cell":
        return program or train_lib.Program(config, features)
    return train_lib.Program(dataclasses.replace(config, rnn_impl="cell"), features)


def evaluate_runs(args, program, config: ModelConfig, features: FeatureConfig, states: dict,
                  valid, test, impl: str) -> tuple[dict, dict, dict | None]:
    """CER/WER of each model on validation and test, the CER-against-density points, and whether
    the pruned model meets the target. The pruned model is scored in its served form: packed
    SparseWeights run by SparseRNN."""
    from jax_sprnn import pruning
    from speech import model as model_lib
    from speech import train as train_lib

    models, points = {}, {"one_shot": {}, "gradual": {}}
    cells = cell_program(config, features, impl, program)
    if "pruned" in states:
        served_cfg, packed = model_lib.export(config, states["pruned"]["params"],
                                              states["pruned"]["sparsity"])
        served = train_lib.Program(served_cfg, features)
    # Every decoder this evaluation runs, compiled at once for the evaluation's batch shape.
    shapes = sorted(set(valid.decode_shapes() + test.decode_shapes()))
    first = next(iter(states.values()))
    entries = cells.decoder_entries(
        cells.variables(first["params"], model_lib.dense_masks(first["params"])), shapes)
    entries += program.decoder_entries(program.variables(first["params"], first["sparsity"]),
                                       shapes)
    if "pruned" in states:
        entries += served.decoder_entries(packed, shapes)
    train_lib.precompile(entries)
    if "dense" in states:
        state = states["dense"]
        variables = program.variables(state["params"], state["sparsity"])
        models["dense"] = {"density": 1.0, "valid": train_lib.evaluate(program, variables, valid),
                           "test": train_lib.evaluate(program, variables, test)}
        points["dense"] = models["dense"]["test"]["cer"]
        # The dense model pruned once, without retraining: what gradual pruning is up against.
        params = state["params"]
        for d in (d for d in args.one_shot_densities if d < 1.0):
            pruned, masks = pruning.update_sparsity(params, model_lib.dense_masks(params), 1 - d)
            points["one_shot"][f"{d:g}"] = train_lib.evaluate(
                cells, cells.variables(pruned, masks), test)["cer"]
    if "pruned" in states:
        state = states["pruned"]
        models["pruned"] = {
            "density": model_lib.density(state["sparsity"]),
            "valid": train_lib.evaluate(served, packed, valid),
            "test": train_lib.evaluate(served, packed, test),
            "test_training_form": train_lib.evaluate(
                program, program.variables(state["params"], state["sparsity"]), test),
            "served_as": f"packed SparseWeights in the layer form ({config.cell} cell)"}
        points["gradual"][f"{args.density:g}"] = models["pruned"]["test"]["cer"]
    target = None
    if "dense" in models and "pruned" in models:
        dense_cer, pruned_cer = models["dense"]["test"]["cer"], models["pruned"]["test"]["cer"]
        target = {"dense_test_cer": dense_cer, "pruned_test_cer": pruned_cer,
                  "ratio": pruned_cer / dense_cer if dense_cer > 0 else None,
                  "gap_points": pruned_cer - dense_cer,
                  "met": pruned_cer <= 1.2 * dense_cer or pruned_cer - dense_cer <= 2.0}
    return models, points, target


def time_inference(args, config: ModelConfig, features: FeatureConfig, states: dict,
                   impl: str) -> tuple[dict, dict | None]:
    """The recurrent layers' latency against density, and (on a GPU, or with --speed-table) the
    table of layers and whole model at --bench-batches, sparse against dense lax.scan."""
    from speech import bench
    from speech import model as model_lib

    timed = dataclasses.replace(config, method="native" if on_gpu() else "auto")
    reps = args.bench_reps if on_gpu() else max(3, args.bench_reps // 4)  # the CPU is slow
    latency = {str(b): bench.recurrent_latency(timed, args.latency_densities, b,
                                               args.bench_steps, reps=reps)
               for b in args.latency_batches}
    if not (args.speed_table or (args.speed_table is None and on_gpu())):
        return latency, None
    whole = None
    if "dense" in states and "pruned" in states:
        dense_params = states["dense"]["params"]
        served_cfg, packed = model_lib.export(config, states["pruned"]["params"],
                                              states["pruned"]["sparsity"], method=timed.method)
        whole = (dataclasses.replace(config, rnn_impl="cell"), {"params": dense_params},
                 served_cfg, packed)
    rows = bench.speed_table(timed, args.density, args.bench_batches, args.bench_steps,
                             reps=args.bench_reps, whole_model=whole)
    device = bench.device_description()["device"]
    title = (f"{device}, H={args.hidden}, {args.layers} layers"
             f"{' bidirectional' if args.bidirectional else ''}, density {args.density:g}, "
             f"T={args.bench_steps} recurrent steps, {args.dtype}")
    return latency, {"rows": rows, "table": bench.format_table(rows, title)}


def main(argv=None) -> dict | None:
    """Run the example; returns the results (also written to --out/results.json)."""
    args = parse_args(argv)
    if args.bench_only:
        bench_only(args)
        return None

    from speech.profiling import CompileCounter

    with CompileCounter() as compiles:
        try:
            return _run(args, argv, compiles)
        except data_lib.DataError as error:  # bad data is the user's input: one line, no traceback
            raise SystemExit(f"speech_model.py: error: {error}") from None


def _run(args, argv, compiles) -> dict:
    import jax
    import numpy as np

    from speech import bench, report
    from speech import model as model_lib
    from speech import train as train_lib
    from speech.data import Batcher

    began = time.perf_counter()
    impl = args.rnn_impl if args.rnn_impl != "auto" else ("layer" if on_gpu() else "cell")
    prepare_out(args, run_config(args, impl))
    features = FeatureConfig(sample_rate=args.sample_rate, n_mels=args.n_mels)
    config = model_config(args, impl)

    sets = load_data(args, features)
    augmenter = Augmenter(args.noise_prob, tuple(args.snr_db), tuple(args.gain_db)) \
        if args.augment else None
    train = Batcher(sets["train"], args.batch_size, buckets=args.buckets,
                    bucket_seconds=args.bucket_seconds)
    # Evaluation: every batch of both splits at one length (one compilation of each decoder),
    # unless --bucket-seconds asks for buckets.
    longest = max(int(sets[role].lengths.max()) for role in ("valid", "test"))
    quantum = int(data_lib.BUCKET_QUANTUM_SECONDS * args.sample_rate)
    pad_to = None if args.bucket_seconds else -(-longest // quantum) * quantum
    valid, test = (Batcher(sets[role], args.batch_size, bucket_seconds=args.bucket_seconds,
                           pad_to=pad_to) for role in ("valid", "test"))
    timing = {"load_seconds": round(time.perf_counter() - began, 1)}
    print(f"data: {len(sets['train'])} train, {len(sets['valid'])} valid, {len(sets['test'])} test "
          f"utterances ({timing['load_seconds']} s to load); {impl} form on "
          f"{jax.devices()[0].device_kind}")

    program = train_lib.Program(config, features,
                                train_lib.make_optimizer(train_config(args, args.density)),
                                SpecAugment() if args.spec_augment else None, augmenter)
    states, histories, train_timing = train_runs(args, program, config, train, valid, impl,
                                                 compiles)
    timing.update(train_timing)

    t0 = time.perf_counter()
    models, cer_points, target = evaluate_runs(args, program, config, features, states, valid,
                                               test, impl)
    timing["eval_seconds"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    latency, speed = time_inference(args, config, features, states, impl)
    timing["bench_seconds"] = round(time.perf_counter() - t0, 1)
    timing["total_seconds"] = round(time.perf_counter() - began, 1)
    timing["compiles"] = compiles.count
    timing["compile_seconds"] = round(compiles.seconds, 1)
    timing["compiles_by_function"] = compiles.by_function()
    timing["train_buckets_seconds"] = sorted(
        round(int(n) / args.sample_rate, 2) for n in train.buckets())

    first = next(iter(states.values()))
    results = {
        "command": " ".join(["python", "examples/speech_model.py"] + list(
            sys.argv[1:] if argv is None else argv)),
        "device": bench.device_description(), "rnn_impl_training": impl,
        "data": {"kind": args.data, "train": len(sets["train"]), "valid": len(sets["valid"]),
                 "test": len(sets["test"]),
                 "train_hours": round(float(np.sum(sets["train"].lengths)) / args.sample_rate
                                      / 3600, 3)},
        "model": dataclasses.asdict(config),
        "parameters": model_lib.count_parameters(first["params"]),
        "recurrent_parameters": sum(int(np.prod(np.shape(m))) for m in jax.tree_util.tree_leaves(
            model_lib.boolean_masks(first["sparsity"]))),
        "train": dataclasses.asdict(train_config(args, args.density)), "timing": timing,
        "models": models, "target": target, "cer_vs_density": cer_points,
        "latency_vs_density": {"steps": args.bench_steps, "by_batch": latency},
        "speed": speed, "history": histories,
    }
    report.write_json(args.out / "results.json", results)
    report.plot_training(args.out / "training_curves.png", histories)
    report.plot_cer_vs_density(args.out / "cer_vs_density.png", cer_points)
    report.plot_latency(args.out / "latency_vs_density.png", latency,
                        f"Recurrent layers, {bench.device_description()['device']}, "
                        f"T={args.bench_steps}")
    print_summary(results, args.out, profile=args.profile)
    return results


def timing_line(name: str, t: dict) -> str:
    """One line of a training run's pace (speech.profiling.loop_report)."""
    return (f"[{name}] {t['steps']} steps in {t['wall_seconds']:.1f} s: "
            f"{t['steady_steps_per_second']:.1f} steps/s steady, {t['steps_per_second']:.1f} "
            f"overall; {t['compiles']} compilations ({t['compile_seconds']:.1f} s); waited "
            f"{t.get('input_seconds', 0.0):.1f} s for input")


def print_profile(results: dict) -> None:
    """Where the time went: each training loop's phases, the run's stages, the compilations."""
    timing = results["timing"]
    print("\nprofile: training loops (seconds; 'precompile': the step for every bucket; 'input': "
          "waiting for a batch; 'dispatch': step calls; 'log', 'drain': waiting for the device)")
    for name, history in results["history"].items():
        t = history.get("timing", {})
        phases = ", ".join(f"{k[:-8]} {v:.1f}" for k, v in t.items()
                           if k.endswith("_seconds") and k not in ("wall_seconds",
                                                                    "compile_seconds"))
        print(f"  {name}: wall {t.get('wall_seconds', 0):.1f}: {phases}")
    stages = ", ".join(f"{k[:-8]} {v}" for k, v in timing.items()
                       if k.endswith("_seconds") and "train" not in k and k != "compile_seconds")
    print(f"profile: stages (seconds): {stages}")
    print(f"profile: {timing['compiles']} compilations, {timing['compile_seconds']} s "
          f"(training buckets: {timing['train_buckets_seconds']} s of audio)")
    for fun, c in list(timing["compiles_by_function"].items())[:12]:
        print(f"  {c['count']:3d} x {fun}: {c['seconds']:.1f} s")


def print_summary(results: dict, out: Path, *, profile: bool = False) -> None:
    print()
    print("| model | recurrent density | valid CER | valid WER | test CER | test WER |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, m in results["models"].items():
        print(f"| {name} | {m['density']:.3f} | {m['valid']['cer']:.2f} | {m['valid']['wer']:.2f} "
              f"| {m['test']['cer']:.2f} | {m['test']['wer']:.2f} |")
    if results["target"]:
        t = results["target"]
        ratio = "n/a" if t["ratio"] is None else f"{t['ratio']:.2f}x"
        print(f"pruned/dense test CER: {ratio} ({t['gap_points']:+.2f} points): target "
              f"{'met' if t['met'] else 'NOT met'} (<= 1.2x or <= 2 points)")
    if results["speed"]:
        print()
        print(results["speed"]["table"])
    if profile:
        print_profile(results)
    timing = results["timing"]
    print()
    for name, history in results["history"].items():
        print(timing_line(name, history["timing"]))
    print(f"total {timing['total_seconds']:.0f} s, {timing['compiles']} compilations "
          f"({timing['compile_seconds']:.0f} s); results in {out}/results.json and {out}/*.png")


if __name__ == "__main__":
    main()
