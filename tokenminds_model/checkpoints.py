"""Save and load SID models without pickle: orbax for the parameter arrays, JSON for everything else.

Checkpoint layout (``directory`` may be local or anything etils ``epath`` understands, e.g. ``gs://``)::

    <directory>/
      config.json   {"format": "tokenminds.sid_model", "format_version": 1, "kind": "rqvae" | "rq_kmeans",
                     "version": "<kind>-<16 hex>", "config": {...}, "param_shapes": {"['model']['codebooks']": ...}}
      params/       orbax StandardCheckpointer directory with the parameter pytree
      metrics.json  (written by pipelines.train_sid_model) training metrics
      _MANIFEST.json  every other file's size and sha256, kind "sid_model", extra.version = config.json's version

The checkpoint is written into a staging directory beside ``<directory>`` and swapped in with its manifest
(``tokenminds_model.manifest``), so readers never see a half-written model and a failed save keeps the old one; a
directory holding anything but a SID model is never replaced. :func:`read_sid_model_config` (what drivers call)
parses ``config.json`` and verifies every file against the manifest before any data is read; :func:`load_sid_model`
also rebuilds the parameter structure from the config, restores the arrays bit for bit and recomputes the version
hash; a mismatch with the recorded version is an error, which is what guarantees that SIDs do not change across
save/reload. Workers reloading a model the driver verified may pass ``verify=False``.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Dict, Iterator, Sequence, Type, Union

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from tokenminds_model import manifest as manifest_lib
from tokenminds_model.rqvae import CONFIG_CLASS_BY_KIND, SID_MODEL_KINDS, TrainedSIDModel, sid_model_param_shapes

CONFIG_FILENAME = "config.json"
PARAMS_DIRNAME = "params"
CHECKPOINT_FORMAT = "tokenminds.sid_model"
CHECKPOINT_FORMAT_VERSION = 1
ARTIFACT_KIND = "sid_model"

PathLike = Union[str, os.PathLike]


def as_path(directory: PathLike) -> epath.Path:
    text = os.fspath(directory)
    # orbax wants absolute paths; leave URLs (gs://...) alone.
    return epath.Path(text if "://" in text else os.path.abspath(text))


def read_json_document(path: epath.Path, filename: str, *, what: str, expected_format: str, format_version: int,
                       required: Sequence[str], corrupt: Type[Exception] = ValueError,
                       incomplete: Type[Exception] = FileNotFoundError,
                       not_a_directory: Type[Exception] = NotADirectoryError) -> Dict[str, Any]:
    """The JSON document ``<path>/<filename>`` that describes a checkpoint (SID model or user model), checked for
    format, version and ``required`` keys. Every problem raises naming the directory: FileNotFoundError when the
    directory is absent, else ``not_a_directory`` / ``incomplete`` (no document: not a checkpoint or an unfinished
    save) / ``corrupt``, so each checkpoint family keeps its own error types. ``what`` names the family."""
    if not path.exists():
        raise FileNotFoundError(f"{what} directory does not exist: {path}")
    if not path.is_dir():
        raise not_a_directory(f"{what} path is not a directory: {path}")
    document_path = path / filename
    if not document_path.exists():
        raise incomplete(f"{path} has no {filename}: not a {what}, or an incomplete save")
    try:
        document = json.loads(document_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise corrupt(f"corrupt {filename} in {path}: not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise corrupt(f"corrupt {filename} in {path}: expected a JSON object")
    if document.get("format") != expected_format:
        raise corrupt(f"corrupt {filename} in {path}: format is {document.get('format')!r}, "
                      f"expected {expected_format!r}")
    if document.get("format_version") != format_version:
        raise corrupt(f"{filename} in {path} has format_version {document.get('format_version')!r}; "
                      f"this code reads version {format_version}")
    missing = [key for key in required if key not in document]
    if missing:
        raise corrupt(f"corrupt {filename} in {path}: missing {missing}")
    return document


def write_sid_model_files(model: TrainedSIDModel, directory: PathLike) -> epath.Path:
    """Write ``params/`` and then ``config.json`` into ``directory`` as they are (no staging, no manifest): for a
    staging directory of :func:`sid_model_writer`. Use :func:`save_sid_model` to write a checkpoint."""
    path = as_path(directory)
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / PARAMS_DIRNAME, model.params, force=True)
        checkpointer.wait_until_finished()

    param_shapes = {
        jax.tree_util.keystr(key_path): {"shape": list(np.shape(leaf)), "dtype": np.asarray(leaf).dtype.name}
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(model.params)[0]
    }
    document = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "kind": model.kind,
        "version": model.version,
        "config": model.config.to_dict(),
        "param_shapes": param_shapes,
    }
    temporary = path / (CONFIG_FILENAME + ".tmp")
    temporary.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    temporary.rename(path / CONFIG_FILENAME)
    return path


def check_sid_model_output(directory: PathLike, *, overwrite: bool = False) -> None:
    """Before any training: ``directory`` must be absent, empty or a SID model (replaced only with ``overwrite``).
    Raises FileExistsError naming it otherwise."""
    path = as_path(directory)
    manifest_lib.check_replaceable(path, ARTIFACT_KIND, legacy_markers=(CONFIG_FILENAME,))
    if not overwrite and ((path / CONFIG_FILENAME).exists() or (path / manifest_lib.MANIFEST_FILENAME).exists()):
        raise FileExistsError(f"{path} already holds a SID model checkpoint; pass overwrite=True (--overwrite) to "
                              "replace it")


@contextlib.contextmanager
def sid_model_writer(directory: PathLike, *, overwrite: bool = False) -> Iterator[manifest_lib.StagedArtifact]:
    """``with sid_model_writer(dir) as staged: write_sid_model_files(model, staged.path); staged.extra["version"] =
    model.version`` (plus any other file of the artifact, e.g. metrics.json): checked before, published with its
    manifest after the block, discarded (the old model kept) if the block raises."""
    check_sid_model_output(directory, overwrite=overwrite)
    with manifest_lib.artifact_writer(as_path(directory), ARTIFACT_KIND,
                                      legacy_markers=(CONFIG_FILENAME,)) as staged:
        yield staged


def save_sid_model(model: TrainedSIDModel, directory: PathLike, *, overwrite: bool = False) -> epath.Path:
    """Write ``model`` to ``directory`` (created if needed), staged and published with its manifest. Refuses to
    replace a checkpoint unless ``overwrite``, and never replaces a directory that holds something else."""
    with sid_model_writer(directory, overwrite=overwrite) as staged:
        write_sid_model_files(model, staged.path)
        staged.extra["version"] = model.version
    return as_path(directory)


def _parse_config(document: Dict[str, Any], path: epath.Path):
    kind = document["kind"]
    try:
        return CONFIG_CLASS_BY_KIND[kind].from_dict(document["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"corrupt {CONFIG_FILENAME} in {path}: invalid {kind} config ({error})") from error


def read_sid_model_config(directory: PathLike, *, verify: bool = True) -> Dict[str, Any]:
    """Parse and validate ``<directory>/config.json``, then (``verify``) check every file of the checkpoint against
    its manifest; raises with the directory named on any problem (:class:`~tokenminds_model.manifest.
    ArtifactIntegrityError` naming the file for a damaged checkpoint)."""
    path = as_path(directory)
    document = read_json_document(path, CONFIG_FILENAME, what="SID model checkpoint",
                                  expected_format=CHECKPOINT_FORMAT, format_version=CHECKPOINT_FORMAT_VERSION,
                                  required=("kind", "version", "config"))
    if document["kind"] not in SID_MODEL_KINDS:
        raise ValueError(f"corrupt {CONFIG_FILENAME} in {path}: unknown kind {document['kind']!r}, "
                         f"expected one of {SID_MODEL_KINDS}")
    _parse_config(document, path)
    if verify:
        manifest_lib.verify_artifact(path, ARTIFACT_KIND, version=document["version"], descriptor=CONFIG_FILENAME)
    return document


def load_sid_model(directory: PathLike, *, verify: bool = True) -> TrainedSIDModel:
    """Restore a model written by :func:`save_sid_model`; its SIDs and version are identical to the saved one's.
    ``verify=False`` skips the manifest check (a worker reloading what its driver verified)."""
    path = as_path(directory)
    document = read_sid_model_config(path, verify=verify)
    kind = document["kind"]
    config = _parse_config(document, path)

    params_path = path / PARAMS_DIRNAME
    if not params_path.exists():
        raise FileNotFoundError(f"{path} has {CONFIG_FILENAME} but no {PARAMS_DIRNAME}/ directory")
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(params_path, sid_model_param_shapes(kind, config))
    params = jax.tree.map(np.asarray, params)

    model = TrainedSIDModel(kind, config, params)
    if model.version != document["version"]:
        raise ValueError(f"SID model in {path} does not match its {CONFIG_FILENAME}: recorded version "
                         f"{document['version']!r}, restored params hash to {model.version!r}")
    return model


def check_legacy_sid_model(directory: PathLike) -> str:
    """For ``python -m tokenminds_model.manifest adopt``: restore a manifest-less checkpoint, recompute its version
    from the arrays, and return it if it is the recorded one (raises otherwise)."""
    return load_sid_model(directory, verify=False).version
