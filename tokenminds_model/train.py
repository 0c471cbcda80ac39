"""Continuous (daily) training of the TokenMinds user model.

    python -m tokenminds_model.train --examples=<root>/examples/date=D [more dirs] --output=<checkpoint_dir> \
        [--init_from=<yesterday's checkpoint dir>] [--preset=tiny|base|large] [--steps=N] [--batch_size=B] \
        [--learning_rate=LR] [--schedule=constant|warmup_cosine] [--warmup_steps=W] [--seed=S] \
        [--devices=auto|N] [--param_sharding=replicated|fsdp] [--compute_dtype=auto|float32|bfloat16]

Fresh start: the model config comes from the examples' ``vocabulary.json`` + ``feature_spec.json`` and ``--preset``
(plus ``--max_tokens``, ``--dropout``, ``--model_overrides='{"d_model": 128}'``); parameters are initialised from
``--seed``. Resume (``--init_from``): config, parameters, the optax optimizer state and the global step come from the
checkpoint, and the examples must have exactly the checkpoint's vocabulary manifest (same SID model, query
tokenizer, feature transform) and feature spec, or the job stops before training. ``--steps`` is the number of
steps of *this* run; the global step continues.

Learning rate: ``constant`` (default, what continuous training wants), or ``warmup_cosine``: linear warm-up over
``--warmup_steps`` then cosine decay to ``end_lr_ratio * lr`` over this run's ``--steps`` (each run, e.g. each day,
warms up and decays again; the optimizer's moments carry over). Optimizer: AdamW (b2 0.98, weight decay on
matrices only) after global-norm gradient clipping; its state has the same structure for both schedules, so a run
may change schedule or learning rate when resuming.

Data: ``tokenminds_model.data.numpy_batches`` (tf.data: interleaved shards, shuffle buffer, ``drop_remainder`` so
every batch has the same static shape and the step compiles once), repeated as needed. The order is a function of
``--seed`` (``--no_shuffle``: shards sorted, records in file order), and ``--skip_batches`` skips batches already
consumed, so an interrupted run can be resumed exactly. Dropout keys are ``fold_in(seed, global_step)``, so resuming
reproduces them.

Devices and precision: the step runs on a data-parallel ``jax.sharding.Mesh`` of the host's devices (``--devices``,
default every local device that divides the batch), the batch sharded on the ``data`` axis, parameters and optimizer
state replicated or, with ``--param_sharding=fsdp``, sharded too (:class:`TrainSharding`); results do not depend on
the device count, and checkpoints (host arrays) resume on any mesh. ``--compute_dtype=auto`` computes in the preset's
dtype on accelerators (bfloat16 for ``base`` and ``large``) and in float32 on CPU; parameters, optimizer state and
loss are float32 either way.

Output (see ``tokenminds_model.model_checkpoints``): ``<output>/model_config.json`` (config, vocabulary manifest,
feature spec, version = content hash, parent version, training days, run history), ``params/``, ``train_state/``
(orbax, no pickle), ``<output>/tensorboard`` (loss, accuracy, learning rate, gradient norm, examples/s, tokens/s),
``_SUCCESS`` and ``_MANIFEST.json`` (every file's size and sha256: ``tokenminds_model.manifest``). Everything is
written into a staging directory beside ``--output`` (TensorBoard events included, so point TensorBoard there while
training) that replaces ``--output`` only once the checkpoint is complete: a failed or interrupted run leaves the
previous checkpoint as it was. A rerun into the same output replaces it; a directory holding anything else is
refused (exit 2) before any work. Progress is a tqdm
bar; the summary printed at the end (and the :class:`TrainResult` of :func:`train`) has the final loss and the
throughput (examples/s and non-pad encoder tokens/s, excluding the first step, which includes compilation).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tokenminds_model import data as data_lib
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tokenminds_model.model import (DTYPES, PRESETS, ModelConfig, ModelFunctions, Params, check_compatible,
                                    count_params, default_compute_dtype, model_functions, model_inputs)
from tokenminds_model import manifest as manifest_lib
from tokenminds_model.model_checkpoints import (ARTIFACT_KIND, CHECKPOINT_ENTRIES, TENSORBOARD_DIRNAME,
                                                CheckpointError, TrainingCheckpoint, as_path, checkpoint_writer,
                                                load_model, read_checkpoint_document, restore_train_state,
                                                write_checkpoint_files)
from tokenminds_model.vocabulary import MANIFEST_FILENAME, VocabularyLayout

__all__ = ["TrainConfig", "TrainResult", "EarlyStopping", "validation_loss", "TrainSharding", "train", "load_model",
           "evaluate", "make_optimizer", "make_train_step", "train_step_for", "make_mesh", "learning_rate_schedule",
           "opt_state_shapes", "read_examples_metadata", "training_batches", "restore_train_state",
           "read_checkpoint_document", "TrainingCheckpoint", "CheckpointError", "main"]

SCHEDULES = ("constant", "warmup_cosine")
PARAM_SHARDINGS = ("replicated", "fsdp")
DATA_AXIS = "data"
# FSDP shards a parameter (and its optimizer moments) only from this many elements on; smaller ones are replicated.
FSDP_MIN_ELEMENTS = 2 ** 14


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (recorded in the checkpoint's run history)."""

    steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 1e-3
    schedule: str = "constant"
    warmup_steps: int = 100
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip_norm: float = 1.0
    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 10_000
    skip_batches: int = 0
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.warmup_steps < 0 or self.skip_batches < 0 or self.log_every < 1 or self.shuffle_buffer < 1:
            raise ValueError("warmup_steps and skip_batches must be >= 0, log_every and shuffle_buffer >= 1")
        if not 0.0 <= self.end_lr_ratio <= 1.0 or self.weight_decay < 0 or self.grad_clip_norm <= 0:
            raise ValueError("need 0 <= end_lr_ratio <= 1, weight_decay >= 0 and grad_clip_norm > 0")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
    """Validation during training: every ``every`` steps (and after the last), ``evaluate(config, params)`` returns
    metrics on held-out data; the checkpoint keeps the parameters (and optimizer state and step) with the best
    ``metric`` (higher is better: pass a negated loss), and training stops once ``patience`` evaluations in a row
    did not improve it by more than ``min_delta``. ``params`` are host arrays."""

    evaluate: Callable[[ModelConfig, Params], Mapping[str, float]]
    metric: str
    every: int = 500
    patience: int = 4
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        if self.every < 1 or self.patience < 1:
            raise ValueError(f"every and patience must be >= 1, got {self.every} and {self.patience}")


def validation_loss(example_dirs: Sequence[str], *, batch_size: int = 64, max_batches: Optional[int] = None
                    ) -> Callable[[ModelConfig, Params], Dict[str, float]]:
    """An ``EarlyStopping.evaluate`` reading held-out examples: :func:`evaluate`'s loss and accuracies, plus
    ``neg_loss`` (the metric to maximise)."""
    def run(config: ModelConfig, params: Params) -> Dict[str, float]:
        values = evaluate(config, params, example_dirs, batch_size=batch_size, max_batches=max_batches)
        return {**values, "neg_loss": -values["loss"]}

    return run


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What one run did. ``losses`` has one entry per step of this run; ``final_loss`` is the mean of the last
    ``min(10, steps)``. Throughputs exclude the first step (compilation); ``*_tokens_per_s`` count non-pad encoder
    tokens (after fitting to ``max_tokens``) and all encoder positions."""

    checkpoint_dir: str
    version: str
    parent_version: Optional[str]
    config: ModelConfig
    train_config: TrainConfig
    start_step: int
    step: int
    losses: Tuple[float, ...]
    final_loss: float
    examples_per_s: float
    tokens_per_s: float
    padded_tokens_per_s: float
    first_step_s: float
    wall_s: float
    training_days: Tuple[str, ...]
    num_params: int
    devices: int = 1
    param_sharding: str = "replicated"
    ms_per_step: float = 0.0
    steps_run: Optional[int] = None  # steps this run trained (fewer than planned when it stopped early)
    best_step: Optional[int] = None  # the checkpoint's global step (early stopping: the best validation)
    validation: Tuple[Dict[str, float], ...] = ()  # early stopping: {"step", metrics...} per evaluation

    def summary(self) -> Dict[str, Any]:
        return {"checkpoint_dir": self.checkpoint_dir, "version": self.version,
                "parent_version": self.parent_version, "start_step": self.start_step, "step": self.step,
                "steps": self.step - self.start_step if self.steps_run is None else self.steps_run,
                "first_loss": self.losses[0] if self.losses else None,
                "final_loss": self.final_loss, "examples_per_s": round(self.examples_per_s, 1),
                "tokens_per_s": round(self.tokens_per_s, 1), "padded_tokens_per_s": round(self.padded_tokens_per_s, 1),
                "first_step_s": round(self.first_step_s, 2), "wall_s": round(self.wall_s, 2),
                "training_days": list(self.training_days), "num_params": self.num_params,
                "devices": self.devices, "param_sharding": self.param_sharding,
                "ms_per_step": round(self.ms_per_step, 2), "compute_dtype": self.config.dtype,
                "steps_run": self.steps_run, "best_step": self.best_step, "validation": list(self.validation)}


# ---------------------------------------------------------------------------------------------------------------
# Optimizer and step.
# ---------------------------------------------------------------------------------------------------------------
def learning_rate_schedule(train_config: TrainConfig, start_step: int = 0) -> optax.Schedule:
    """Learning rate as a function of the optimizer's global step count (``start_step`` = this run's first)."""
    lr = train_config.learning_rate
    if train_config.schedule == "constant":
        return lambda count: jnp.full((), lr, jnp.float32)
    warmup = min(train_config.warmup_steps, train_config.steps - 1)
    cosine = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(train_config.steps, warmup + 1),
                                                lr * train_config.end_lr_ratio)
    # +1: the first update of the run (count == start_step) already gets a non-zero rate.
    return lambda count: cosine(count - start_step + 1)


def make_optimizer(train_config: TrainConfig, start_step: int = 0) -> optax.GradientTransformation:
    """Gradient clipping + AdamW. The state's structure does not depend on the hyper-parameters or schedule."""
    return optax.chain(
        optax.clip_by_global_norm(train_config.grad_clip_norm),
        optax.adamw(learning_rate_schedule(train_config, start_step), b1=0.9, b2=0.98, eps=1e-9,
                    weight_decay=train_config.weight_decay,
                    mask=lambda params: jax.tree.map(lambda leaf: leaf.ndim >= 2, params)),
    )


def opt_state_shapes(param_shapes: Params) -> Any:
    """The optimizer state's structure (any hyper-parameters give the same one): the orbax restore target."""
    return jax.eval_shape(make_optimizer(TrainConfig()).init, param_shapes)


# ---------------------------------------------------------------------------------------------------------------
# Devices and sharding.
# ---------------------------------------------------------------------------------------------------------------
def make_mesh(devices: Any = "auto", batch_size: Optional[int] = None) -> Mesh:
    """A 1-D ``Mesh`` (axis ``"data"``) over the first ``devices`` local devices.

    ``devices``: a count, or ``"auto"``/None/0 for every local device (on CPU that is one device unless
    ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` is set before JAX starts); with ``batch_size`` given,
    ``auto`` takes the largest count that divides it, an explicit count must divide it.
    """
    local = jax.local_devices()
    if devices in (None, 0, "auto", "all"):
        count = len(local)
        if batch_size:
            while batch_size % count:
                count -= 1
    else:
        count = int(devices)
        if not 1 <= count <= len(local):
            raise ValueError(f"--devices={count}, but this host has {len(local)} {local[0].platform} device(s)")
        if batch_size and batch_size % count:
            raise ValueError(f"--batch_size={batch_size} does not split over --devices={count} (the batch is "
                             f"sharded on the data axis: use a multiple of {count})")
    return Mesh(np.array(local[:count]), (DATA_AXIS,))


@dataclasses.dataclass(frozen=True)
class TrainSharding:
    """Where training state and batches live: ``mesh`` (1-D, axis ``"data"``), the batch sharded on its leading
    dimension over that axis, and parameters plus optimizer state either ``replicated`` on every device (data
    parallel: XLA all-reduces the gradients) or ``fsdp``: each array of at least ``FSDP_MIN_ELEMENTS`` elements is
    sharded over the data axis along its largest dimension that the device count divides (its Adam moments alike),
    and XLA gathers it where a step reads it. Either way one step is one compiled SPMD program and gives the
    1-device results up to float summation order (``tests/test_sharding.py``)."""

    mesh: Mesh
    params: str = "replicated"

    def __post_init__(self) -> None:
        if self.params not in PARAM_SHARDINGS:
            raise ValueError(f"param sharding must be one of {PARAM_SHARDINGS}, got {self.params!r}")

    @property
    def devices(self) -> int:
        return int(self.mesh.devices.size)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def batch(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))

    def for_shape(self, shape: Sequence[int]) -> NamedSharding:
        if self.params == "replicated" or self.devices == 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_ELEMENTS:
            return self.replicated
        divisible = [axis for axis, size in enumerate(shape) if size % self.devices == 0]
        if not divisible:
            return self.replicated
        axis = max(divisible, key=lambda a: (shape[a], -a))
        spec = [None] * len(shape)
        spec[axis] = DATA_AXIS
        return NamedSharding(self.mesh, PartitionSpec(*spec))

    def tree(self, shapes: Any) -> Any:
        """Shardings for a pytree of arrays or ``ShapeDtypeStruct`` (params, optimizer state)."""
        return jax.tree.map(lambda leaf: self.for_shape(np.shape(leaf)), shapes)

    def put_batch(self, inputs: Mapping[str, np.ndarray]) -> Dict[str, jax.Array]:
        return jax.device_put(dict(inputs), self.batch)


@functools.lru_cache(maxsize=16)
def _sharded_init(config: ModelConfig, sharding: TrainSharding):
    """Jitted ``(init params, init optimizer state)`` placing their outputs with ``sharding`` (compiled once per
    config and mesh; Adam's initial state does not depend on the hyper-parameters)."""
    fns = model_functions(config)
    param_shardings = sharding.tree(fns.param_shapes())
    opt_shardings = sharding.tree(opt_state_shapes(fns.param_shapes()))
    return (jax.jit(fns._init, out_shardings=param_shardings),
            jax.jit(make_optimizer(TrainConfig()).init, out_shardings=opt_shardings))


@functools.lru_cache(maxsize=16)
def _cached_train_step(config: ModelConfig, optimizer_config: TrainConfig, start_step: int,
                       sharding: Optional[TrainSharding]):
    return make_train_step(model_functions(config), make_optimizer(optimizer_config, start_step), sharding)


def train_step_for(config: ModelConfig, train_config: TrainConfig, start_step: int = 0,
                   sharding: Optional[TrainSharding] = None):
    """The jitted step of :func:`make_train_step` for this config, run and sharding, shared by runs whose optimizer
    updates are identical (so a process that trains several times, e.g. the tests, compiles once)."""
    tc = train_config
    # Keep only what the optimizer reads; a constant schedule does not depend on steps or the start step.
    constant = tc.schedule == "constant"
    key = TrainConfig(learning_rate=tc.learning_rate, schedule=tc.schedule, weight_decay=tc.weight_decay,
                      grad_clip_norm=tc.grad_clip_norm, end_lr_ratio=tc.end_lr_ratio,
                      steps=1 if constant else tc.steps, warmup_steps=0 if constant else tc.warmup_steps)
    return _cached_train_step(config, key, 0 if constant else start_step, sharding)


def make_train_step(fns: ModelFunctions, optimizer: optax.GradientTransformation,
                    sharding: Optional[TrainSharding] = None):
    """``step(params, opt_state, inputs, dropout_rng) -> (params, opt_state, metrics)``, jitted, state donated.
    ``dropout_rng`` may be None (no dropout) and must then be None on every call.

    With ``sharding``, the step is one SPMD program over its mesh: pass params/optimizer state placed with
    ``sharding.tree(...)`` and inputs with ``sharding.put_batch``; the outputs keep the state's shardings and the
    metrics are replicated. The loss is the global batch's (the sum over real targets divided by their count,
    reduced across devices), so the result does not depend on the device count."""

    def step(params, opt_state, inputs, dropout_rng):
        (_, metrics), grads = jax.value_and_grad(fns.loss, has_aux=True)(params, inputs, dropout_rng=dropout_rng)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {**metrics, "grad_norm": optax.tree.norm(grads)}

    if sharding is None:
        return jax.jit(step, donate_argnums=(0, 1))
    param_shapes = fns.param_shapes()
    out_shardings = (sharding.tree(param_shapes), sharding.tree(jax.eval_shape(optimizer.init, param_shapes)),
                     sharding.replicated)
    return jax.jit(step, donate_argnums=(0, 1), out_shardings=out_shardings)


# ---------------------------------------------------------------------------------------------------------------
# Examples.
# ---------------------------------------------------------------------------------------------------------------
def _read_json(path: str) -> Any:
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    with tf.io.gfile.GFile(path, "r") as handle:
        text = handle.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def _day_of(examples_dir: str) -> str:
    import tensorflow as tf

    stats_path = os.path.join(examples_dir, "stats.json")
    if tf.io.gfile.exists(stats_path):
        try:
            date = _read_json(stats_path).get("date")
            if isinstance(date, str) and date:
                return date
        except (ValueError, AttributeError):
            pass
    match = re.search(r"date=(\d{4}-\d{2}-\d{2})", examples_dir)
    return match.group(1) if match else os.path.basename(os.path.normpath(examples_dir))


def read_examples_metadata(example_dirs: Sequence[str]
                           ) -> Tuple[VocabularyLayout, Dict[str, Any], Dict[str, Any], List[str]]:
    """``(layout, vocabulary manifest, feature_spec, days)`` of example directories, which must agree.

    Fails fast (before any training) on a missing ``_SUCCESS``, vocabulary or feature spec, or on directories built
    with different vocabularies or specs.
    """
    if not example_dirs:
        raise ValueError("no --examples directories given")
    manifest = spec = None
    days = []
    for directory in example_dirs:
        data_lib.shard_files([directory])  # _SUCCESS present and at least one shard
        this_manifest = _read_json(os.path.join(directory, MANIFEST_FILENAME))
        this_spec = _read_json(os.path.join(directory, data_lib.FEATURE_SPEC_FILE))
        if manifest is None:
            manifest, spec = this_manifest, this_spec
        else:
            if this_manifest != manifest:
                raise ValueError(f"{directory} was built with a different vocabulary than {example_dirs[0]}: "
                                 f"{_differing_keys(manifest, this_manifest)}")
            if this_spec != spec:
                raise ValueError(f"{directory} has a different feature spec than {example_dirs[0]}: "
                                 f"{_differing_keys(spec, this_spec)}")
        days.append(_day_of(directory))
    try:
        layout = VocabularyLayout.from_manifest(manifest)
    except ValueError as error:
        raise ValueError(f"{os.path.join(example_dirs[0], MANIFEST_FILENAME)}: {error}") from None
    return layout, manifest, spec, days


def _differing_keys(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> List[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            keys.append(prefix + key)
        elif a[key] != b[key]:
            if isinstance(a[key], Mapping) and isinstance(b[key], Mapping):
                keys += _differing_keys(a[key], b[key], f"{prefix}{key}.")
            else:
                keys.append(f"{prefix}{key} ({a[key]!r} != {b[key]!r})")
    return keys


def training_batches(example_dirs: Sequence[str], config: ModelConfig, train_config: TrainConfig,
                     feature_spec: Optional[Mapping[str, Any]] = None) -> Iterator[Tuple[Dict[str, np.ndarray], int]]:
    """Endless ``(model inputs, non-pad encoder tokens)`` batches of ``train_config.batch_size`` examples."""
    batches = data_lib.numpy_batches(list(example_dirs), train_config.batch_size,
                                     seed=train_config.seed if train_config.shuffle else None, repeat=True,
                                     drop_remainder=True, shuffle_buffer=train_config.shuffle_buffer,
                                     feature_spec=dict(feature_spec) if feature_spec else None)
    for index, batch in enumerate(batches):
        if index < train_config.skip_batches:
            continue
        inputs = model_inputs(batch, config)
        yield inputs, int(np.count_nonzero(inputs["tokens"]))
    raise ValueError(f"{list(example_dirs)} hold fewer than batch_size={train_config.batch_size} examples")


def evaluate(config: ModelConfig, params: Params, example_dirs: Sequence[str], *, batch_size: int = 64,
             max_batches: Optional[int] = None) -> Dict[str, float]:
    """Mean loss and accuracies (no dropout) over the examples in file order, full batches only, weighted by the
    number of real targets: the same loss as training, for validation days and tests."""
    fns = model_functions(config)
    loss_fn = fns.jitted_loss
    totals = {"loss": 0.0, "token_accuracy": 0.0, "target_accuracy": 0.0}
    targets = 0.0
    batches = 0
    for batch in data_lib.numpy_batches(list(example_dirs), batch_size, seed=None, drop_remainder=True):
        _, metrics = loss_fn(params, model_inputs(batch, config))
        metrics = jax.device_get(metrics)
        weight = float(metrics["real_targets"])
        for key in totals:
            totals[key] += float(metrics[key]) * weight
        targets += weight
        batches += 1
        if max_batches is not None and batches >= max_batches:
            break
    if not targets:
        raise ValueError(f"no full batch of {batch_size} examples with targets in {list(example_dirs)}")
    return {**{key: value / targets for key, value in totals.items()}, "targets": targets, "batches": batches}


# ---------------------------------------------------------------------------------------------------------------
# Output directory.
# ---------------------------------------------------------------------------------------------------------------
def _check_output(output: str, init_from: Optional[str]) -> None:
    """Raises, before any work, if ``output`` overlaps ``init_from`` or holds anything but a model checkpoint (a
    rerun replaces the previous checkpoint; anything else is never touched)."""
    path = as_path(output)
    if init_from is not None:
        parent = as_path(init_from)
        if path == parent or parent.is_relative_to(path) or path.is_relative_to(parent):
            raise ValueError(f"--output {path} must not be, contain or lie inside --init_from {parent}")
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output {path} exists and is not a directory")
    manifest_lib.check_replaceable(path, ARTIFACT_KIND, legacy_entries=CHECKPOINT_ENTRIES)


class _Scalars:
    """TensorBoard scalars under ``<output>/tensorboard``; a no-op when disabled.

    Written with core ``tf.summary.write`` and the scalar plugin's metadata (what ``tf.summary.scalar`` writes),
    so the ``tensorboard`` package need not be installed where training runs.
    """

    def __init__(self, output: str, enabled: bool) -> None:
        self.writer = None
        if enabled:
            import tensorflow as tf
            from tensorflow.core.framework import summary_pb2

            self._tf = tf
            self._metadata = summary_pb2.SummaryMetadata(
                plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
                data_class=summary_pb2.DATA_CLASS_SCALAR).SerializeToString()
            self.writer = tf.summary.create_file_writer(os.path.join(os.fspath(as_path(output)),
                                                                     TENSORBOARD_DIRNAME))

    def write(self, step: int, values: Mapping[str, float]) -> None:
        if self.writer is None:
            return
        with self.writer.as_default():
            for name, value in values.items():
                self._tf.summary.write(name, self._tf.constant(float(value), self._tf.float32), step=step,
                                       metadata=self._metadata)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


# ---------------------------------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------------------------------
def train(example_dirs: Sequence[str], output: str, init_from: Optional[str] = None, *, preset: str = "tiny",
          steps: int = 1000, batch_size: int = 32, learning_rate: float = 1e-3, schedule: str = "constant",
          warmup_steps: int = 100, seed: int = 0, shuffle: bool = True, skip_batches: int = 0,
          log_every: int = 10, progress: bool = True, tensorboard: bool = True,
          train_config: Optional[TrainConfig] = None, devices: Any = "auto", param_sharding: str = "replicated",
          compute_dtype: str = "auto", early_stopping: Optional[EarlyStopping] = None,
          **model_overrides: Any) -> TrainResult:
    """Train (fresh, or continuing ``init_from``) on ``example_dirs`` and write a checkpoint to ``output``.

    ``early_stopping`` (:class:`EarlyStopping`) validates every N steps, stops when the metric stops improving and
    writes the best parameters (with their optimizer state and step) instead of the last.

    ``model_overrides`` (fresh start only) replace :class:`ModelConfig` fields of the preset, e.g. ``d_model=32``
    or ``max_tokens=128``. ``train_config`` replaces all the run's hyper-parameter arguments at once.

    ``devices`` (a count or ``"auto"``: every local device that divides the batch) and ``param_sharding``
    (``replicated`` or ``fsdp``) place the run on a data-parallel mesh (:class:`TrainSharding`); the checkpoint is
    the same whatever the device count, and a checkpoint written on N devices resumes on M. ``compute_dtype``:
    ``auto`` = the preset's (bfloat16 for ``base`` and ``large``/``paper``) on accelerators and float32 on CPU, where
    bfloat16 matmuls are slow; parameters, optimizer state, logits and loss are float32 either way. On a resumed run
    an explicit dtype replaces the checkpoint's (the parameters do not change), ``auto`` keeps it.
    """
    started = time.perf_counter()
    example_dirs = [example_dirs] if isinstance(example_dirs, str) else list(example_dirs)
    tc = train_config or TrainConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                                     schedule=schedule, warmup_steps=warmup_steps, seed=seed, shuffle=shuffle,
                                     skip_batches=skip_batches, log_every=log_every)
    layout, manifest, feature_spec, days = read_examples_metadata(example_dirs)
    _check_output(output, init_from)
    if compute_dtype != "auto" and compute_dtype not in DTYPES:
        raise ValueError(f"compute_dtype must be 'auto' or one of {tuple(DTYPES)}, got {compute_dtype!r}")
    sharding = TrainSharding(make_mesh(devices, tc.batch_size), param_sharding)

    parent_document: Dict[str, Any] = {}
    if init_from is not None:
        parent = restore_train_state(init_from, opt_state_shapes)
        parent_document, config, params, opt_state = parent.document, parent.config, parent.params, parent.opt_state
        if parent_document["vocabulary"] != manifest:
            raise ValueError(f"the examples' vocabulary differs from checkpoint {init_from}'s: "
                             f"{_differing_keys(parent_document['vocabulary'], manifest)}")
        if parent_document["feature_spec"] != feature_spec:
            raise ValueError(f"the examples' feature spec differs from checkpoint {init_from}'s: "
                             f"{_differing_keys(parent_document['feature_spec'], feature_spec)}")
        conflicting = {key: value for key, value in model_overrides.items() if getattr(config, key, None) != value}
        if conflicting:
            raise ValueError(f"cannot change the architecture of checkpoint {init_from}: {conflicting}")
        if compute_dtype != "auto":  # the compute dtype is not architecture: parameters are float32 either way
            config = config.replace(dtype=compute_dtype)
        start_step = int(parent_document["step"])
    else:
        if "dtype" not in model_overrides:
            model_overrides["dtype"] = (compute_dtype if compute_dtype != "auto" else
                                        default_compute_dtype(PRESETS.get(preset, {}).get("dtype", "float32")))
        config = ModelConfig.from_layout(layout, feature_spec, preset, **model_overrides)
        params, opt_state, start_step = None, None, 0
    check_compatible(config, layout, feature_spec)

    fns = model_functions(config)
    param_shardings = sharding.tree(fns.param_shapes())
    opt_shardings = sharding.tree(opt_state_shapes(fns.param_shapes()))
    if params is None:  # initialised in place (sharded already under fsdp); the values do not depend on the mesh
        init_params, init_opt_state = _sharded_init(config, sharding)
        params = init_params(jax.random.key(tc.seed))
        opt_state = init_opt_state(params)
    # A restored checkpoint is host arrays: placed with this run's shardings, whatever mesh wrote it.
    params, opt_state = jax.device_put(params, param_shardings), jax.device_put(opt_state, opt_shardings)
    # Everything (TensorBoard events, checkpoint, _SUCCESS) goes to a staging directory beside the output, which
    # replaces it with its manifest only at the end: an interrupted or failed run leaves the old checkpoint.
    with checkpoint_writer(output) as staged:
        step_fn = train_step_for(config, tc, start_step, sharding)
        schedule_fn = learning_rate_schedule(tc, start_step)
        scalars = _Scalars(staged.path, tensorboard)
        base_key = jax.random.key(tc.seed)

        from tqdm.auto import tqdm

        bar = tqdm(total=tc.steps, desc=f"train {config.d_model}d step {start_step}", unit="step", disable=not progress,
                   dynamic_ncols=True)
        losses: List[float] = []
        pending: List[Any] = []
        window_examples = window_tokens = 0
        total_tokens = 0
        first_step_s = 0.0
        steady_started = window_started = time.perf_counter()
        batches = training_batches(example_dirs, config, tc, feature_spec)
        validation: List[Dict[str, float]] = []
        best: Optional[Tuple[float, int, Any, Any]] = None  # (metric, global step, host params, host opt state)
        stale = 0
        steps_run = 0
        try:
            for index in range(tc.steps):
                global_step = start_step + index
                inputs, real_tokens = next(batches)
                inputs = sharding.put_batch(inputs)
                dropout_rng = jax.random.fold_in(base_key, global_step) if config.dropout > 0 else None
                params, opt_state, metrics = step_fn(params, opt_state, inputs, dropout_rng)
                pending.append(metrics)
                if index == 0:
                    jax.block_until_ready(metrics)
                    first_step_s = time.perf_counter() - started
                    steady_started = window_started = time.perf_counter()
                else:
                    total_tokens += real_tokens
                    window_examples += tc.batch_size
                    window_tokens += real_tokens
                bar.update(1)
                if (index + 1) % tc.log_every == 0 or index + 1 == tc.steps:
                    fetched = jax.device_get(pending)
                    pending = []
                    losses += [float(m["loss"]) for m in fetched]
                    now = time.perf_counter()
                    seconds = max(now - window_started, 1e-9)
                    values = {"train/loss": float(np.mean([m["loss"] for m in fetched])),
                              "train/token_accuracy": float(np.mean([m["token_accuracy"] for m in fetched])),
                              "train/target_accuracy": float(np.mean([m["target_accuracy"] for m in fetched])),
                              "train/grad_norm": float(np.mean([m["grad_norm"] for m in fetched])),
                              "train/learning_rate": float(schedule_fn(global_step))}
                    if window_examples:
                        values.update({"perf/examples_per_s": window_examples / seconds,
                                       "perf/tokens_per_s": window_tokens / seconds})
                    scalars.write(global_step + 1, values)
                    bar.set_postfix(loss=f"{values['train/loss']:.3f}",
                                    ex_s=f"{values.get('perf/examples_per_s', 0.0):.0f}",
                                    tok_s=f"{values.get('perf/tokens_per_s', 0.0):.0f}")
                    window_examples = window_tokens = 0
                    window_started = now
                steps_run = index + 1
                if early_stopping is not None and (steps_run % early_stopping.every == 0 or steps_run == tc.steps):
                    host_params = jax.device_get(params)
                    values = {k: float(v) for k, v in early_stopping.evaluate(config, host_params).items()}
                    validation.append({"step": global_step + 1, **values})
                    scalars.write(global_step + 1, {f"validation/{k}": v for k, v in values.items()})
                    value = values[early_stopping.metric]
                    if best is None or value > best[0] + early_stopping.min_delta:
                        best, stale = (value, global_step + 1, host_params, jax.device_get(opt_state)), 0
                    else:
                        stale += 1
                    bar.set_postfix(**{early_stopping.metric: f"{value:.4f}", "best": f"{best[0]:.4f}@{best[1]}"})
                    if stale >= early_stopping.patience:
                        break
            losses += [float(m["loss"]) for m in jax.device_get(pending)]  # steps since the last log (early stop)
            jax.block_until_ready(params)
            steady_s = max(time.perf_counter() - steady_started, 1e-9)
        finally:
            bar.close()
            scalars.close()
            batches.close()

        if not all(math.isfinite(loss) for loss in losses):
            raise FloatingPointError(f"training diverged: non-finite loss at step "
                                     f"{start_step + next(i for i, l in enumerate(losses) if not math.isfinite(l))}; "
                                     f"no checkpoint written")
        end_step = start_step + steps_run
        if best is not None:  # the checkpoint is the best validated state, not the last
            _, end_step, params, opt_state = best
        steady_steps = steps_run - 1
        if steady_steps:
            examples_per_s = steady_steps * tc.batch_size / steady_s
            tokens_per_s = total_tokens / steady_s
            padded_tokens_per_s = steady_steps * tc.batch_size * config.max_tokens / steady_s
        else:  # a single step: all we have includes compilation
            examples_per_s = tc.batch_size / first_step_s
            tokens_per_s = padded_tokens_per_s = 0.0
        final_loss = float(np.mean(losses[-min(10, len(losses)):]))
        training_days = list(parent_document.get("training_days", []))
        training_days += [day for day in days if day not in training_days]
        run = {"days": days, "example_dirs": example_dirs, "start_step": start_step, "end_step": end_step,
               "steps_run": steps_run, "validation": validation,
               "train_config": tc.to_dict(), "first_loss": losses[0], "final_loss": final_loss,
               "examples_per_s": round(examples_per_s, 2), "tokens_per_s": round(tokens_per_s, 1),
               "parent_version": parent_document.get("version"), "platform": jax.devices()[0].platform,
               "devices": sharding.devices, "param_sharding": sharding.params, "compute_dtype": config.dtype,
               "ms_per_step": round(1000 * steady_s / max(steady_steps, 1), 2) if steady_steps else None}
        document = write_checkpoint_files(staged.path, config=config, params=params, opt_state=opt_state,
                                          step=end_step, layout=layout, feature_spec=feature_spec,
                                          parent_version=parent_document.get("version"), training_days=training_days,
                                          runs=list(parent_document.get("runs", [])) + [run])
        staged.extra["version"] = document["version"]
    return TrainResult(
        checkpoint_dir=os.fspath(as_path(output)), version=document["version"],
        parent_version=parent_document.get("version"), config=config, train_config=tc, start_step=start_step,
        step=end_step, losses=tuple(losses), final_loss=final_loss, examples_per_s=examples_per_s,
        tokens_per_s=tokens_per_s, padded_tokens_per_s=padded_tokens_per_s, first_step_s=first_step_s,
        wall_s=time.perf_counter() - started, training_days=tuple(training_days), num_params=count_params(params),
        devices=sharding.devices, param_sharding=sharding.params,
        ms_per_step=1000 * steady_s / steady_steps if steady_steps else 1000 * first_step_s, steps_run=steps_run,
        best_step=end_step if best is not None else None, validation=tuple(validation))


# ---------------------------------------------------------------------------------------------------------------
# CLI.
# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tokenminds_model.train",
                                     description="Train (or continue training) the TokenMinds user model.")
    parser.add_argument("--examples", nargs="+", action="extend", required=True,
                        help="example directories (<root>/examples/date=D), all built with one vocabulary")
    parser.add_argument("--output", required=True, help="checkpoint directory to write (replaced on a rerun)")
    parser.add_argument("--init_from", default=None, help="checkpoint to continue from (params, optimizer, step)")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="architecture on a fresh start")
    parser.add_argument("--steps", type=int, default=1000, help="steps of this run")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--schedule", default="constant", choices=SCHEDULES)
    parser.add_argument("--warmup_steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_shuffle", action="store_true", help="read the examples in a fixed order")
    parser.add_argument("--skip_batches", type=int, default=0, help="skip this many batches first")
    parser.add_argument("--log_every", type=int, default=10)
    parser.add_argument("--max_tokens", type=int, default=None, help="fresh start: encoder length (cap)")
    parser.add_argument("--dropout", type=float, default=None, help="fresh start: dropout rate")
    parser.add_argument("--model_overrides", default=None, help='fresh start: JSON of ModelConfig fields')
    parser.add_argument("--devices", default="auto",
                        help="devices of the data-parallel mesh: a count, or auto (every local device that divides "
                             "--batch_size; on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N to get N)")
    parser.add_argument("--param_sharding", default="replicated", choices=PARAM_SHARDINGS,
                        help="replicated (data parallel) or fsdp (parameters and optimizer state sharded too)")
    parser.add_argument("--compute_dtype", default="auto", choices=("auto",) + tuple(DTYPES),
                        help="auto: the preset's dtype on accelerators, float32 on CPU; params stay float32")
    parser.add_argument("--validation_examples", nargs="+", action="extend", default=None,
                        help="held-out example directories: validate every --eval_every steps, stop after "
                             "--patience evaluations without a lower loss, and keep the best checkpoint")
    parser.add_argument("--eval_every", type=int, default=500, help="steps between validations")
    parser.add_argument("--patience", type=int, default=4, help="validations without improvement before stopping")
    parser.add_argument("--validation_batches", type=int, default=None, help="cap on validation batches")
    parser.add_argument("--no_progress", action="store_true", help="no tqdm progress bar")
    parser.add_argument("--no_tensorboard", action="store_true")
    args = parser.parse_args(argv)
    args.examples = [part for value in args.examples for part in value.split(",") if part]
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    overrides: Dict[str, Any] = {}
    try:
        if args.model_overrides:
            loaded = json.loads(args.model_overrides)
            if not isinstance(loaded, dict):
                raise ValueError(f"--model_overrides must be a JSON object, got {args.model_overrides!r}")
            overrides.update(loaded)
        if args.max_tokens is not None:
            overrides["max_tokens"] = args.max_tokens
        if args.dropout is not None:
            overrides["dropout"] = args.dropout
        early_stopping = None
        if args.validation_examples:
            early_stopping = EarlyStopping(
                validation_loss(args.validation_examples, batch_size=args.batch_size,
                                max_batches=args.validation_batches), metric="neg_loss", every=args.eval_every,
                patience=args.patience)
        result = train(args.examples, args.output, args.init_from, preset=args.preset, steps=args.steps,
                       batch_size=args.batch_size, learning_rate=args.learning_rate, schedule=args.schedule,
                       warmup_steps=args.warmup_steps, seed=args.seed, shuffle=not args.no_shuffle,
                       skip_batches=args.skip_batches, log_every=args.log_every, progress=not args.no_progress,
                       tensorboard=not args.no_tensorboard, devices=args.devices,
                       param_sharding=args.param_sharding, compute_dtype=args.compute_dtype,
                       early_stopping=early_stopping, **overrides)
    except (FileNotFoundError, FileExistsError, CheckpointError, data_lib.CorruptShardError, ValueError,
            TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = result.summary()
    print(f"trained {summary['steps']} steps (global step {summary['step']}) on {', '.join(result.training_days)}: "
          f"loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}; {summary['examples_per_s']:,.1f} "
          f"examples/s, {summary['tokens_per_s']:,.0f} tokens/s; checkpoint {summary['version']} "
          f"(parent {summary['parent_version']}) in {summary['checkpoint_dir']}; {summary['devices']} device(s), "
          f"{summary['param_sharding']} parameters, {summary['compute_dtype']} compute, "
          f"{summary['ms_per_step']:.1f} ms/step")
    print("RESULT " + json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
