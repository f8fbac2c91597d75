"""Training with gradual pruning, checkpoints, and CER/WER evaluation.

One *run* trains one model for ``steps`` steps: AdamW with global-norm gradient clipping and a
warm-up + cosine learning rate, wrapped in ``jax_sprnn.pruning.keep_pruned`` so pruned weights stay
exactly zero. A pruned run follows Zhu & Gupta's cubic schedule (``jax_sprnn.pruning.cubic_schedule``)
from ``prune_begin`` to ``prune_end`` (fractions of the run) and then fine-tunes at the final mask.
A dense run is the same with no schedule, so until ``prune_begin`` the two runs are identical, and
the pruned run starts from the dense run's checkpoint at that step instead of repeating it.

The masks are data of the jitted step (the cell form keeps boolean masks, the layer form
``PackedMask``s of a fixed layout), so a pruning update does not recompile it. The step compiles
once per length bucket.

So that the device never waits for the host, the host's work per step is small and off the main
thread: a background thread copies the next batches (plain padded audio) to the device while the
current step runs; the noise and gain augmentation, the features and the step's random key are
computed on the device, in the jitted step; and losses are read only every ``log_every`` steps,
one interval late, so that reading them does not wait for the step just dispatched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_sprnn import pruning
from jax_sprnn.pruning.masks import check_rule

from . import model as model_lib
from . import text as text_lib
from .data import Batcher
from .features import Augmenter, FeatureConfig, SpecAugment, log_mel
from .profiling import CompileCounter, Phases, compile_all, loop_report


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1600
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-2
    clip_norm: float = 1.0
    target_density: float = 0.1      # of the recurrent kernels; 1.0 trains dense
    prune_begin: float = 0.25        # fractions of `steps`
    prune_end: float = 0.75
    prune_every: int = 50            # steps between mask updates
    prune_rule: str = "row_balanced"  # how a mask update ranks weights: pruning.RULES
    eval_every: int = 400
    checkpoint_every: int = 400
    log_every: int = 10
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if not 0.0 < self.target_density <= 1.0:
            raise ValueError(f"target density must be in (0, 1], got {self.target_density}")
        if not 0.0 <= self.prune_begin <= self.prune_end <= 1.0:
            raise ValueError(f"need 0 <= prune_begin <= prune_end <= 1, got {self.prune_begin}, "
                             f"{self.prune_end}")
        for name in ("batch_size", "prune_every", "eval_every", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        check_rule(self.prune_rule)
        if self.learning_rate <= 0 or self.clip_norm <= 0:
            raise ValueError("learning rate and clip norm must be positive")

    def _step_at(self, fraction: float) -> int:
        """The step at ``fraction`` of the run, at most the last one (steps run 0 .. steps - 1:
        a pruning that ends at 1.0 must still reach its final mask)."""
        return min(int(round(fraction * self.steps)), self.steps - 1)

    @property
    def branch_step(self) -> int:
        """The step from which a pruned run differs from the dense run."""
        return self._step_at(self.prune_begin)

    def schedule(self) -> pruning.CubicSchedule | None:
        if self.target_density >= 1.0:
            return None
        end = max(self.branch_step, self._step_at(self.prune_end))
        return pruning.cubic_schedule(0.0, 1.0 - self.target_density, self.branch_step, end,
                                      self.prune_every)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformationExtraArgs:
    """AdamW (no decay on biases and norms) after global-norm clipping, under ``keep_pruned``."""
    lr = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, min(cfg.warmup_steps, cfg.steps),
                                            max(cfg.steps, cfg.warmup_steps + 1),
                                            end_value=cfg.learning_rate * 0.05)
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim > 1, params)  # noqa: E731
    inner = optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                        optax.adamw(lr, weight_decay=cfg.weight_decay, mask=decay_mask))
    return pruning.keep_pruned(inner)


class Program:
    """The jitted computations of one model configuration: the training step and the decoder.

    The recurrent masks (``sparsity``) are arguments, so the dense and the pruned runs share the
    compiled step. ``augment`` (waveform noise and gain) and ``spec_augment`` run inside the
    training step, on the device.
    """

    def __init__(self, config: model_lib.ModelConfig, features: FeatureConfig, tx=None,
                 spec_augment: SpecAugment | None = None, augment: Augmenter | None = None):
        self.config = config
        self.features = features
        self.model = model_lib.SpeechModel(config)
        self.tx = tx
        self.spec_augment = spec_augment
        self.augment = augment
        self._jit_step = jax.jit(self._train_step, donate_argnums=(0, 1))
        self._jit_decode = jax.jit(self._decode_step)
        # compiled ahead (precompile): (waves shape, labels shape) -> step, waves shape -> decoder
        self.compiled_steps: dict = {}
        self.compiled_decoders: dict = {}

    def variables(self, params, sparsity) -> dict:
        if self.config.rnn_impl == "layer":
            return {"params": params, pruning.COLLECTION: sparsity}
        return {"params": params}

    def logits(self, variables, waves, wave_lengths, key=None):
        feats, frames = log_mel(waves, wave_lengths, self.features)
        if key is not None and self.spec_augment is not None:
            feats = self.spec_augment(feats, frames, key)
        return self.model.apply(variables, feats, frames)

    def train_step(self, params, opt_state, sparsity, waves, wave_lengths, labels, label_lengths,
                   seed, step):
        """``(params, opt_state, loss, grad_norm)`` after one step (``params`` and
        ``opt_state`` donated); the step compiled ahead for this batch shape, if it was."""
        step_fn = self.compiled_steps.get((waves.shape, labels.shape), self._jit_step)
        return step_fn(params, opt_state, sparsity, waves, wave_lengths, labels, label_lengths,
                       seed, step)

    def decode_step(self, variables, waves, wave_lengths):
        """``(best class per frame [B, T'] int8, output lengths [B])``; the decoder compiled
        ahead for this batch shape, if it was."""
        return self.compiled_decoders.get(np.shape(waves), self._jit_decode)(variables, waves,
                                                                            wave_lengths)

    def step_entries(self, params, opt_state, sparsity, seed, shapes) -> list:
        """:func:`precompile` entries of the training step for batch shapes ``(rows, samples,
        label length)``; arguments as :meth:`train_step` takes them (committed to the device;
        only their shapes matter)."""
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

        def spec(shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=device)

        return [(self.compiled_steps, ((rows, n), (rows, length)), self._jit_step,
                 (params, opt_state, sparsity, spec((rows, n), jnp.float32),
                  spec((rows,), jnp.int32), spec((rows, length), jnp.int32),
                  spec((rows,), jnp.int32), seed, spec((), jnp.int32)))
                for rows, n, length in shapes]

    def decoder_entries(self, variables, shapes) -> list:
        """:func:`precompile` entries of the decoder for batch shapes ``(rows, samples)``."""
        return [(self.compiled_decoders, shape, self._jit_decode,
                 (variables, jax.ShapeDtypeStruct(shape, jnp.float32),
                  jax.ShapeDtypeStruct(shape[:1], jnp.int32)))
                for shape in shapes]

    def _train_step(self, params, opt_state, sparsity, waves, wave_lengths, labels, label_lengths,
                    seed, step):
        """One step; ``seed`` and ``step`` (int32 scalars, traced: no recompilation per step)
        give its random key, so a resumed run draws what it would have drawn."""
        key_wave, key = jax.random.split(jax.random.fold_in(jax.random.key(seed), step))
        if self.augment is not None:
            waves = self.augment(waves, wave_lengths, key_wave)

        def loss_fn(p):
            logits, lengths = self.logits(self.variables(p, sparsity), waves, wave_lengths, key)
            logit_pad = (jnp.arange(logits.shape[1])[None, :] >= lengths[:, None]).astype(jnp.float32)
            label_pad = (jnp.arange(labels.shape[1])[None, :] >= label_lengths[:, None]
                         ).astype(jnp.float32)
            per_utt = optax.ctc_loss(logits, logit_pad, labels, label_pad)
            real = label_lengths > 0  # filler rows carry no label
            # Per character, so long and short batches weigh their characters equally.
            return jnp.sum(jnp.where(real, per_utt, 0.0)) / jnp.maximum(jnp.sum(label_lengths), 1)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        masks = pruning.param_masks(params, sparsity)
        updates, opt_state = self.tx.update(grads, opt_state, params, masks=masks)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads)))
        return optax.apply_updates(params, updates), opt_state, loss, grad_norm

    def _decode_step(self, variables, waves, wave_lengths):
        logits, lengths = self.logits(variables, waves, wave_lengths)
        return jnp.argmax(logits, -1).astype(jnp.int8), lengths


def precompile(entries) -> None:
    """Compile, all at once in parallel threads (:func:`speech.profiling.compile_all`), the
    entries ``(cache, key, jitted, args)`` not in their cache yet, and store each in
    ``cache[key]``: a step or decoder for every shape up front, instead of one after the other at
    each shape's first use."""
    todo = list({(id(e[0]), e[1]): e for e in entries if e[1] not in e[0]}.values())
    for (cache, key, _, _), compiled in zip(todo, compile_all([(j, a) for _, _, j, a in todo])):
        cache[key] = compiled


def evaluate(program: Program, variables, batcher: Batcher, *, examples: int = 3,
             in_flight: int = 4) -> dict:
    """Greedy-decoded CER and WER (percent) of a whole split, and a few example transcripts.
    Up to ``in_flight`` batches are dispatched before the first result is read."""
    refs, hyps, pending = [], [], []

    def read(oldest):
        nonlocal hyps
        batch, best, lengths = oldest
        hyps += text_lib.greedy_decode(np.asarray(best)[:batch.size],
                                       np.asarray(lengths)[:batch.size])

    for indices in batcher.in_order():
        batch = batcher.make(indices)
        pending.append((batch, *program.decode_step(variables, batch.waves, batch.wave_lengths)))
        refs += batch.texts
        if len(pending) > in_flight:
            read(pending.pop(0))
    for oldest in pending:
        read(oldest)
    scores = text_lib.error_rates(refs, hyps)
    scores["examples"] = [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:examples]]
    return scores


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

class Checkpoints:
    """Orbax checkpoints of one run: the train state (params, optimizer state, masks, step) and
    its history (JSON)."""

    def __init__(self, directory: Path, keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, history: dict) -> None:
        ocp = self._ocp
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        history=ocp.args.JsonSave(history)),
                          force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, like: dict) -> tuple[dict, dict]:
        ocp = self._ocp
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), history=ocp.args.JsonRestore()))
        return out["state"], out["history"]

    def close(self) -> None:
        self.manager.close()


# ---------------------------------------------------------------------------------------------
# A run
# ---------------------------------------------------------------------------------------------

def _prefetch(make, items, depth: int = 3):
    """``make(item)`` for each item, computed up to ``depth`` ahead in a background thread (the
    host prepares and copies the next batches while the device runs the current step)."""
    out: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            for item in items:
                if stop.is_set():
                    return
                out.put(make(item))
        except BaseException as e:  # handed to the consumer, which raises it
            out.put(e)
        out.put(None)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while (value := out.get()) is not None:
            if isinstance(value, BaseException):
                raise value
            yield value
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                out.get_nowait()
            except queue.Empty:
                thread.join(0.05)


def _batch_stream(batcher: Batcher, seed: int, start: int, stop: int):
    """``(step, batch indices)`` for steps ``start..stop-1``: epoch ``e`` is shuffled by
    ``(seed, e)``, so a resumed run sees exactly the batches it would have."""
    per_epoch = len(batcher.epoch(np.random.default_rng([seed, 0])))
    epoch, order = -1, None
    for step in range(start, stop):
        if step // per_epoch != epoch:
            epoch = step // per_epoch
            order = batcher.epoch(np.random.default_rng([seed, epoch]))
        yield step, order[step % per_epoch]


def fresh_state(program: Program, seed: int) -> dict:
    """A new run's training state: initial params, optimizer state and masks (all-true boolean
    masks in the cell form, the init's ``PackedMask``s in the layer form), at step 0."""
    variables = model_lib.init_variables(program.config, jax.random.key(seed))
    params = variables["params"]
    sparsity = (variables[pruning.COLLECTION] if program.config.rnn_impl == "layer"
                else model_lib.dense_masks(params))
    return {"params": params, "opt_state": program.tx.init(params), "sparsity": sparsity,
            "step": 0}


def _arrays(state: dict) -> dict:
    return {k: v for k, v in state.items() if k != "step"}


def state_like(program: Program, seed: int) -> dict:
    """The shapes, dtypes and device of :func:`fresh_state`, traced but not run (nothing
    compiles): the target a checkpoint restores into."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    arrays = jax.eval_shape(lambda: _arrays(fresh_state(program, seed)))
    like = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), arrays)
    return {**like, "step": 0}


class _Log:
    """The training history's loss records, read from the device one interval late: a record is
    kept as device scalars when its step is dispatched and converted at the next log step, when
    its step has long finished, so logging never waits for the step just dispatched."""

    def __init__(self, history: dict, density: float):
        self.history = history
        self.density = density  # of the current masks; changes only at pruning updates
        self.pending: list = []
        self.smoothed = None

    def add(self, step: int, loss, grad_norm) -> None:
        self.pending.append((step, loss, grad_norm, self.density))

    def flush(self, keep_last: bool = False) -> None:
        ready = self.pending[:-1] if keep_last else self.pending
        for step, loss, gnorm, density in ready:
            loss = float(loss)
            self.smoothed = loss if self.smoothed is None else 0.9 * self.smoothed + 0.1 * loss
            self.history["train"].append({"step": step, "loss": loss, "grad_norm": float(gnorm),
                                          "density": density})
        self.pending = self.pending[len(ready):]


def train_run(name: str, program: Program, cfg: TrainConfig, train: Batcher, valid: Batcher,
              out_dir: Path, *, resume: bool, start_state: dict | None = None,
              start_history: dict | None = None, branch: Checkpoints | None = None,
              progress: bool = True, compiles: CompileCounter | None = None) -> tuple[dict, dict]:
    """Train (or resume) one run. Returns ``(state, history)``; ``state`` holds ``params``,
    ``opt_state``, ``sparsity`` and ``step``; ``history["timing"]`` says where the loop's time
    went (:func:`speech.profiling.loop_report`).

    ``start_state``: the state to start from (the dense run's state at the branch step, for a
    pruned run), else a fresh init. ``branch``: where a dense run saves its state at
    ``cfg.branch_step`` for the pruned run. ``compiles``: the installed compile counter.
    """
    from tqdm.auto import tqdm

    ckpt = Checkpoints(out_dir / "checkpoints" / name)
    schedule = cfg.schedule()
    if start_state is None:  # (jitted: one compilation instead of one per small array op)
        state = {**jax.jit(lambda: _arrays(fresh_state(program, cfg.seed)))(), "step": 0}
        history = {"train": [], "valid": [], "seconds": 0.0}
    else:
        state, history = start_state, start_history
    if resume and ckpt.latest_step() is not None:
        state, history = ckpt.restore(ckpt.latest_step(), state)
        print(f"[{name}] resumed from step {int(state['step'])}")
    state["step"] = int(state["step"])
    history = {k: (list(v) if isinstance(v, list) else v) for k, v in history.items()
               if k != "timing"}
    # Commit the state to one device, as restored arrays are: a jitted step compiled for
    # uncommitted arguments compiles again for committed ones.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    commit = lambda tree: jax.device_put(tree, device)  # noqa: E731
    state.update(commit({k: state[k] for k in ("params", "opt_state", "sparsity")}))
    seed = commit(np.int32(cfg.seed))

    def make_batch(item):  # in the prefetch thread: the copy to the device starts there
        step, indices = item
        b = train.make(indices)
        return step, commit((b.waves, b.wave_lengths, b.labels, b.label_lengths, np.int32(step)))

    start, began = state["step"], time.perf_counter()
    seconds_before = float(history.get("seconds", 0.0))
    bar = tqdm(total=cfg.steps, initial=start, desc=name, unit="step", disable=not progress,
               dynamic_ncols=True, mininterval=1.0)
    params, opt_state, sparsity = state["params"], state["opt_state"], state["sparsity"]
    log = _Log(history, model_lib.density(sparsity))
    counter = compiles if compiles is not None else CompileCounter()
    phases = Phases(counter)

    def drain():
        """Wait for the dispatched steps (device work, part of the pace) before an occasional
        phase, so that the phase's own seconds are host work alone."""
        with phases("drain"):
            jax.block_until_ready(params)

    def save(step):
        drain()
        with phases("checkpoint"):
            log.flush()
            history["seconds"] = seconds_before + time.perf_counter() - began
            ckpt.save(step, {"params": params, "opt_state": opt_state, "sparsity": sparsity,
                             "step": step}, history)

    batches = _prefetch(make_batch, _batch_stream(train, cfg.seed, start, cfg.steps))
    loop_began = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            if compiles is None:
                stack.enter_context(counter)
            if start < cfg.steps:  # (the prefetch thread fills its queue meanwhile)
                with phases("precompile"):
                    precompile(program.step_entries(params, opt_state, sparsity, seed,
                                                    train.batch_shapes())
                               + program.decoder_entries(program.variables(params, sparsity),
                                                         valid.decode_shapes()))
            while True:
                with phases("input"):
                    item = next(batches, None)
                if item is None:
                    break
                step, (waves, wave_lengths, labels, label_lengths, step_array) = item
                if schedule is not None and schedule.is_update_step(step):
                    drain()
                    with phases("prune"):
                        params, sparsity = commit(pruning.update_sparsity(
                            params, sparsity, schedule(step), rule=cfg.prune_rule))
                        log.density = model_lib.density(sparsity)
                if branch is not None and step == cfg.branch_step:
                    drain()
                    with phases("checkpoint"):
                        log.flush()
                        branch.save(step, {"params": params, "opt_state": opt_state,
                                           "sparsity": sparsity, "step": step}, history)
                with phases("dispatch"):
                    params, opt_state, loss, gnorm = program.train_step(
                        params, opt_state, sparsity, waves, wave_lengths, labels, label_lengths,
                        seed, step_array)
                done = step + 1
                bar.update(1)
                if step % cfg.log_every == 0 or done == cfg.steps:
                    with phases("log"):
                        log.add(step, loss, gnorm)
                        log.flush(keep_last=True)
                        if log.smoothed is not None:
                            bar.set_postfix(loss=f"{log.smoothed:.3f}",
                                            density=f"{log.density:.2f}", refresh=False)
                if done % cfg.eval_every == 0 or done == cfg.steps:
                    drain()
                    with phases("eval"):
                        scores = evaluate(program, program.variables(params, sparsity), valid,
                                          examples=1)
                    history["valid"].append({"step": done, "cer": scores["cer"],
                                             "wer": scores["wer"], "density": log.density})
                    bar.write(f"[{name}] step {done}: valid CER {scores['cer']:.2f}% WER "
                              f"{scores['wer']:.2f}%  density {log.density:.3f}  "
                              f"| {scores['examples'][0]['ref']!r} -> "
                              f"{scores['examples'][0]['hyp']!r}")
                if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                    save(done)
    finally:
        batches.close()
        bar.close()
        ckpt.close()
    log.flush()
    history["seconds"] = seconds_before + time.perf_counter() - began
    history["timing"] = loop_report(max(0, cfg.steps - start), time.perf_counter() - loop_began,
                                    phases)
    return {"params": params, "opt_state": opt_state, "sparsity": sparsity,
            "step": max(start, cfg.steps)}, history
