"""Save and load user-model checkpoints without pickle: orbax for arrays, JSON for everything else.

Checkpoint layout (``directory`` local or anything etils ``epath`` understands, e.g. ``gs://``)::

    <directory>/
      model_config.json   written LAST (its presence marks a complete save):
                          {"format": "tokenminds.user_model", "format_version": 1,
                           "version": "tm-<16 hex>",          content hash of config JSON + every parameter's bytes
                           "parent_version": "tm-..." | null, the checkpoint this one was trained from
                           "step": N,                         global optimizer steps so far
                           "state_digest": "<16 hex>",        hash of the optimizer state (checked on resume)
                           "config": {...ModelConfig...},
                           "vocabulary": {...vocabulary.json manifest...},
                           "feature_spec": {...feature_spec.json...},
                           "training_days": ["2026-01-02", ...],   every day trained on, parent's first
                           "runs": [{...one entry per training run: days, steps, hyper-parameters, loss,
                                     throughput...}],
                           "param_shapes": {"['encoder']['token_embedding']['embedding']": {...}, ...},
                           "num_params": ...}
      params/             orbax StandardCheckpointer: the parameter pytree (float32)
      train_state/        orbax StandardCheckpointer: {"opt_state": optax state}
      tensorboard/        (written by the trainer) TensorBoard scalars
      _SUCCESS            empty, what the daily DAG's sensors wait for
      _MANIFEST.json      every other file's size and sha256, kind "user_model", extra.version = the version above

A checkpoint is written into a staging directory beside ``<directory>`` and swapped in with its manifest
(``tokenminds_model.manifest``): readers never see a half-written checkpoint, a failed save keeps the old one, and a
directory holding anything else is never replaced. Loading validates the JSON, verifies every file against the
manifest (so a truncated or edited file is named before anything is restored; ``verify=False`` skips this on workers
reloading what their driver verified), restores into the structure rebuilt from the config (and the optimizer), then
recomputes the version (and the optimizer state digest): a missing, truncated or edited checkpoint fails at once with
a :class:`CheckpointError` naming the directory, never with a silently different model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from tokenminds_model import manifest as manifest_lib
from tokenminds_model.checkpoints import as_path, read_json_document
from tokenminds_model.model import ModelConfig, Params, count_params, model_functions
from tokenminds_model.vocabulary import VocabularyLayout

CONFIG_FILENAME = "model_config.json"
PARAMS_DIRNAME = "params"
TRAIN_STATE_DIRNAME = "train_state"
TENSORBOARD_DIRNAME = "tensorboard"
CHECKPOINT_FORMAT = "tokenminds.user_model"
CHECKPOINT_FORMAT_VERSION = 1
ARTIFACT_KIND = "user_model"
# What a checkpoint directory may contain; anything else means it is not (only) ours and is never deleted.
# ``_SUCCESS`` (empty, after model_config.json) is the marker the daily DAG's sensors and backfills wait for.
SUCCESS_MARKER = "_SUCCESS"
CHECKPOINT_ENTRIES = (CONFIG_FILENAME, CONFIG_FILENAME + ".tmp", PARAMS_DIRNAME, TRAIN_STATE_DIRNAME,
                      TENSORBOARD_DIRNAME, SUCCESS_MARKER)

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A model checkpoint that is missing, incomplete, corrupt or inconsistent with its own model_config.json."""


class CheckpointIntegrityError(CheckpointError, manifest_lib.ArtifactIntegrityError):
    """A checkpoint whose files do not match its _MANIFEST.json (or that has none)."""


def _tree_digest(tree: Any, digest: "hashlib._Hash") -> None:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        array = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())


def compute_version(config: ModelConfig, params: Params) -> str:
    """Content hash of the config JSON and every parameter's path, dtype, shape and bytes: ``tm-<16 hex>``."""
    digest = hashlib.sha256()
    digest.update(config.to_json().encode())
    _tree_digest(params, digest)
    return f"tm-{digest.hexdigest()[:16]}"


def state_digest(opt_state: Any) -> str:
    digest = hashlib.sha256()
    _tree_digest(opt_state, digest)
    return digest.hexdigest()[:16]


def _param_shapes_json(params: Params) -> Dict[str, Dict[str, Any]]:
    return {jax.tree_util.keystr(path): {"shape": list(np.shape(leaf)), "dtype": np.dtype(leaf.dtype).name}
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def write_checkpoint_files(directory: PathLike, *, config: ModelConfig, params: Params, opt_state: Any, step: int,
                           layout: VocabularyLayout, feature_spec: Mapping[str, Any],
                           parent_version: Optional[str] = None, training_days: Sequence[str] = (),
                           runs: Sequence[Mapping[str, Any]] = ()) -> Dict[str, Any]:
    """Write a checkpoint's files into ``directory`` as they are (no staging, no manifest): for the staging
    directory of :func:`checkpoint_writer`. Use :func:`save_model_checkpoint` to write a checkpoint.

    ``model_config.json`` is removed first and written last (then ``_SUCCESS``). Returns the JSON document written.
    """
    path = as_path(directory)
    path.mkdir(parents=True, exist_ok=True)
    config_path = path / CONFIG_FILENAME
    for marker in (path / SUCCESS_MARKER, config_path):
        if marker.exists():
            marker.unlink()  # the old document must not describe the new arrays while they are written
    host_params = jax.tree.map(lambda leaf: np.asarray(jax.device_get(leaf)), params)
    host_opt_state = jax.tree.map(lambda leaf: np.asarray(jax.device_get(leaf)), opt_state)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / PARAMS_DIRNAME, host_params, force=True)
        checkpointer.save(path / TRAIN_STATE_DIRNAME, {"opt_state": host_opt_state}, force=True)
        checkpointer.wait_until_finished()
    document = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "version": compute_version(config, host_params),
        "parent_version": parent_version,
        "step": int(step),
        "state_digest": state_digest(host_opt_state),
        "config": config.to_dict(),
        "vocabulary": layout.to_manifest(),
        "feature_spec": dict(feature_spec),
        "training_days": list(training_days),
        "runs": [dict(run) for run in runs],
        "param_shapes": _param_shapes_json(host_params),
        "num_params": count_params(host_params),
    }
    temporary = path / (CONFIG_FILENAME + ".tmp")
    temporary.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    temporary.rename(config_path)
    (path / SUCCESS_MARKER).write_text("")
    return document


def checkpoint_writer(directory: PathLike) -> "contextlib.AbstractContextManager[manifest_lib.StagedArtifact]":
    """``with checkpoint_writer(dir) as staged: document = write_checkpoint_files(staged.path, ...);
    staged.extra["version"] = document["version"]``. Raises FileExistsError (and ValueError: "refusing to replace")
    at once unless ``directory`` is absent, empty or a model checkpoint; publishes with the manifest after the block,
    discards the staging directory (keeping the old checkpoint) if the block raises."""
    return manifest_lib.artifact_writer(as_path(directory), ARTIFACT_KIND, legacy_entries=CHECKPOINT_ENTRIES)


def save_model_checkpoint(directory: PathLike, *, config: ModelConfig, params: Params, opt_state: Any, step: int,
                          layout: VocabularyLayout, feature_spec: Mapping[str, Any],
                          parent_version: Optional[str] = None, training_days: Sequence[str] = (),
                          runs: Sequence[Mapping[str, Any]] = ()) -> Dict[str, Any]:
    """Write a checkpoint to ``directory`` (an existing checkpoint there is replaced, anything else refused):
    :func:`write_checkpoint_files` into a staging directory, then published with its manifest. Returns the JSON
    document written."""
    with checkpoint_writer(directory) as staged:
        document = write_checkpoint_files(staged.path, config=config, params=params, opt_state=opt_state, step=step,
                                          layout=layout, feature_spec=feature_spec, parent_version=parent_version,
                                          training_days=training_days, runs=runs)
        staged.extra["version"] = document["version"]
    return document


def read_checkpoint_document(directory: PathLike, *, verify: bool = True) -> Dict[str, Any]:
    """Parse and validate ``<directory>/model_config.json``, then (``verify``) check every file of the checkpoint
    against its manifest; raises naming the directory on any problem (:class:`CheckpointIntegrityError`, naming the
    file, for a damaged checkpoint)."""
    path = as_path(directory)
    document = read_json_document(
        path, CONFIG_FILENAME, what="model checkpoint", expected_format=CHECKPOINT_FORMAT,
        format_version=CHECKPOINT_FORMAT_VERSION, corrupt=CheckpointError, incomplete=CheckpointError,
        not_a_directory=CheckpointError,
        required=("version", "step", "state_digest", "config", "vocabulary", "feature_spec", "training_days", "runs"))
    _parse(document, path)
    if verify:
        manifest_lib.verify_artifact(path, ARTIFACT_KIND, version=document["version"], descriptor=CONFIG_FILENAME,
                                     error=CheckpointIntegrityError)
    return document


def _parse(document: Mapping[str, Any], path: epath.Path) -> Tuple[ModelConfig, VocabularyLayout]:
    try:
        return ModelConfig.from_dict(document["config"]), VocabularyLayout.from_manifest(document["vocabulary"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"corrupt {CONFIG_FILENAME} in {path}: {error}") from None


def _restore(path: epath.Path, name: str, target: Any) -> Any:
    directory = path / name
    if not directory.exists():
        raise CheckpointError(f"{path} has {CONFIG_FILENAME} but no {name}/ directory")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(directory, target)
    except Exception as error:  # orbax/tensorstore raise many types for missing or damaged files
        raise CheckpointError(f"cannot restore {directory}: {type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}") from error
    return jax.tree.map(np.asarray, restored)


def _restore_params(path: epath.Path, document: Mapping[str, Any], config: ModelConfig) -> Params:
    params = _restore(path, PARAMS_DIRNAME, model_functions(config).param_shapes())
    version = compute_version(config, params)
    if version != document["version"]:
        raise CheckpointError(f"model checkpoint {path} does not match its {CONFIG_FILENAME}: recorded version "
                              f"{document['version']!r}, restored params hash to {version!r}")
    return params


def load_model(checkpoint_dir: PathLike, *, verify: bool = True) -> Tuple[ModelConfig, Params, VocabularyLayout]:
    """``(config, params, layout)`` of a checkpoint, params as host NumPy arrays, files (``verify``) and version
    verified.

    For evaluation and batch inference: ``model_functions(config)`` gives the jit-able encode / user_embedding /
    decode functions of these params.
    """
    path = as_path(checkpoint_dir)
    document = read_checkpoint_document(path, verify=verify)
    config, layout = _parse(document, path)
    return config, _restore_params(path, document, config), layout


@dataclasses.dataclass(frozen=True, eq=False)
class TrainingCheckpoint:
    """Everything needed to continue training: the JSON document, parsed config and layout, params, optimizer."""

    document: Dict[str, Any]
    config: ModelConfig
    layout: VocabularyLayout
    params: Params
    opt_state: Any

    @property
    def step(self) -> int:
        return int(self.document["step"])

    @property
    def version(self) -> str:
        return self.document["version"]


def restore_train_state(checkpoint_dir: PathLike, opt_state_shapes: Callable[[Params], Any], *,
                        verify: bool = True) -> TrainingCheckpoint:
    """The checkpoint with its optimizer state, both verified against the recorded hashes.

    ``opt_state_shapes(param_shapes)`` gives the optimizer state's structure (e.g. ``jax.eval_shape`` of the
    optimizer's ``init``); the optimizer must have the same structure as the one that wrote the checkpoint.
    """
    path = as_path(checkpoint_dir)
    document = read_checkpoint_document(path, verify=verify)
    config, layout = _parse(document, path)
    params = _restore_params(path, document, config)
    target = {"opt_state": opt_state_shapes(model_functions(config).param_shapes())}
    opt_state = _restore(path, TRAIN_STATE_DIRNAME, target)["opt_state"]
    digest = state_digest(opt_state)
    if digest != document["state_digest"]:
        raise CheckpointError(f"optimizer state in {path} does not match its {CONFIG_FILENAME}: recorded digest "
                              f"{document['state_digest']!r}, restored state hashes to {digest!r}")
    return TrainingCheckpoint(document, config, layout, params, opt_state)


def check_legacy_user_model(directory: PathLike) -> str:
    """For ``python -m tokenminds_model.manifest adopt``: restore a manifest-less checkpoint (and its optimizer
    state, when it has one), recompute the version and state digest, and return the version if they are the recorded
    ones (raises otherwise)."""
    from tokenminds_model.train import opt_state_shapes  # the optimizer's structure lives with the trainer

    path = as_path(directory)
    if (path / TRAIN_STATE_DIRNAME).exists():
        return restore_train_state(path, opt_state_shapes, verify=False).version
    load_model(path, verify=False)
    return read_checkpoint_document(path, verify=False)["version"]
