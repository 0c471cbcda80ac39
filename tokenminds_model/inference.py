"""Batch inference for one model: histories -> dense user embeddings + decoded SID prefixes per scenario.

The one place that turns stored histories into model outputs, shared by batch refresh (``pipelines.refresh_users``,
through a Beam ``ModelHandler``), evaluation and the benchmarks, so they cannot disagree on cropping, padding or
decoding settings.

Per call: ONE encoder pass per user, the pooled user embedding from those encoder states, then multi-context beam
search (``decoding.multi_context_decode``, grouped: ``ModelFunctions.decode_grouped`` projects each user's memory once
per level for all of its beams) for every condition token the model serves, all reading the same encoder states. Inputs are padded to a fixed batch size (and cropped to ``config.max_tokens`` whole events by
``model.fit_history``), so every call has the same shapes and the jitted function compiles once per process.

Pure JAX/NumPy: no Beam or TensorFlow imports.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

from tokenminds_model import decoding
from tokenminds_model.model import ModelConfig, Params, fit_history, model_functions
from tokenminds_model.vocabulary import PAD_ID, VocabularyLayout, condition_token

DEFAULT_BATCH_SIZE = 32


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
                 settings: DecodeSettings = DecodeSettings(), batch_size: int = DEFAULT_BATCH_SIZE,
                 constraints: Optional[Mapping[str, decoding.PrefixConstraint]] = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
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
            # Grouped decoding: each user's memory (and its cross-attention keys/values) is projected once per
            # level for all of its C * beam_size rows, not once per row.
            decoded = decoding.multi_context_decode(
                fns.decode_grouped, enc_states, enc_mask, self.condition_tokens, layout=self.layout,
                prefix_len=self.prefix_len, beam_size=settings.beam_size, top_n=settings.top_n,
                constraints=self.constraints or None, params=params, grouped=True)
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


__all__ = ["DecodeSettings", "UserInference", "UserOutputs", "stack_histories"]
