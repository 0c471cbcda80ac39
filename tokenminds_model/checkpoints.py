"""Save and load SID models without pickle: orbax for the parameter arrays, JSON for everything else.

Checkpoint layout (``directory`` may be local or anything etils ``epath`` understands, e.g. ``gs://``)::

    <directory>/
      config.json   {"format": "tokenminds.sid_model", "format_version": 1, "kind": "rqvae" | "rq_kmeans",
                     "version": "<kind>-<16 hex>", "config": {...}, "param_shapes": {"['model']['codebooks']": ...}}
      params/       orbax StandardCheckpointer directory with the parameter pytree

``config.json`` is written last, so a directory without it is an incomplete save. Loading rebuilds the parameter
structure from the config, restores the arrays bit for bit and recomputes the version hash; a mismatch with the
recorded version is an error, which is what guarantees that SIDs do not change across save/reload.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Union

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from tokenminds_model.rqvae import CONFIG_CLASS_BY_KIND, SID_MODEL_KINDS, TrainedSIDModel, sid_model_param_shapes

CONFIG_FILENAME = "config.json"
PARAMS_DIRNAME = "params"
CHECKPOINT_FORMAT = "tokenminds.sid_model"
CHECKPOINT_FORMAT_VERSION = 1

PathLike = Union[str, os.PathLike]


def _as_path(directory: PathLike) -> epath.Path:
    text = os.fspath(directory)
    # orbax wants absolute paths; leave URLs (gs://...) alone.
    return epath.Path(text if "://" in text else os.path.abspath(text))


def save_sid_model(model: TrainedSIDModel, directory: PathLike, *, overwrite: bool = False) -> epath.Path:
    """Write ``model`` to ``directory`` (created if needed). Refuses to replace a checkpoint unless ``overwrite``."""
    path = _as_path(directory)
    config_path = path / CONFIG_FILENAME
    if config_path.exists() and not overwrite:
        raise FileExistsError(f"{path} already holds a SID model checkpoint; pass overwrite=True to replace it")
    path.mkdir(parents=True, exist_ok=True)
    if config_path.exists():
        config_path.unlink()  # the old config must not describe the new params while they are being written

    # Without config.json any params/ left here is an incomplete save, safe to replace.
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
    temporary.rename(config_path)
    return path


def read_sid_model_config(directory: PathLike) -> Dict[str, Any]:
    """Parse and validate ``<directory>/config.json``; raises with the directory named on any problem."""
    path = _as_path(directory)
    if not path.exists():
        raise FileNotFoundError(f"SID model checkpoint directory does not exist: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"SID model checkpoint path is not a directory: {path}")
    config_path = path / CONFIG_FILENAME
    if not config_path.exists():
        raise FileNotFoundError(f"{path} has no {CONFIG_FILENAME}: not a SID model checkpoint, or an incomplete save")
    try:
        document = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"corrupt {CONFIG_FILENAME} in {path}: not valid JSON ({error})") from error
    if not isinstance(document, dict):
        raise ValueError(f"corrupt {CONFIG_FILENAME} in {path}: expected a JSON object")
    if document.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"corrupt {CONFIG_FILENAME} in {path}: format is {document.get('format')!r}, "
                         f"expected {CHECKPOINT_FORMAT!r}")
    if document.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(f"{CONFIG_FILENAME} in {path} has format_version {document.get('format_version')!r}; "
                         f"this code reads version {CHECKPOINT_FORMAT_VERSION}")
    missing = [key for key in ("kind", "version", "config") if key not in document]
    if missing:
        raise ValueError(f"corrupt {CONFIG_FILENAME} in {path}: missing {missing}")
    if document["kind"] not in SID_MODEL_KINDS:
        raise ValueError(f"corrupt {CONFIG_FILENAME} in {path}: unknown kind {document['kind']!r}, "
                         f"expected one of {SID_MODEL_KINDS}")
    return document


def load_sid_model(directory: PathLike) -> TrainedSIDModel:
    """Restore a model written by :func:`save_sid_model`; its SIDs and version are identical to the saved one's."""
    path = _as_path(directory)
    document = read_sid_model_config(path)
    kind = document["kind"]
    try:
        config = CONFIG_CLASS_BY_KIND[kind].from_dict(document["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"corrupt {CONFIG_FILENAME} in {path}: invalid {kind} config ({error})") from error

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
