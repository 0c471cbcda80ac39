"""Batch inference for one model: histories -> dense user embeddings + decoded SID prefixes per scenario.

The one place that turns stored histories into model outputs, shared by batch refresh (``pipelines.refresh_users``,
through a Beam ``ModelHandler``), evaluation and the benchmarks, so they cannot disagree on cropping, padding or
decoding settings.

Per call: ONE encoder pass per user, the pooled user embedding from those encoder states, then multi-context beam
search (``decoding.multi_context_decode``) for every condition token the model serves, all reading the same encoder
states, with the model's incremental decoder (``ModelFunctions.incremental_decoder``): each user's memory and every
decoder layer's cross-attention keys/values are computed once, the decoder self-attention keys/values are cached
across SID levels (reordered with the beams), and logits are projected only for each beam's newest position. Inputs
are padded to a fixed batch size (and cropped to ``config.max_tokens`` whole events by ``model.fit_history``), so
every call has the same shapes and the jitted function compiles once per process.

Accelerators: ``compute_dtype="auto"`` runs a bfloat16 model in float32 on CPU workers (bfloat16 matmuls are slow
there) and as trained on GPU/TPU; ``batch_size="auto"`` is :func:`auto_batch_size` for the device the process sees
(32 users on CPU; on an accelerator as many as a share of its memory holds, a power of two in [8, 1024]).
:func:`resolve_users_per_batch` decides it on a Beam driver for the workers (``pipelines.refresh_users``), from the
Dataflow ``worker_accelerator`` service option when the workers have GPUs.

Pure JAX/NumPy: no Beam or TensorFlow imports.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np

from tokenminds_model import decoding
from tokenminds_model.model import DTYPES, ModelConfig, Params, default_compute_dtype, fit_history, model_functions
from tokenminds_model.vocabulary import PAD_ID, VocabularyLayout, condition_token

DEFAULT_BATCH_SIZE = 32
CPU_BATCH_SIZE = 32
# Share of an accelerator's memory that one inference batch may use (the rest: parameters, XLA's workspace, and
# other processes on a shared GPU).
ACCELERATOR_MEMORY_SHARE = 0.3
# GPU memory (GiB) of the Dataflow accelerator types, for deciding batch sizes on the driver.
DATAFLOW_GPU_MEMORY_GIB = {"nvidia-tesla-t4": 16, "nvidia-tesla-p4": 8, "nvidia-tesla-p100": 16,
                           "nvidia-tesla-v100": 16, "nvidia-l4": 24, "nvidia-tesla-a100": 40,
                           "nvidia-a100-80gb": 80, "nvidia-h100-80gb": 80, "nvidia-h100-mega-80gb": 80}
DEFAULT_GPU_MEMORY_GIB = 16


# ---------------------------------------------------------------------------------------------------------------
# Batch sizes per device.
# ---------------------------------------------------------------------------------------------------------------
def bytes_per_user(config: ModelConfig, settings: "DecodeSettings" = None) -> int:
    """A generous estimate of one user's peak inference memory: the encoder's attention logits (float32, one layer
    at a time), its widest activations, and the decoder's per-user cross-attention keys/values and beam rows."""
    settings = settings or DecodeSettings()
    item = 2 if config.dtype == "bfloat16" else 4
    tokens, d = config.max_tokens, config.d_model
    attention = 4 * config.num_heads * tokens * tokens
    activations = 8 * tokens * max(config.mlp_dim, 3 * d) * item
    cross = 2 * config.decoder_layers * (tokens + 1) * d * item
    rows = len(settings.scenarios) * settings.beam_size
    beams = rows * (config.vocab_size * 4 + 4 * config.decoder_layers * config.sid_length * d * item)
    return int(attention + activations + cross + beams)


def auto_batch_size(config: ModelConfig, platform: str, memory_bytes: Optional[int] = None,
                    settings: "DecodeSettings" = None) -> int:
    """Users per inference call for ``platform``: 32 on CPU (larger batches add latency, not throughput); on an
    accelerator the largest power of two in [8, 1024] whose :func:`bytes_per_user` fit in
    ``ACCELERATOR_MEMORY_SHARE`` of ``memory_bytes`` (16 GiB when unknown)."""
    if platform == "cpu":
        return CPU_BATCH_SIZE
    memory = memory_bytes or DEFAULT_GPU_MEMORY_GIB * 2 ** 30
    fit = int(ACCELERATOR_MEMORY_SHARE * memory) // max(1, bytes_per_user(config, settings))
    size = 8
    while size * 2 <= min(fit, 1024):
        size *= 2
    return size


def device_memory_bytes(device: Any) -> Optional[int]:
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - CPU devices and some backends have none
        return None
    return stats.get("bytes_limit")


def dataflow_accelerator(options: Iterable[str]) -> Optional[Tuple[str, int]]:
    """``(type, count)`` of a ``worker_accelerator=type:...;count:N;...`` Dataflow service option (or experiment),
    None without one."""
    for option in options or ():
        match = re.match(r"\s*worker_accelerator\s*=(.*)", str(option))
        if not match:
            continue
        fields = dict(part.split(":", 1) if ":" in part else (part, "") for part in match.group(1).split(";"))
        kind = fields.get("type", "").strip()
        if not kind:
            raise ValueError(f"worker_accelerator option {option!r} names no type (type:nvidia-tesla-t4;count:1;...)")
        return kind, int(fields.get("count", "1") or 1)
    return None


def resolve_users_per_batch(value: Union[int, str], config: ModelConfig, *, service_options: Iterable[str] = (),
                            remote_workers: bool = False, settings: "DecodeSettings" = None) -> int:
    """The batch size a Beam job's workers should use: ``value`` itself unless it is ``"auto"``. Then, for
    ``remote_workers`` (Dataflow), from the ``worker_accelerator`` option (GPU memory by type, the model run in its
    trained dtype) or 32 for CPU workers; for a local runner, from this process's first device."""
    if value != "auto":
        return int(value)
    accelerator = dataflow_accelerator(service_options)
    if accelerator is not None:
        memory = DATAFLOW_GPU_MEMORY_GIB.get(accelerator[0], DEFAULT_GPU_MEMORY_GIB) * 2 ** 30
        return auto_batch_size(config, "gpu", memory, settings)
    if remote_workers:
        return auto_batch_size(config.replace(dtype="float32"), "cpu", settings=settings)
    device = jax.devices()[0]
    return auto_batch_size(config.replace(dtype=default_compute_dtype(config.dtype, device.platform)),
                           device.platform, device_memory_bytes(device), settings)


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """How user tokens are decoded: ``top_n`` best of a ``beam_size`` beam, ``prefix_len`` SID levels each (default:
    the model's target length), for each scenario in ``scenarios``."""

    scenarios: Tuple[str, ...] = ("LFV", "SFV")
    top_n: int = decoding.DEFAULT_TOP_N
    beam_size: int = decoding.DEFAULT_BEAM_SIZE
    prefix_len: Optional[int] = None

    def __post_init__(self) -> None:
        if not self.scenarios or len(set(self.scenarios)) != len(self.scenarios):
            raise ValueError(f"scenarios must be distinct and non-empty, got {self.scenarios}")
        for scenario in self.scenarios:
            condition_token(scenario)  # raises on an unknown scenario
        if not 1 <= self.top_n <= self.beam_size:
            raise ValueError(f"top_n must be in [1, beam_size={self.beam_size}], got {self.top_n}")


@dataclasses.dataclass(frozen=True)
class UserOutputs:
    """Model outputs for B users, row-aligned with the inputs."""

    embeddings: np.ndarray  # float32 [B, embedding_dim]
    codes: Dict[str, np.ndarray]  # scenario -> int32 [B, top_n, prefix_len]; -1 rows = no valid prefix
    scores: Dict[str, np.ndarray]  # scenario -> float32 [B, top_n], total log-probability, best first; -inf = empty


class UserInference:
    """A loaded model ready for fixed-shape batch inference. Build once per process (per worker) and reuse."""

    def __init__(self, config: ModelConfig, params: Params, layout: VocabularyLayout, *,
                 settings: DecodeSettings = DecodeSettings(), batch_size: Union[int, str] = DEFAULT_BATCH_SIZE,
                 constraints: Optional[Mapping[str, decoding.PrefixConstraint]] = None,
                 compute_dtype: str = "auto") -> None:
        device = jax.devices()[0]
        if compute_dtype == "auto":
            compute_dtype = default_compute_dtype(config.dtype, device.platform)
        if compute_dtype not in DTYPES:
            raise ValueError(f"compute_dtype must be 'auto' or one of {tuple(DTYPES)}, got {compute_dtype!r}")
        # The compute dtype is not architecture: the float32 parameters serve either.
        config = config.replace(dtype=compute_dtype)
        if batch_size == "auto":
            batch_size = auto_batch_size(config, device.platform, device_memory_bytes(device), settings)
        if isinstance(batch_size, str) or batch_size < 1:
            raise ValueError(f"batch_size must be 'auto' or >= 1, got {batch_size!r}")
        self.config, self.layout, self.settings, self.batch_size = config, layout, settings, int(batch_size)
        self.prefix_len = settings.prefix_len or config.sid_length
        if not 1 <= self.prefix_len <= config.sid_length:
            raise ValueError(f"prefix_len {self.prefix_len} out of range [1, {config.sid_length}] for this model")
        self.params = jax.device_put(params)
        self.condition_tokens = tuple(condition_token(s) for s in settings.scenarios)
        self.constraints = {condition_token(s): c for s, c in (constraints or {}).items() if c is not None}
        self._fns = model_functions(config)

    # One jitted function for embeddings and decoding: the encoder runs once and both outputs read its states.
    @functools.cached_property
    def _embed_and_decode(self):
        fns, settings = self._fns, self.settings

        def run(params, tokens, soft):
            enc_states, enc_mask = fns.encode(params, tokens, soft)
            embeddings = fns.user_embedding(params, enc_states, enc_mask)
            # Incremental decoding: each user's memory and its cross-attention keys/values once for all levels and
            # all of its C * beam_size rows; per level, one new token per row (the rest is in the KV cache).
            decoded = decoding.multi_context_decode(
                fns.incremental_decoder, enc_states, enc_mask, self.condition_tokens, layout=self.layout,
                prefix_len=self.prefix_len, beam_size=settings.beam_size, top_n=settings.top_n,
                constraints=self.constraints or None, params=params)
            return embeddings, decoded

        return jax.jit(run)

    def prepare(self, tokens: np.ndarray, lengths: np.ndarray,
                soft_features: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """Crop histories to ``max_tokens`` (most recent whole events), as training does."""
        if self.config.soft and soft_features is None:
            raise ValueError("the model reads soft features but none were given")
        cropped, soft, _ = fit_history(tokens, lengths, self.config.max_tokens,
                                       soft_features if self.config.soft else None)
        return cropped, soft

    def _fixed_batches(self, tokens: np.ndarray, lengths: np.ndarray, soft_features: Optional[np.ndarray]):
        """Cropped histories in batches padded to ``batch_size`` rows: ``(tokens, soft or None, real rows)``."""
        tokens, soft = self.prepare(tokens, lengths, soft_features)
        for start in range(0, tokens.shape[0], self.batch_size):
            batch_tokens = _pad_rows(tokens[start:start + self.batch_size], self.batch_size, PAD_ID)
            batch_soft = None if soft is None else _pad_rows(soft[start:start + self.batch_size], self.batch_size, 0)
            yield batch_tokens, batch_soft, min(self.batch_size, tokens.shape[0] - start)

    def __call__(self, tokens: np.ndarray, lengths: np.ndarray,
                 soft_features: Optional[np.ndarray] = None) -> UserOutputs:
        """Outputs for ``tokens int[B, T]`` (left-aligned, PAD-padded), ``lengths int[B]`` and, for a soft-feature
        model, ``soft_features float[B, T, F]``. Any B: rows are run in fixed batches of ``batch_size``."""
        pieces, keep = [], []
        for batch_tokens, batch_soft, rows in self._fixed_batches(tokens, lengths, soft_features):
            pieces.append(jax.device_get(self._embed_and_decode(self.params, batch_tokens, batch_soft)))
            keep.append(rows)
        embeddings = _concat([p[0][:n] for p, n in zip(pieces, keep)], (0, self.config.embedding_dim), np.float32)
        codes, scores = {}, {}
        for scenario, token in zip(self.settings.scenarios, self.condition_tokens):
            codes[scenario] = _concat([p[1][token][0][:n] for p, n in zip(pieces, keep)],
                                      (0, self.settings.top_n, self.prefix_len), np.int32)
            scores[scenario] = _concat([p[1][token][1][:n] for p, n in zip(pieces, keep)],
                                       (0, self.settings.top_n), np.float32)
        return UserOutputs(embeddings=embeddings, codes=codes, scores=scores)

    @functools.cached_property
    def _embed(self):
        return jax.jit(self._fns.embed_users)

    def embed(self, tokens: np.ndarray, lengths: np.ndarray, soft_features: Optional[np.ndarray] = None
              ) -> np.ndarray:
        """Embeddings only (no decoding), ``float32[B, embedding_dim]``, cropped and batched as ``__call__``."""
        parts = [np.asarray(jax.device_get(self._embed(self.params, batch_tokens, batch_soft)))[:rows]
                 for batch_tokens, batch_soft, rows in self._fixed_batches(tokens, lengths, soft_features)]
        return _concat(parts, (0, self.config.embedding_dim), np.float32)


def _pad_rows(array: np.ndarray, rows: int, value) -> np.ndarray:
    if array.shape[0] == rows:
        return array
    padding = np.full((rows - array.shape[0],) + array.shape[1:], value, array.dtype)
    return np.concatenate([array, padding])


def _concat(parts: Sequence[np.ndarray], empty_shape: Tuple[int, ...], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(empty_shape, dtype)


def stack_histories(histories: Sequence[Mapping[str, np.ndarray]], max_tokens: int, soft_dim: int = 0
                    ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Per-user ``{"tokens", "length"[, "soft_features"]}`` (as built for training examples) -> padded arrays
    ``(tokens int32[B, max_tokens], lengths int32[B], soft float32[B, max_tokens, F] or None)``."""
    tokens = np.full((len(histories), max_tokens), PAD_ID, np.int32)
    lengths = np.zeros(len(histories), np.int32)
    soft = np.zeros((len(histories), max_tokens, soft_dim), np.float32) if soft_dim else None
    for row, history in enumerate(histories):
        n = int(history["length"])
        tokens[row, :n] = np.asarray(history["tokens"])[:n]
        lengths[row] = n
        if soft is not None:
            soft[row, :n] = np.asarray(history["soft_features"])[:n]
    return tokens, lengths, soft


__all__ = ["DecodeSettings", "UserInference", "UserOutputs", "auto_batch_size", "bytes_per_user",
           "dataflow_accelerator", "resolve_users_per_batch", "stack_histories"]
