"""Item tokenizer: RQ-VAE (TIGER-style) and an RQ-KMeans baseline that turn content embeddings into Semantic IDs.

A Semantic ID (SID) is ``levels`` discrete codes per item. Level 0 quantizes the item's latent vector against
codebook 0, level 1 quantizes what is left over (the residual) against codebook 1, and so on, so a SID prefix is a
coarse-to-fine description of the item.

* :func:`train_rqvae` fits an MLP encoder/decoder and the residual codebooks jointly (Flax linen + optax):
  loss = reconstruction MSE + beta * commitment loss (+ the codebook loss when ``codebook_update="gradient"``),
  with a straight-through estimator; by default (``codebook_update="ema"``) codewords are moving averages of the
  residuals assigned to them. Codebooks are initialised by residual k-means on encoder outputs of the first
  batches, and codes that went unused over the last ``dead_code_reseed_every`` steps are re-seeded with residuals
  of the current batch (codebook collapse is the failure mode to guard against).
* :func:`rq_kmeans` is the same residual quantizer fitted with k-means directly on the embeddings (identity
  encoder, no training): the baseline every RQ-VAE run is compared against.

Both return a :class:`TrainedSIDModel` whose ``encode(params, embeddings)`` is a pure, jit-able function, and whose
``version`` is a content hash of kind + config + parameter bytes (so it survives save/reload unchanged; see
``tokenminds_model.checkpoints``). Training is deterministic for a seed: same inputs and config give bit-identical
parameters and SIDs on the same platform.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Type, TypeVar, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from tokenminds_model.sid_metrics import sid_metrics

RQVAE_KIND = "rqvae"
RQ_KMEANS_KIND = "rq_kmeans"
SID_MODEL_KINDS = (RQVAE_KIND, RQ_KMEANS_KIND)

Params = Dict[str, Any]
CODEBOOK_UPDATES = ("ema", "gradient")
_ConfigT = TypeVar("_ConfigT", "RQVAEConfig", "RQKMeansConfig")


# ---------------------------------------------------------------------------------------------------------------
# Configs.
# ---------------------------------------------------------------------------------------------------------------
def _config_to_json(config: Any) -> str:
    # sort_keys: the JSON text feeds the model version hash, so it must not depend on field order.
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def _config_from_dict(cls: Type[_ConfigT], data: Mapping[str, Any]) -> _ConfigT:
    if not isinstance(data, Mapping):
        raise ValueError(f"{cls.__name__} must be a JSON object, got {type(data).__name__}")
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
    return cls(**dict(data))


@dataclasses.dataclass(frozen=True)
class RQVAEConfig:
    """Hyper-parameters of an RQ-VAE item tokenizer (hashable: it is a static argument of the jitted steps)."""

    input_dim: int
    latent_dim: int = 32
    hidden_dims: Tuple[int, ...] = (256, 128)  # encoder widths; the decoder mirrors them
    levels: int = 3
    codebook_size: int = 256
    commitment_beta: float = 0.25
    # "ema": codewords are exponential moving averages of the residuals assigned to them (online k-means, as in
    # VQ-VAE-2); they track a moving encoder much faster than "gradient" (the TIGER codebook-loss term under Adam),
    # which lets deeper levels lag behind a contracting latent and leaves codes unused.
    codebook_update: str = "ema"
    ema_decay: float = 0.99
    learning_rate: float = 1e-3
    batch_size: int = 512
    steps: int = 2000
    seed: int = 0
    # Codes unused over this many steps are replaced by residuals of the current batch; 0 disables re-seeding.
    dead_code_reseed_every: int = 100
    kmeans_init_iters: int = 20
    # k-means initialisation runs on (up to) this many items taken from the first training batches.
    kmeans_init_samples: int = 8192
    # Centre the inputs and scale them to unit average variance, so that the reconstruction term has the same
    # weight whatever the raw embedding scale is (unit-norm 384-d embeddings have per-element variance ~1/384).
    standardize_inputs: bool = True
    log_every: int = 100

    def __post_init__(self) -> None:
        # JSON gives lists; the config must stay hashable.
        object.__setattr__(self, "hidden_dims", tuple(int(width) for width in self.hidden_dims))
        positive = ("input_dim", "latent_dim", "levels", "codebook_size", "batch_size")
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"RQVAEConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("steps", "dead_code_reseed_every", "kmeans_init_iters", "log_every"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"RQVAEConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.kmeans_init_samples <= 0:
            raise ValueError(f"RQVAEConfig.kmeans_init_samples must be positive, got {self.kmeans_init_samples}")
        if any(width <= 0 for width in self.hidden_dims):
            raise ValueError(f"RQVAEConfig.hidden_dims must be positive, got {self.hidden_dims}")
        if self.learning_rate <= 0 or self.commitment_beta < 0:
            raise ValueError("RQVAEConfig needs learning_rate > 0 and commitment_beta >= 0")
        if self.codebook_update not in CODEBOOK_UPDATES:
            raise ValueError(f"RQVAEConfig.codebook_update must be one of {CODEBOOK_UPDATES}, "
                             f"got {self.codebook_update!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"RQVAEConfig.ema_decay must be in [0, 1), got {self.ema_decay}")

    def to_dict(self) -> Dict[str, Any]:
        return json.loads(self.to_json())

    def to_json(self) -> str:
        return _config_to_json(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RQVAEConfig":
        return _config_from_dict(cls, data)

    @classmethod
    def from_json(cls, text: str) -> "RQVAEConfig":
        return cls.from_dict(json.loads(text))


@dataclasses.dataclass(frozen=True)
class RQKMeansConfig:
    """Hyper-parameters of the RQ-KMeans baseline (residual k-means in the embedding space)."""

    input_dim: int
    levels: int = 3
    codebook_size: int = 256
    seed: int = 0
    kmeans_iters: int = 25
    kmeans_samples: int = 0  # fit on a deterministic sample of this many items; 0 = all items

    def __post_init__(self) -> None:
        for name in ("input_dim", "levels", "codebook_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"RQKMeansConfig.{name} must be positive, got {getattr(self, name)}")
        if self.kmeans_iters < 0 or self.kmeans_samples < 0:
            raise ValueError("RQKMeansConfig.kmeans_iters and kmeans_samples must be >= 0")

    def to_dict(self) -> Dict[str, Any]:
        return json.loads(self.to_json())

    def to_json(self) -> str:
        return _config_to_json(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RQKMeansConfig":
        return _config_from_dict(cls, data)

    @classmethod
    def from_json(cls, text: str) -> "RQKMeansConfig":
        return cls.from_dict(json.loads(text))


SIDConfig = Union[RQVAEConfig, RQKMeansConfig]
CONFIG_CLASS_BY_KIND: Dict[str, type] = {RQVAE_KIND: RQVAEConfig, RQ_KMEANS_KIND: RQKMeansConfig}


# ---------------------------------------------------------------------------------------------------------------
# Residual quantization and k-means (pure JAX).
# ---------------------------------------------------------------------------------------------------------------
def _squared_distances(points: jax.Array, centers: jax.Array) -> jax.Array:
    """``[N, K]`` squared Euclidean distances, via |x|^2 - 2 x.c + |c|^2 (one matmul instead of N*K*D memory)."""
    point_norms = jnp.sum(points * points, axis=-1, keepdims=True)
    center_norms = jnp.sum(centers * centers, axis=-1)[None, :]
    return jnp.maximum(point_norms - 2.0 * points @ centers.T + center_norms, 0.0)


def residual_quantize(codebooks: jax.Array, vectors: jax.Array) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Quantize ``vectors [N, D]`` level by level against ``codebooks [L, K, D]``.

    Returns ``codes int32[N, L]``, the chosen codewords ``[L, N, D]`` (differentiable w.r.t. the codebooks) and
    the residual each level quantized ``[L, N, D]`` (differentiable w.r.t. the vectors). The residual handed to the
    next level subtracts a stop-gradient codeword, so every codebook learns only from its own level's loss.
    """
    residual = vectors
    codes, chosen, residual_inputs = [], [], []
    for level in range(codebooks.shape[0]):
        codebook = codebooks[level]
        level_codes = jnp.argmin(
            _squared_distances(jax.lax.stop_gradient(residual), jax.lax.stop_gradient(codebook)), axis=-1
        ).astype(jnp.int32)
        codeword = jnp.take(codebook, level_codes, axis=0)
        codes.append(level_codes)
        chosen.append(codeword)
        residual_inputs.append(residual)
        residual = residual - jax.lax.stop_gradient(codeword)
    return jnp.stack(codes, axis=1), jnp.stack(chosen), jnp.stack(residual_inputs)


@functools.partial(jax.jit, static_argnames=("num_clusters",))
def kmeans_plus_plus_init(key: jax.Array, points: jax.Array, num_clusters: int) -> jax.Array:
    """Greedy k-means++ seeding (as in scikit-learn): each next center is the best, by total squared distance, of
    ``2 + log(k)`` candidates drawn with probability proportional to D(x)^2. The greedy pick rarely puts two
    centers in one well separated cluster, a local optimum Lloyd iterations cannot leave.

    With fewer distinct points than clusters the remaining draws are uniform and duplicate existing centers; those
    duplicates never win an argmin tie, so they are "dead" codes until re-seeded.
    """
    num_points = points.shape[0]
    num_candidates = 2 + int(math.log(num_clusters))
    key, first_key = jax.random.split(key)
    first = points[jax.random.randint(first_key, (), 0, num_points)]
    centers = jnp.zeros((num_clusters, points.shape[1]), points.dtype).at[0].set(first)
    nearest_sq = _squared_distances(points, first[None, :])[:, 0]

    def add_center(index, state):
        centers, nearest_sq, key = state
        key, draw_key = jax.random.split(key)
        total = nearest_sq.sum()
        probabilities = jnp.where(total > 0, nearest_sq / jnp.where(total > 0, total, 1.0), 1.0 / num_points)
        candidates = points[jax.random.choice(draw_key, num_points, (num_candidates,), p=probabilities)]
        candidate_nearest_sq = jnp.minimum(nearest_sq[None, :], _squared_distances(candidates, points))  # [C, N]
        best = jnp.argmin(candidate_nearest_sq.sum(axis=1))
        return centers.at[index].set(candidates[best]), candidate_nearest_sq[best], key

    centers, _, _ = jax.lax.fori_loop(1, num_clusters, add_center, (centers, nearest_sq, key))
    return centers


@functools.partial(jax.jit, static_argnames=("num_clusters", "iterations"))
def kmeans(key: jax.Array, points: jax.Array, num_clusters: int, iterations: int) -> jax.Array:
    """k-means++ seeding then ``iterations`` Lloyd steps; an empty cluster keeps its previous center."""

    def lloyd_step(_, centers):
        assignment = jnp.argmin(_squared_distances(points, centers), axis=-1)
        membership = jax.nn.one_hot(assignment, num_clusters, dtype=points.dtype)  # [N, K]
        counts = membership.sum(axis=0)
        sums = membership.T @ points
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centers)

    centers = kmeans_plus_plus_init(key, points, num_clusters)
    return jax.lax.fori_loop(0, iterations, lloyd_step, centers)


def residual_kmeans(key: jax.Array, points: Any, levels: int, codebook_size: int, iterations: int) -> jax.Array:
    """Residual k-means: fit level ``l`` on what levels ``< l`` left unexplained. Returns ``[L, K, D]``."""
    residual = jnp.asarray(points, jnp.float32)
    codebooks = []
    for level_key in jax.random.split(key, levels):
        centers = kmeans(level_key, residual, codebook_size, iterations)
        assignment = jnp.argmin(_squared_distances(residual, centers), axis=-1)
        residual = residual - centers[assignment]
        codebooks.append(centers)
    return jnp.stack(codebooks)


# ---------------------------------------------------------------------------------------------------------------
# The RQ-VAE (Flax linen).
# ---------------------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """Dense layers with ReLU between them (none after the last, so outputs are unconstrained)."""

    features: Sequence[int]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for index, width in enumerate(self.features):
            x = nn.Dense(width, name=f"dense_{index}")(x)
            if index != len(self.features) - 1:
                x = nn.relu(x)
        return x


class RQVAE(nn.Module):
    """MLP encoder -> residual quantizer over ``levels`` codebooks -> MLP decoder."""

    input_dim: int
    latent_dim: int
    hidden_dims: Sequence[int]
    levels: int
    codebook_size: int

    def setup(self) -> None:
        self.encoder = MLP((*self.hidden_dims, self.latent_dim))
        self.decoder = MLP((*reversed(self.hidden_dims), self.input_dim))
        # Placeholder init: train_rqvae overwrites the codebooks with residual k-means on encoder outputs.
        self.codebooks = self.param("codebooks", nn.initializers.normal(stddev=1.0),
                                    (self.levels, self.codebook_size, self.latent_dim))

    def __call__(self, x: jax.Array) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        latent = self.encoder(x)
        codes, codewords, residual_inputs = residual_quantize(self.codebooks, latent)
        # Straight-through estimator: the decoder sees the quantized latent, gradients flow to the encoder as if
        # quantization were the identity.
        quantized = latent + jax.lax.stop_gradient(codewords.sum(axis=0) - latent)
        reconstruction = self.decoder(quantized)
        return reconstruction, {"codes": codes, "codewords": codewords, "residual_inputs": residual_inputs}

    def embed(self, x: jax.Array) -> jax.Array:
        return self.encoder(x)

    def encode(self, x: jax.Array) -> jax.Array:
        return residual_quantize(self.codebooks, self.encoder(x))[0]

    def reconstruct(self, x: jax.Array) -> jax.Array:
        _, codewords, _ = residual_quantize(self.codebooks, self.encoder(x))
        return self.decoder(codewords.sum(axis=0))


def _build_module(config: RQVAEConfig) -> RQVAE:
    return RQVAE(input_dim=config.input_dim, latent_dim=config.latent_dim, hidden_dims=config.hidden_dims,
                 levels=config.levels, codebook_size=config.codebook_size)


def _build_optimizer(config: RQVAEConfig) -> optax.GradientTransformation:
    return optax.adam(config.learning_rate)


def _normalize(normalizer: Params, x: jax.Array) -> jax.Array:
    return (x - normalizer["mean"]) / normalizer["scale"]


def _denormalize(normalizer: Params, x: jax.Array) -> jax.Array:
    return x * normalizer["scale"] + normalizer["mean"]


# ---------------------------------------------------------------------------------------------------------------
# Pure encode / reconstruct for both kinds.
# ---------------------------------------------------------------------------------------------------------------
def _encode(kind: str, config: SIDConfig, params: Params, embeddings: jax.Array) -> jax.Array:
    embeddings = jnp.asarray(embeddings, jnp.float32)
    if kind == RQ_KMEANS_KIND:
        return residual_quantize(params["codebooks"], embeddings)[0]
    return _build_module(config).apply({"params": params["model"]}, _normalize(params["normalizer"], embeddings),
                                       method=RQVAE.encode)


def _reconstruct(kind: str, config: SIDConfig, params: Params, embeddings: jax.Array) -> jax.Array:
    embeddings = jnp.asarray(embeddings, jnp.float32)
    if kind == RQ_KMEANS_KIND:
        return residual_quantize(params["codebooks"], embeddings)[1].sum(axis=0)
    normalized = _build_module(config).apply({"params": params["model"]},
                                             _normalize(params["normalizer"], embeddings), method=RQVAE.reconstruct)
    return _denormalize(params["normalizer"], normalized)


# kind and config are static: the config dataclass is frozen (hashable), so equal configs share one compilation,
# e.g. a model reloaded from a checkpoint reuses the trained model's compiled encoder.
_encode_jit = jax.jit(_encode, static_argnums=(0, 1))
_reconstruct_jit = jax.jit(_reconstruct, static_argnums=(0, 1))


def sid_model_param_shapes(kind: str, config: SIDConfig) -> Params:
    """The parameter pytree of a SID model as ``jax.ShapeDtypeStruct`` leaves (the restore target for orbax)."""
    if kind == RQ_KMEANS_KIND:
        return {"codebooks": jax.ShapeDtypeStruct((config.levels, config.codebook_size, config.input_dim),
                                                  jnp.float32)}
    if kind != RQVAE_KIND:
        raise ValueError(f"unknown SID model kind {kind!r}; expected one of {SID_MODEL_KINDS}")
    module = _build_module(config)
    model_shapes = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, config.input_dim), jnp.float32))["params"])
    return {"model": model_shapes,
            "normalizer": {"mean": jax.ShapeDtypeStruct((config.input_dim,), jnp.float32),
                           "scale": jax.ShapeDtypeStruct((), jnp.float32)}}


def compute_version(kind: str, config: SIDConfig, params: Params) -> str:
    """Content hash of kind, config JSON and every parameter's path, dtype, shape and bytes."""
    digest = hashlib.sha256()
    digest.update(kind.encode())
    digest.update(config.to_json().encode())
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return f"{kind}-{digest.hexdigest()[:16]}"


@dataclasses.dataclass(frozen=True, eq=False)
class TrainedSIDModel:
    """A fitted item tokenizer: kind ("rqvae" | "rq_kmeans"), its config, host (numpy) params and a version.

    ``version`` is computed from kind + config + params when not given; :func:`load_sid_model` checks the stored
    one against the recomputed one.
    """

    kind: str
    config: SIDConfig
    params: Params
    version: str = ""

    def __post_init__(self) -> None:
        if self.kind not in CONFIG_CLASS_BY_KIND:
            raise ValueError(f"unknown SID model kind {self.kind!r}; expected one of {SID_MODEL_KINDS}")
        if not isinstance(self.config, CONFIG_CLASS_BY_KIND[self.kind]):
            raise TypeError(f"kind {self.kind!r} needs a {CONFIG_CLASS_BY_KIND[self.kind].__name__}, "
                            f"got {type(self.config).__name__}")
        # Host copies: hashing, saving and comparing must not depend on where the arrays live.
        host_params = jax.tree.map(lambda leaf: np.asarray(jax.device_get(leaf)), self.params)
        expected = jax.tree.map(lambda s: (tuple(s.shape), np.dtype(s.dtype)),
                                sid_model_param_shapes(self.kind, self.config))
        actual = jax.tree.map(lambda a: (tuple(a.shape), a.dtype), host_params)
        if expected != actual:
            raise ValueError(f"params do not match the {self.kind} config: expected {expected}, got {actual}")
        object.__setattr__(self, "params", host_params)
        if not self.version:
            object.__setattr__(self, "version", compute_version(self.kind, self.config, host_params))

    @property
    def levels(self) -> int:
        return self.config.levels

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def input_dim(self) -> int:
        return self.config.input_dim

    @property
    def codebooks(self) -> np.ndarray:
        """``[L, K, D]`` codebooks (latent space for an RQ-VAE, embedding space for RQ-KMeans)."""
        return self.params["codebooks"] if self.kind == RQ_KMEANS_KIND else self.params["model"]["codebooks"]

    def encode(self, params: Params, embeddings: jax.Array) -> jax.Array:
        """Pure and jit-able: ``float[N, input_dim]`` -> ``int32[N, levels]`` SIDs under ``params``."""
        return _encode(self.kind, self.config, params, embeddings)

    def reconstruct(self, params: Params, embeddings: jax.Array) -> jax.Array:
        """Pure and jit-able: the embeddings rebuilt from their SIDs (decoder output / sum of codewords)."""
        return _reconstruct(self.kind, self.config, params, embeddings)

    def encode_batched(self, embeddings: Any, batch_size: int = 8192) -> np.ndarray:
        """SIDs of a host array of any length, in fixed-size jitted batches (one compilation per batch size)."""
        outputs = _map_in_batches(functools.partial(_encode_jit, self.kind, self.config), self.params,
                                  _check_embeddings(embeddings, self.input_dim), batch_size)
        return outputs.astype(np.int32).reshape(-1, self.levels)

    def reconstruction_mse(self, embeddings: Any, batch_size: int = 8192) -> float:
        """Mean squared error per element between the embeddings and their reconstruction from the SIDs."""
        embeddings = _check_embeddings(embeddings, self.input_dim)
        reconstruction = _map_in_batches(functools.partial(_reconstruct_jit, self.kind, self.config), self.params,
                                         embeddings, batch_size)
        return float(np.mean((reconstruction.astype(np.float64) - embeddings) ** 2))

    def metrics(self, embeddings: Any, batch_size: int = 8192) -> Dict[str, Any]:
        """:func:`sid_metrics` of this model's SIDs for ``embeddings``, reconstruction error included."""
        return sid_metrics(self.encode_batched(embeddings, batch_size), self.codebook_size,
                           reconstruction_mse=self.reconstruction_mse(embeddings, batch_size))


def _check_embeddings(embeddings: Any, input_dim: int) -> np.ndarray:
    array = np.asarray(embeddings, dtype=np.float32)
    if array.ndim != 2 or array.shape[1] != input_dim:
        raise ValueError(f"embeddings must be [num_items, {input_dim}], got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("embeddings contain NaN or infinite values")
    return np.ascontiguousarray(array)


def _map_in_batches(function: Any, params: Params, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """Apply ``function(params, batch)`` over rows; the tail is zero-padded so every call has the same shape."""
    num_rows = inputs.shape[0]
    batch_size = max(1, min(batch_size, num_rows))
    device_params = jax.device_put(params)
    outputs = []
    for start in range(0, num_rows, batch_size):
        batch = inputs[start:start + batch_size]
        valid = batch.shape[0]
        if valid < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - valid,) + batch.shape[1:], batch.dtype)])
        outputs.append(np.asarray(function(device_params, batch))[:valid])
    if not outputs:
        return np.zeros((0,), np.float32)
    return np.concatenate(outputs)


# ---------------------------------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------------------------------
def _rqvae_loss(config: RQVAEConfig, model_params: Params, normalizer: Params, batch: jax.Array):
    normalized = _normalize(normalizer, batch)
    reconstruction, outputs = _build_module(config).apply({"params": model_params}, normalized)
    residual_inputs, codewords = outputs["residual_inputs"], outputs["codewords"]
    reconstruction_loss = jnp.mean((reconstruction - normalized) ** 2)
    # Summed over levels, averaged over batch and latent dims. The codebook term moves codewords to the residuals
    # (only with gradient codebook updates; EMA does that itself), the commitment term keeps the encoder close to
    # its codewords.
    codebook_loss = jnp.sum(jnp.mean((jax.lax.stop_gradient(residual_inputs) - codewords) ** 2, axis=(1, 2)))
    commitment_loss = jnp.sum(jnp.mean((residual_inputs - jax.lax.stop_gradient(codewords)) ** 2, axis=(1, 2)))
    loss = reconstruction_loss + config.commitment_beta * commitment_loss
    if config.codebook_update == "gradient":
        loss = loss + codebook_loss
    metrics = {"loss": loss, "normalized_reconstruction_mse": reconstruction_loss,
               "codebook_loss": codebook_loss, "commitment_loss": commitment_loss}
    return loss, (metrics, outputs["codes"], jax.lax.stop_gradient(residual_inputs))


def _ema_codebooks(config: RQVAEConfig, ema_counts: jax.Array, ema_sums: jax.Array) -> jax.Array:
    """Codewords = EMA sum / EMA count, with Laplace smoothing so a code that lost all its mass stays finite."""
    epsilon = 1e-5
    totals = ema_counts.sum(axis=1, keepdims=True)
    smoothed = (ema_counts + epsilon) / (totals + config.codebook_size * epsilon) * totals
    return ema_sums / smoothed[..., None]


@functools.partial(jax.jit, static_argnums=(0,))
def _train_chunk(config: RQVAEConfig, state: Params, normalizer: Params, data: jax.Array,
                 batch_indices: jax.Array) -> Tuple[Params, Dict[str, jax.Array]]:
    """Run ``len(batch_indices)`` optimizer steps in one ``lax.scan`` (no per-step Python dispatch).

    ``state`` holds ``model`` (params), ``opt`` (optax state), ``usage`` (int [L, K] code counts of the current
    re-seed window) and ``ema_counts`` / ``ema_sums`` (the EMA codebook statistics; unused for gradient updates).
    """
    optimizer = _build_optimizer(config)
    grad_fn = jax.value_and_grad(functools.partial(_rqvae_loss, config), has_aux=True)

    def train_step(state, indices):
        (_, (metrics, codes, residual_inputs)), grads = grad_fn(state["model"], normalizer,
                                                               jnp.take(data, indices, axis=0))
        updates, opt_state = optimizer.update(grads, state["opt"], state["model"])
        model_params = optax.apply_updates(state["model"], updates)
        membership = jax.nn.one_hot(codes.T, config.codebook_size, dtype=jnp.float32)  # [L, B, K]
        batch_counts = membership.sum(axis=1)  # [L, K]
        ema_counts, ema_sums = state["ema_counts"], state["ema_sums"]
        if config.codebook_update == "ema":
            decay = config.ema_decay
            ema_counts = decay * ema_counts + (1.0 - decay) * batch_counts
            ema_sums = decay * ema_sums + (1.0 - decay) * jnp.einsum("lbk,lbd->lkd", membership, residual_inputs)
            model_params = {**model_params, "codebooks": _ema_codebooks(config, ema_counts, ema_sums)}
        new_state = {"model": model_params, "opt": opt_state,
                     "usage": state["usage"] + batch_counts.astype(jnp.int32),
                     "ema_counts": ema_counts, "ema_sums": ema_sums}
        return new_state, metrics

    state, metrics = jax.lax.scan(train_step, state, batch_indices)
    return state, jax.tree.map(jnp.mean, metrics)


@functools.partial(jax.jit, static_argnums=(0,))
def _reseed_dead_codes(config: RQVAEConfig, state: Params, normalizer: Params, batch: jax.Array,
                       key: jax.Array) -> Tuple[Params, jax.Array]:
    """Replace codes unused in the window by residuals of ``batch``; returns (new state, reseeded mask [L, K]).

    Levels are processed in order with the already re-seeded codebooks, so level l+1 draws from the residuals the
    new level-l codebook leaves. Distinct dead codes get distinct batch rows (while there are enough rows). The
    optimizer moments (gradient updates) or EMA statistics of a re-seeded code are reset: its history belongs to
    the old code.
    """
    model_params = state["model"]
    latent = _build_module(config).apply({"params": model_params}, _normalize(normalizer, batch),
                                         method=RQVAE.embed)
    batch_rows = batch.shape[0]
    residual = latent
    codebooks, reseeded = [], []
    for level, level_key in enumerate(jax.random.split(key, config.levels)):
        dead = state["usage"][level] == 0
        donor_rows = jax.random.permutation(level_key, batch_rows)[jnp.arange(config.codebook_size) % batch_rows]
        codebook = jnp.where(dead[:, None], residual[donor_rows], model_params["codebooks"][level])
        assignment = jnp.argmin(_squared_distances(residual, codebook), axis=-1)
        residual = residual - codebook[assignment]
        codebooks.append(codebook)
        reseeded.append(dead)
    codebooks, reseeded = jnp.stack(codebooks), jnp.stack(reseeded)
    # A re-seeded EMA code restarts with the weight of one assigned residual, so the next batches move it quickly.
    ema_counts = jnp.where(reseeded, 1.0, state["ema_counts"])
    ema_sums = jnp.where(reseeded[..., None], codebooks * ema_counts[..., None], state["ema_sums"])
    new_state = {"model": {**model_params, "codebooks": codebooks},
                 "opt": _reset_codebook_optimizer_rows(state["opt"], reseeded),
                 "usage": jnp.zeros_like(state["usage"]), "ema_counts": ema_counts, "ema_sums": ema_sums}
    return new_state, reseeded


def _reset_codebook_optimizer_rows(opt_state: Any, reseeded: jax.Array) -> Any:
    """Zero the optimizer moments (e.g. Adam mu/nu) of re-seeded codewords."""
    row_mask = reseeded[..., None]

    def reset(path, leaf):
        is_codebook = any(getattr(entry, "key", None) == "codebooks" for entry in path)
        if is_codebook and hasattr(leaf, "shape") and tuple(leaf.shape[:2]) == tuple(reseeded.shape):
            return jnp.where(row_mask, jnp.zeros_like(leaf), leaf)
        return leaf

    return jax.tree_util.tree_map_with_path(reset, opt_state)


def _fit_normalizer(embeddings: np.ndarray, standardize: bool) -> Params:
    dim = embeddings.shape[1]
    if not standardize:
        return {"mean": np.zeros((dim,), np.float32), "scale": np.asarray(1.0, np.float32)}
    mean = embeddings.mean(axis=0, dtype=np.float64)
    scale = math.sqrt(float(np.mean((embeddings - mean) ** 2)))
    return {"mean": mean.astype(np.float32), "scale": np.asarray(scale if scale > 0 else 1.0, np.float32)}


def _batch_schedule(rng: np.random.Generator, num_items: int, batch_size: int, steps: int) -> np.ndarray:
    """``int32[steps, batch_size]`` item indices: shuffled epochs, each cut into full batches (tail dropped)."""
    batches_per_epoch = num_items // batch_size
    epochs = -(-steps // batches_per_epoch) if steps else 0
    schedule = [rng.permutation(num_items)[:batches_per_epoch * batch_size].reshape(batches_per_epoch, batch_size)
                for _ in range(epochs)]
    if not schedule:
        return np.zeros((0, batch_size), np.int32)
    return np.concatenate(schedule)[:steps].astype(np.int32)


def _chunk_boundaries(config: RQVAEConfig) -> List[int]:
    boundaries = {config.steps}
    for every in (config.log_every, config.dead_code_reseed_every):
        if every > 0:
            boundaries.update(range(every, config.steps, every))
    return sorted(step for step in boundaries if step > 0)


def train_rqvae(embeddings: Any, config: RQVAEConfig) -> Tuple[TrainedSIDModel, Dict[str, Any]]:
    """Fit an RQ-VAE on ``float32[N, input_dim]`` embeddings. Returns the model and a JSON-able training history.

    The history has one entry per chunk (every ``log_every`` / ``dead_code_reseed_every`` steps): ``step``,
    ``loss``, ``reconstruction_mse`` (training batches, in embedding units), ``codebook_loss``,
    ``commitment_loss``, ``window_utilisation`` (per level, fraction of codes used since the last re-seed),
    ``reseeded_codes`` (per level, how many dead codes were replaced at that step), plus ``kmeans_init_seconds``,
    ``train_seconds`` and ``total_reseeded_codes``.
    """
    embeddings = _check_embeddings(embeddings, config.input_dim)
    num_items = embeddings.shape[0]
    if num_items == 0:
        raise ValueError("train_rqvae needs at least one embedding")
    batch_size = min(config.batch_size, num_items)
    schedule = _batch_schedule(np.random.default_rng(config.seed), num_items, batch_size, config.steps)
    init_key, kmeans_key, reseed_key = jax.random.split(jax.random.key(config.seed), 3)

    normalizer = _fit_normalizer(embeddings, config.standardize_inputs)
    module = _build_module(config)
    model_params = module.init(init_key, jnp.zeros((1, config.input_dim), jnp.float32))["params"]

    # k-means initialisation on the encoder outputs of the first batches (the whole first epoch at most), so every
    # code starts where there is data instead of at a random point most residuals never come near.
    started = time.perf_counter()
    init_rows = schedule.reshape(-1)[:min(config.kmeans_init_samples, num_items)]
    if init_rows.size == 0:
        init_rows = np.arange(min(config.kmeans_init_samples, num_items))
    init_latent = module.apply({"params": model_params}, _normalize(normalizer, jnp.asarray(embeddings[init_rows])),
                               method=RQVAE.embed)
    codebooks = residual_kmeans(kmeans_key, init_latent, config.levels, config.codebook_size,
                                config.kmeans_init_iters)
    model_params = {**model_params, "codebooks": codebooks}
    kmeans_init_seconds = time.perf_counter() - started

    ema_counts = jnp.ones((config.levels, config.codebook_size), jnp.float32)
    state = {"model": model_params, "opt": _build_optimizer(config).init(model_params),
             "usage": jnp.zeros((config.levels, config.codebook_size), jnp.int32),
             "ema_counts": ema_counts, "ema_sums": codebooks * ema_counts[..., None]}
    data = jnp.asarray(embeddings)
    device_normalizer = jax.device_put(normalizer)
    scale_sq = float(normalizer["scale"]) ** 2
    history: Dict[str, Any] = {"step": [], "loss": [], "reconstruction_mse": [], "codebook_loss": [],
                               "commitment_loss": [], "window_utilisation": [], "reseeded_codes": []}

    started = time.perf_counter()
    previous = 0
    every = config.dead_code_reseed_every
    for boundary in _chunk_boundaries(config):
        state, metrics = _train_chunk(config, state, device_normalizer, data,
                                      jnp.asarray(schedule[previous:boundary]))
        previous = boundary
        metrics = jax.device_get(metrics)
        history["step"].append(boundary)
        history["loss"].append(float(metrics["loss"]))
        history["reconstruction_mse"].append(float(metrics["normalized_reconstruction_mse"]) * scale_sq)
        history["codebook_loss"].append(float(metrics["codebook_loss"]))
        history["commitment_loss"].append(float(metrics["commitment_loss"]))
        history["window_utilisation"].append(np.mean(np.asarray(state["usage"]) > 0, axis=1).tolist())

        reseeded_per_level = [0] * config.levels
        if every > 0 and boundary % every == 0 and boundary < config.steps:
            state, reseeded = _reseed_dead_codes(config, state, device_normalizer, data[schedule[boundary - 1]],
                                                 jax.random.fold_in(reseed_key, boundary))
            reseeded_per_level = np.asarray(reseeded).sum(axis=1).astype(int).tolist()
        elif every == 0:
            state = {**state, "usage": jnp.zeros_like(state["usage"])}  # no re-seeding: window = log interval
        history["reseeded_codes"].append(reseeded_per_level)

    model_params = jax.block_until_ready(state["model"])
    history["kmeans_init_seconds"] = kmeans_init_seconds
    history["train_seconds"] = time.perf_counter() - started
    history["total_reseeded_codes"] = int(sum(sum(levels) for levels in history["reseeded_codes"]))
    model = TrainedSIDModel(RQVAE_KIND, config, {"model": model_params, "normalizer": normalizer})
    return model, history


def rq_kmeans(embeddings: Any, levels: int = 3, codebook_size: int = 256, seed: int = 0, *,
              kmeans_iters: int = 25, kmeans_samples: int = 0) -> TrainedSIDModel:
    """RQ-KMeans baseline: residual k-means on the raw embeddings (identity encoder), as a :class:`TrainedSIDModel`.

    ``kmeans_samples > 0`` fits on a deterministic (seeded) sample of that many items, for large catalogues.
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty [num_items, dim] array, got shape {embeddings.shape}")
    config = RQKMeansConfig(input_dim=embeddings.shape[1], levels=levels, codebook_size=codebook_size, seed=seed,
                            kmeans_iters=kmeans_iters, kmeans_samples=kmeans_samples)
    embeddings = _check_embeddings(embeddings, config.input_dim)
    if 0 < kmeans_samples < embeddings.shape[0]:
        rows = np.sort(np.random.default_rng(seed).choice(embeddings.shape[0], kmeans_samples, replace=False))
        embeddings = embeddings[rows]
    codebooks = residual_kmeans(jax.random.key(seed), embeddings, levels, codebook_size, kmeans_iters)
    return TrainedSIDModel(RQ_KMEANS_KIND, config, {"codebooks": codebooks})
