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
"""

from __future__ import annotations

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

from . import model as model_lib
from . import text as text_lib
from .data import Batcher
from .features import FeatureConfig, SpecAugment, log_mel


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
        if self.learning_rate <= 0 or self.clip_norm <= 0:
            raise ValueError("learning rate and clip norm must be positive")

    @property
    def branch_step(self) -> int:
        """The step from which a pruned run differs from the dense run."""
        return int(round(self.prune_begin * self.steps))

    def schedule(self) -> pruning.CubicSchedule | None:
        if self.target_density >= 1.0:
            return None
        end = max(self.branch_step, int(round(self.prune_end * self.steps)))
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
    compiled step.
    """

    def __init__(self, config: model_lib.ModelConfig, features: FeatureConfig, tx=None,
                 spec_augment: SpecAugment | None = None):
        self.config = config
        self.features = features
        self.model = model_lib.SpeechModel(config)
        self.tx = tx
        self.spec_augment = spec_augment
        self.train_step = jax.jit(self._train_step, donate_argnums=(0, 1))
        self.decode_step = jax.jit(self._decode_step)

    def variables(self, params, sparsity) -> dict:
        if self.config.rnn_impl == "layer":
            return {"params": params, pruning.COLLECTION: sparsity}
        return {"params": params}

    def logits(self, variables, waves, wave_lengths, key=None):
        feats, frames = log_mel(waves, wave_lengths, self.features)
        if key is not None and self.spec_augment is not None:
            feats = self.spec_augment(feats, frames, key)
        return self.model.apply(variables, feats, frames)

    def _train_step(self, params, opt_state, sparsity, waves, wave_lengths, labels, label_lengths,
                    key):
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


def evaluate(program: Program, variables, batcher: Batcher, *, examples: int = 3) -> dict:
    """Greedy-decoded CER and WER (percent) of a whole split, and a few example transcripts."""
    refs, hyps = [], []
    for indices in batcher.in_order():
        batch = batcher.make(indices)
        best, lengths = program.decode_step(variables, batch.waves, batch.wave_lengths)
        hyps += text_lib.greedy_decode(np.asarray(best)[:batch.size], np.asarray(lengths)[:batch.size])
        refs += batch.texts
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

def _prefetch(make, items, depth: int = 2):
    """``make(item)`` for each item, computed one or two ahead in a background thread (the host
    prepares the next batch while the device runs the current step)."""
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
    """``(step, batch)`` for steps ``start..stop-1``: epoch ``e`` is shuffled by ``(seed, e)`` and
    step ``s`` augmented by ``(seed, s)``, so a resumed run sees exactly the batches it would have."""
    per_epoch = len(batcher.epoch(np.random.default_rng([seed, 0])))
    epoch, order = -1, None
    for step in range(start, stop):
        if step // per_epoch != epoch:
            epoch = step // per_epoch
            order = batcher.epoch(np.random.default_rng([seed, epoch]))
        yield step, order[step % per_epoch]


def train_run(name: str, program: Program, cfg: TrainConfig, train: Batcher, valid: Batcher,
              out_dir: Path, *, resume: bool, start_state: dict | None = None,
              start_history: dict | None = None, branch: Checkpoints | None = None,
              progress: bool = True) -> tuple[dict, dict]:
    """Train (or resume) one run. Returns ``(state, history)``; ``state`` holds ``params``,
    ``opt_state``, ``sparsity`` and ``step``.

    ``start_state``: the state to start from (the dense run's state at the branch step, for a
    pruned run), else a fresh init. ``branch``: where a dense run saves its state at
    ``cfg.branch_step`` for the pruned run.
    """
    from tqdm.auto import tqdm

    ckpt = Checkpoints(out_dir / "checkpoints" / name)
    schedule = cfg.schedule()
    if start_state is None:
        variables = model_lib.init_variables(program.config, jax.random.key(cfg.seed))
        params = variables["params"]
        sparsity = (variables[pruning.COLLECTION] if program.config.rnn_impl == "layer"
                    else model_lib.dense_masks(params))
        state = {"params": params, "opt_state": program.tx.init(params), "sparsity": sparsity,
                 "step": 0}
        history = {"train": [], "valid": [], "seconds": 0.0}
    else:
        state, history = start_state, start_history
    if resume and ckpt.latest_step() is not None:
        state, history = ckpt.restore(ckpt.latest_step(), state)
        print(f"[{name}] resumed from step {int(state['step'])}")
    state["step"] = int(state["step"])
    history = {k: (list(v) if isinstance(v, list) else v) for k, v in history.items()}
    # Commit the state to one device, as restored arrays are: a jitted step compiled for
    # uncommitted arguments compiles again for committed ones.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    commit = lambda tree: jax.device_put(tree, device)  # noqa: E731
    state.update(commit({k: state[k] for k in ("params", "opt_state", "sparsity")}))

    def make_batch(item):
        step, indices = item
        return step, train.make(indices, np.random.default_rng([cfg.seed, 1, step]))

    start, began = state["step"], time.perf_counter()
    seconds_before = float(history.get("seconds", 0.0))
    bar = tqdm(total=cfg.steps, initial=start, desc=name, unit="step", disable=not progress,
               dynamic_ncols=True, mininterval=1.0)
    pending = []  # (step, loss, grad norm) device values not yet read
    smoothed = None
    params, opt_state, sparsity = state["params"], state["opt_state"], state["sparsity"]

    def flush():
        nonlocal smoothed
        for s, loss, gnorm in pending:
            loss = float(loss)
            smoothed = loss if smoothed is None else 0.9 * smoothed + 0.1 * loss
            history["train"].append({"step": s, "loss": loss, "grad_norm": float(gnorm),
                                     "density": model_lib.density(sparsity)})
        pending.clear()

    def save(step):
        flush()
        history["seconds"] = seconds_before + time.perf_counter() - began
        ckpt.save(step, {"params": params, "opt_state": opt_state, "sparsity": sparsity,
                         "step": step}, history)

    try:
        for step, batch in _prefetch(make_batch, _batch_stream(train, cfg.seed, start, cfg.steps)):
            if schedule is not None and schedule.is_update_step(step):
                params, sparsity = commit(pruning.update_sparsity(params, sparsity, schedule(step)))
            if branch is not None and step == cfg.branch_step:
                flush()
                branch.save(step, {"params": params, "opt_state": opt_state,
                                   "sparsity": sparsity, "step": step}, history)
            params, opt_state, loss, gnorm = program.train_step(
                params, opt_state, sparsity, batch.waves, batch.wave_lengths, batch.labels,
                batch.label_lengths, jax.random.fold_in(jax.random.key(cfg.seed), step))
            done = step + 1
            bar.update(1)
            if step % cfg.log_every == 0 or done == cfg.steps:
                pending.append((step, loss, gnorm))
                flush()
                bar.set_postfix(loss=f"{smoothed:.3f}", density=f"{model_lib.density(sparsity):.2f}",
                                refresh=False)
            if done % cfg.eval_every == 0 or done == cfg.steps:
                scores = evaluate(program, program.variables(params, sparsity), valid, examples=1)
                history["valid"].append({"step": done, "cer": scores["cer"], "wer": scores["wer"],
                                         "density": model_lib.density(sparsity)})
                bar.write(f"[{name}] step {done}: valid CER {scores['cer']:.2f}% WER "
                          f"{scores['wer']:.2f}%  density {model_lib.density(sparsity):.3f}  "
                          f"| {scores['examples'][0]['ref']!r} -> {scores['examples'][0]['hyp']!r}")
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                save(done)
    finally:
        bar.close()
        ckpt.close()
    flush()
    history["seconds"] = seconds_before + time.perf_counter() - began
    return {"params": params, "opt_state": opt_state, "sparsity": sparsity,
            "step": max(start, cfg.steps)}, history
