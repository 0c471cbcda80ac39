"""The TokenMinds user model: a Flax encoder-decoder transformer over interleaved user-history tokens.

Architecture (pre-LayerNorm, after Flax's WMT transformer example, linen modules)::

    tokens [B, T] ──► token embedding (+ soft-feature MLP at <soft> positions) + learned positions
                  ──► encoder_layers x [LN → self-attention (padding masked) → LN → MLP] → LN ──► enc_states [B, T, d]

    user_embedding(enc_states, enc_mask) = Dense(embedding_dim)(pool(enc_states))      pool: mean | last | mean_last

    memory = [Dense(d)(user_embedding) ; enc_states]     (the "summary slot", see below)   [B, 1 + T, d]
    decoder_inputs [N, t] ──► decoder embedding + learned positions
                  ──► decoder_layers x [LN → causal self-attention → LN → cross-attention to memory → LN → MLP]
                  ──► LN → Dense(vocab_size) ──► logits [N, t, vocab_size] (float32)

The decoder's *only* access to the encoder is cross-attention over ``memory``: no pooled vector is added to the
decoder stream, and the encoder and decoder do not share embedding tables, so every gradient that reaches an
encoder parameter flows through a cross-attention key/value projection (``tests/test_model.py`` checks this by
zeroing the cross-attention output projections: every encoder gradient becomes exactly zero).

Summary slot (``ModelConfig.summary_slot``, default on): the paper's objective alone never trains the projection
that turns the pooled encoder output into the dense user embedding (nothing in the loss reads it). So the user
embedding, projected back to ``d_model``, is prepended to the cross-attention memory as one extra always-valid
slot: the decoder can read it, the projection is trained, and the embedding is pushed to summarise the user. With
``summary_slot=False`` the memory is exactly ``enc_states`` and the projection stays at its initialisation.

Training objective (the paper's; :func:`target_loss`): ONE encoder pass per example; the decoder is teacher-forced on
each of the K targets ``[condition, sid_0 .. sid_{L-1}]`` with input ``target[:-1]`` and labels ``target[1:]``. All K
targets share the same memory: they are folded into the decoder's *sequence* axis (``[B, K * L]`` decoder tokens)
with a block-diagonal causal self-attention mask and positions ``0..L-1`` repeated per target, so the encoder states
and their cross-attention keys/values are computed once per example, never repeated K times. Each block is exactly a
separate decoder run on one target (the masked weights are exactly zero). The loss is the cross-entropy summed over
the L SID positions (the condition token is an input only, never a label) and averaged over the real targets of the
batch; target rows at index >= ``num_targets`` are padding and masked out. There are no per-example weights.

Softmax: over the full vocabulary (the model must learn that position l emits a level-l SID token; that is cheap to
learn and keeps the logits usable for any id). ``tokenminds_model.decoding`` renormalises over the level's own
range at inference.

Attention (:class:`Attention`, with the parameters of flax's ``MultiHeadDotProductAttention``) is computed by
``tokenminds_model.attention``: ``jax.nn.dot_product_attention`` with padding masks on accelerators, a flash-style
chunked kernel on CPU. Precision: parameters are float32; ``ModelConfig.dtype`` is the compute dtype (bfloat16 for
mixed precision, see :func:`default_compute_dtype`), while attention logits and softmaxes, the output logits
(projected in float32) and the loss stay float32.

Inference decoding is incremental (:meth:`TokenMindsModel.decode_start` / :meth:`TokenMindsModel.decode_step`,
``ModelFunctions.incremental_decoder``): the memory and every decoder layer's cross-attention keys/values once per
user, the decoder self-attention keys/values cached per beam row, logits only for the newest position.

Shapes are static: ``tokens`` is ``[B, max_tokens]``; longer stored histories are cut to their most recent whole
events by :func:`fit_history` (the ``tiny`` preset uses 256 tokens so that it trains on CPU).

Pure JAX/Flax/NumPy: no Beam or TensorFlow imports.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from tokenminds_model import attention as attention_lib
from tokenminds_model import decoding as decoding_lib
from tokenminds_model.vocabulary import LFV_ID, PAD_ID, SEARCH_ID, SFV_ID, SOFT_ID, VocabularyLayout

Params = Dict[str, Any]
POOLINGS = ("mean", "last", "mean_last")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Tokens that start an event in a history (a watch's condition token, a search's <Search>): crops keep whole events.
EVENT_START_IDS = (LFV_ID, SFV_ID, SEARCH_ID)

# Architecture presets. ``max_tokens=None`` keeps the examples' full length. ``large`` is the paper-sized model
# (dense user embedding of 1152); "paper" is an alias of it.
PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(d_model=64, num_heads=4, encoder_layers=2, decoder_layers=2, mlp_dim=256, dropout=0.0,
                 embedding_dim=64, pooling="mean", dtype="float32", max_tokens=256),
    "base": dict(d_model=256, num_heads=8, encoder_layers=4, decoder_layers=4, mlp_dim=1024, dropout=0.1,
                 embedding_dim=256, pooling="mean_last", dtype="bfloat16", max_tokens=None),
    "large": dict(d_model=1024, num_heads=16, encoder_layers=12, decoder_layers=6, mlp_dim=4096, dropout=0.1,
                  embedding_dim=1152, pooling="mean_last", dtype="bfloat16", max_tokens=None),
}
PRESETS["paper"] = PRESETS["large"]


def default_compute_dtype(preferred: str, platform: Optional[str] = None) -> str:
    """The compute dtype to use for a config that prefers ``preferred``: float32 on CPU (bfloat16 matmuls are
    emulated there and several times slower), ``preferred`` on accelerators (GPU, TPU), where bfloat16 is the fast
    path. Mixed precision keeps parameters, optimizer state, logits, softmaxes and the loss in float32 either way."""
    platform = platform or jax.default_backend()
    return "float32" if platform == "cpu" else preferred


# ---------------------------------------------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of the user model. Frozen and hashable (a static argument of jitted functions); JSON round trip.

    Data-derived fields (``from_layout``): ``vocab_size``, ``max_tokens`` (encoder length), ``num_targets`` (K),
    ``target_len`` (1 + L: condition token + L SID tokens), ``soft_feature_dim`` (0 = hard features).
    """

    vocab_size: int
    max_tokens: int
    num_targets: int
    target_len: int
    d_model: int = 64
    num_heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    mlp_dim: int = 256
    dropout: float = 0.0
    embedding_dim: int = 64
    pooling: str = "mean"
    soft_feature_dim: int = 0
    dtype: str = "float32"
    summary_slot: bool = True

    def __post_init__(self) -> None:
        positive = ("vocab_size", "max_tokens", "num_targets", "d_model", "num_heads", "encoder_layers",
                    "decoder_layers", "mlp_dim", "embedding_dim")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.target_len, (int, np.integer)) or self.target_len < 2:
            raise ValueError(f"ModelConfig.target_len (1 + L) must be >= 2, got {self.target_len!r}")
        if self.soft_feature_dim < 0:
            raise ValueError(f"ModelConfig.soft_feature_dim must be >= 0, got {self.soft_feature_dim}")
        if self.d_model % self.num_heads:
            raise ValueError(f"ModelConfig.d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"ModelConfig.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"ModelConfig.dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")

    @property
    def sid_length(self) -> int:
        """L: SID tokens per target (the labels of one target)."""
        return self.target_len - 1

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def soft(self) -> bool:
        return self.soft_feature_dim > 0

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        # sort_keys: the JSON text feeds the checkpoint version hash.
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        if not isinstance(data, Mapping):
            raise ValueError(f"ModelConfig must be a JSON object, got {type(data).__name__}")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        return cls(**dict(data))

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_layout(cls, layout: VocabularyLayout, feature_spec: Mapping[str, Mapping[str, Any]],
                    preset: str = "tiny", **overrides: Any) -> "ModelConfig":
        """The config for examples described by ``vocabulary.json`` (``layout``) and ``feature_spec.json``.

        ``max_tokens`` is the examples' token length, capped by the preset's ``max_tokens`` (histories are then cut
        to their most recent whole events by :func:`fit_history`); ``overrides`` replace any field.
        """
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
        data = data_fields(layout, feature_spec)
        spec_tokens = data.pop("max_tokens")
        values = dict(PRESETS[preset])
        cap = values.pop("max_tokens")
        values.update(data, max_tokens=min(spec_tokens, cap) if cap else spec_tokens)
        values.update(overrides)
        config = cls(**values)
        if config.max_tokens > spec_tokens:
            raise ValueError(f"max_tokens {config.max_tokens} exceeds the examples' {spec_tokens} tokens")
        return config


def data_fields(layout: VocabularyLayout, feature_spec: Mapping[str, Mapping[str, Any]]) -> Dict[str, int]:
    """The config fields that the examples decide: vocab_size, max_tokens (the examples' length), num_targets,
    target_len, soft_feature_dim."""
    try:
        num_targets, target_len = (int(n) for n in feature_spec["targets"]["shape"])
        return {"vocab_size": layout.vocab_size, "max_tokens": int(feature_spec["tokens"]["shape"][0]),
                "num_targets": num_targets, "target_len": target_len,
                "soft_feature_dim": (int(feature_spec["soft_features"]["shape"][-1])
                                     if "soft_features" in feature_spec else 0)}
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise ValueError(f"feature spec lacks a usable tokens/targets entry: {error!r}") from None


def check_compatible(config: ModelConfig, layout: VocabularyLayout,
                     feature_spec: Mapping[str, Mapping[str, Any]]) -> None:
    """Raise ValueError when examples (``layout`` + ``feature_spec``) cannot be fed to a model with ``config``."""
    data = data_fields(layout, feature_spec)
    problems = [f"{name} {getattr(config, name)} != {data[name]}"
                for name in ("vocab_size", "num_targets", "target_len", "soft_feature_dim")
                if getattr(config, name) != data[name]]
    if config.max_tokens > data["max_tokens"]:
        problems.append(f"max_tokens {config.max_tokens} > the examples' {data['max_tokens']}")
    if problems:
        raise ValueError(f"examples do not fit the model config: {'; '.join(problems)}")


# ---------------------------------------------------------------------------------------------------------------
# Inputs.
# ---------------------------------------------------------------------------------------------------------------
def fit_history(tokens: np.ndarray, length: np.ndarray, max_tokens: int,
                soft_features: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
    """Cut left-aligned histories ``[B, T]`` to ``[B, max_tokens]``, keeping each row's most recent whole events.

    A row longer than ``max_tokens`` keeps its suffix starting at the first event-start token (``<LFV>``, ``<SFV>``,
    ``<Search>``) at or after ``length - max_tokens`` (a single event longer than that is cut mid-event). Returns
    ``(tokens int32, soft_features or None, lengths int32 [B])``. Rows that already fit are only truncated.
    """
    tokens = np.asarray(tokens)
    lengths = np.asarray(length).reshape(-1).astype(np.int64)
    batch, width = tokens.shape
    if np.any(lengths > width) or np.any(lengths < 0):
        raise ValueError(f"history lengths out of range [0, {width}]: {lengths[(lengths > width) | (lengths < 0)]}")
    out = np.full((batch, max_tokens), PAD_ID, np.int32)
    out_soft = None if soft_features is None else np.zeros((batch, max_tokens, soft_features.shape[-1]), np.float32)
    new_lengths = np.minimum(lengths, max_tokens).astype(np.int32)
    for row in range(batch):
        n = int(lengths[row])
        start = 0
        if n > max_tokens:
            window = tokens[row, n - max_tokens:n]
            starts = np.flatnonzero(np.isin(window, EVENT_START_IDS))
            start = n - max_tokens + (int(starts[0]) if starts.size else 0)
        kept = n - start
        out[row, :kept] = tokens[row, start:n]
        if out_soft is not None:
            out_soft[row, :kept] = soft_features[row, start:n]
        new_lengths[row] = kept
    return out, out_soft, new_lengths


def model_inputs(batch: Mapping[str, np.ndarray], config: ModelConfig) -> Dict[str, np.ndarray]:
    """A reader batch (``tokenminds_model.data.numpy_batches``) -> the model's fixed-shape inputs.

    Keys: ``tokens int32[B, max_tokens]``, ``targets int32[B, K, 1+L]``, ``num_targets int32[B]``, and
    ``soft_features float32[B, max_tokens, F]`` in soft mode.
    """
    soft = batch.get("soft_features") if config.soft else None
    if config.soft and soft is None:
        raise ValueError("the model is in soft-feature mode but the batch has no soft_features")
    tokens, soft, _ = fit_history(batch["tokens"], batch["length"], config.max_tokens, soft)
    targets = np.asarray(batch["targets"], np.int32)
    if targets.shape[1:] != (config.num_targets, config.target_len):
        raise ValueError(f"targets have shape {targets.shape[1:]}, the model expects "
                         f"{(config.num_targets, config.target_len)}")
    inputs = {"tokens": tokens, "targets": targets,
              "num_targets": np.asarray(batch["num_targets"], np.int32).reshape(-1)}
    if soft is not None:
        inputs["soft_features"] = soft
    return inputs


# ---------------------------------------------------------------------------------------------------------------
# Modules.
# ---------------------------------------------------------------------------------------------------------------
_EMBED_INIT = nn.initializers.normal(stddev=1.0)
_POSITION_INIT = nn.initializers.normal(stddev=0.02)


class Dropout(nn.Module):
    """Inverted dropout with 8-bit keep masks (``tokenminds_model.attention.dropout``); a no-op when deterministic."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate <= 0.0:
            return x
        return attention_lib.dropout(self.make_rng("dropout"), x, self.rate)


class MlpBlock(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        config = self.config
        x = nn.Dense(config.mlp_dim, dtype=config.compute_dtype, name="wi")(x)
        x = nn.gelu(x)
        x = Dropout(config.dropout)(x, deterministic=deterministic)
        x = nn.Dense(config.d_model, dtype=config.compute_dtype, name="wo")(x)
        return Dropout(config.dropout)(x, deterministic=deterministic)


class Attention(nn.Module):
    """Multi-head attention with the parameters of flax's ``MultiHeadDotProductAttention`` (``query``, ``key``,
    ``value``: ``[d, heads, head_dim]``; ``out``: ``[heads, head_dim, d]``, so checkpoints written before carry over
    unchanged), computed by :func:`tokenminds_model.attention.attention`: ``jax.nn.dot_product_attention`` on
    accelerators, a flash-style chunked kernel on CPU; float32 logits and softmax under bfloat16 compute. Dropout on
    the attention weights (rate ``config.dropout``) as before."""

    config: ModelConfig

    def setup(self) -> None:
        config = self.config
        dense = functools.partial(nn.DenseGeneral, features=(config.num_heads, config.d_model // config.num_heads),
                                  dtype=config.compute_dtype)
        self.query = dense()
        self.key = dense()
        self.value = dense()
        self.out = nn.DenseGeneral(config.d_model, axis=(-2, -1), dtype=config.compute_dtype)

    def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array, *, key_mask: Optional[jax.Array] = None,
                 mask: Optional[jax.Array] = None, deterministic: bool = True) -> jax.Array:
        keys, values = self.keys_values(inputs_kv)
        return self.attend(self.queries(inputs_q), keys, values, key_mask=key_mask, mask=mask,
                           deterministic=deterministic)

    def queries(self, x: jax.Array) -> jax.Array:
        return self.query(x)

    def keys_values(self, x: jax.Array) -> Tuple[jax.Array, jax.Array]:
        return self.key(x), self.value(x)

    def output(self, attended: jax.Array) -> jax.Array:
        return self.out(attended)

    def attend(self, queries: jax.Array, keys: jax.Array, values: jax.Array, *, key_mask: Optional[jax.Array] = None,
               mask: Optional[jax.Array] = None, deterministic: bool = True) -> jax.Array:
        rate = 0.0 if deterministic else self.config.dropout
        attended = attention_lib.attention(queries, keys, values, key_mask=key_mask, mask=mask, dropout_rate=rate,
                                           dropout_rng=self.make_rng("dropout") if rate > 0.0 else None)
        return self.output(attended)


class EncoderLayer(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array, deterministic: bool) -> jax.Array:
        dtype = self.config.compute_dtype
        y = nn.LayerNorm(dtype=dtype, name="attention_norm")(x)
        y = Attention(self.config, name="self_attention")(y, y, key_mask=key_mask, deterministic=deterministic)
        x = x + Dropout(self.config.dropout)(y, deterministic=deterministic)
        y = nn.LayerNorm(dtype=dtype, name="mlp_norm")(x)
        return x + MlpBlock(self.config, name="mlp")(y, deterministic)


class DecoderLayer(nn.Module):
    """Pre-LN decoder layer. ``__call__`` runs a whole (folded) decoder input; ``step`` one new token per row with
    the self-attention keys/values of the row's earlier positions cached (``TokenMindsModel.decode_step``)."""

    config: ModelConfig

    def setup(self) -> None:
        config = self.config
        dtype = config.compute_dtype
        self.self_attention_norm = nn.LayerNorm(dtype=dtype)
        self.self_attention = Attention(config)
        self.cross_attention_norm = nn.LayerNorm(dtype=dtype)
        self.cross_attention = Attention(config)
        self.mlp_norm = nn.LayerNorm(dtype=dtype)
        self.mlp = MlpBlock(config)
        self.residual_dropout = Dropout(config.dropout)

    def __call__(self, x: jax.Array, memory: jax.Array, self_mask: jax.Array, memory_mask: jax.Array,
                 deterministic: bool) -> jax.Array:
        y = self.self_attention_norm(x)
        y = self.self_attention(y, y, mask=self_mask, deterministic=deterministic)
        x = x + self.residual_dropout(y, deterministic)
        y = self.cross_attention_norm(x)
        y = self.cross_attention(y, memory, key_mask=memory_mask, deterministic=deterministic)
        x = x + self.residual_dropout(y, deterministic)
        return x + self.mlp(self.mlp_norm(x), deterministic)

    def cross_keys_values(self, memory: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """The cross-attention keys and values of ``memory [B, M, d]``: ``2 x [B, M, heads, head_dim]``."""
        return self.cross_attention.keys_values(memory)

    def step(self, x: jax.Array, cache: Optional[Tuple[jax.Array, jax.Array]], cross: Tuple[jax.Array, jax.Array],
             memory_mask: jax.Array) -> Tuple[jax.Array, Tuple[jax.Array, jax.Array]]:
        """``x [B, R, d]``: each row's newest token. ``cache``: the row's earlier self-attention keys and values
        ``[B, R, p, heads, head_dim]`` (None at position 0). Returns the new token's output and the cache with it."""
        y = self.self_attention_norm(x)
        query = self.self_attention.queries(y)                                   # [B, R, H, D]
        key, value = self.self_attention.keys_values(y)
        if cache is None:
            keys, values = key[:, :, None], value[:, :, None]
        else:
            keys = jnp.concatenate([cache[0], key[:, :, None].astype(cache[0].dtype)], axis=2)
            values = jnp.concatenate([cache[1], value[:, :, None].astype(cache[1].dtype)], axis=2)
        # Causal self-attention of the new token over the row's positions 0..p (all earlier: nothing masked).
        logits = jnp.einsum("brhd,brthd->brht", query, keys, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits / np.sqrt(query.shape[-1]), axis=-1)
        attended = jnp.einsum("brht,brthd->brhd", weights.astype(values.dtype), values).astype(query.dtype)
        x = x + self.self_attention.output(attended)
        y = self.cross_attention_norm(x)
        attended = attention_lib.attention(self.cross_attention.queries(y), cross[0], cross[1], key_mask=memory_mask)
        x = x + self.cross_attention.output(attended)
        return x + self.mlp(self.mlp_norm(x), True), (keys, values)


class Encoder(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, soft_features: Optional[jax.Array],
                 deterministic: bool) -> Tuple[jax.Array, jax.Array]:
        config = self.config
        dtype = config.compute_dtype
        length = tokens.shape[1]
        if length > config.max_tokens:
            raise ValueError(f"encoder input has {length} tokens, the model takes at most {config.max_tokens}")
        x = nn.Embed(config.vocab_size, config.d_model, embedding_init=_EMBED_INIT, name="token_embedding")(tokens)
        if config.soft:
            if soft_features is None:
                raise ValueError("soft-feature model called without soft_features")
            projected = nn.Dense(config.d_model, dtype=dtype, name="soft_in")(soft_features.astype(dtype))
            projected = nn.Dense(config.d_model, dtype=dtype, name="soft_out")(nn.gelu(projected))
            # The <soft> placeholder's embedding is replaced by the projection of its feature vector.
            x = jnp.where((tokens == SOFT_ID)[..., None], projected.astype(x.dtype), x)
        positions = self.param("position_embedding", _POSITION_INIT, (config.max_tokens, config.d_model))
        x = (x + positions[None, :length]).astype(dtype)
        x = Dropout(config.dropout)(x, deterministic=deterministic)
        enc_mask = tokens != PAD_ID
        # Keys are masked at padding; padded query positions compute something harmless that nothing reads.
        for index in range(config.encoder_layers):
            x = EncoderLayer(config, name=f"layer_{index}")(x, enc_mask, deterministic)
        return nn.LayerNorm(dtype=dtype, name="final_norm")(x), enc_mask


class Decoder(nn.Module):
    """The decoder stack. ``__call__``: teacher forcing / full recompute over ``inputs [N, t]``; ``start`` and
    ``step``: incremental decoding with the memory's cross-attention keys/values computed once and the
    self-attention keys/values cached per row (see ``TokenMindsModel.decode_step``)."""

    config: ModelConfig

    def setup(self) -> None:
        config = self.config
        self.token_embedding = nn.Embed(config.vocab_size, config.d_model, embedding_init=_EMBED_INIT)
        self.position_embedding = self.param("position_embedding", _POSITION_INIT,
                                             (config.sid_length, config.d_model))
        for index in range(config.decoder_layers):
            setattr(self, f"layer_{index}", DecoderLayer(config))
        self.final_norm = nn.LayerNorm(dtype=config.compute_dtype)
        # Logits are projected in float32 (also under bfloat16 compute): the loss and the decoding scores read them.
        self.logits = nn.Dense(config.vocab_size, dtype=jnp.float32)
        self.input_dropout = Dropout(config.dropout)

    def _layers(self):
        return [getattr(self, f"layer_{index}") for index in range(self.config.decoder_layers)]

    def _embed(self, inputs: jax.Array, positions: jax.Array) -> jax.Array:
        y = self.token_embedding(inputs)
        return (y + self.position_embedding[positions]).astype(self.config.compute_dtype)

    def __call__(self, memory: jax.Array, memory_mask: jax.Array, inputs: jax.Array, positions: jax.Array,
                 self_mask: jax.Array, deterministic: bool) -> jax.Array:
        y = self.input_dropout(self._embed(inputs, positions), deterministic)
        for layer in self._layers():
            y = layer(y, memory, self_mask, memory_mask, deterministic)
        return self.logits(self.final_norm(y))

    def start(self, memory: jax.Array) -> Tuple[Tuple[jax.Array, jax.Array], ...]:
        """Every layer's cross-attention keys/values of ``memory [B, M, d]``, computed once per user."""
        return tuple(layer.cross_keys_values(memory) for layer in self._layers())

    def step(self, tokens: jax.Array, position: int, cache: Optional[Tuple[Any, ...]],
             cross: Tuple[Tuple[jax.Array, jax.Array], ...], memory_mask: jax.Array
             ) -> Tuple[jax.Array, Tuple[Any, ...]]:
        """``tokens int[B, R]`` at decoder position ``position`` (static) -> ``(logits float32[B, R, V], cache)``."""
        y = self._embed(tokens, jnp.full(tokens.shape, position, jnp.int32))
        new_cache = []
        for index, layer in enumerate(self._layers()):
            y, layer_cache = layer.step(y, None if cache is None else cache[index], cross[index], memory_mask)
            new_cache.append(layer_cache)
        return self.logits(self.final_norm(y)), tuple(new_cache)


class TokenMindsModel(nn.Module):
    """Encoder-decoder user model. ``__call__`` is the training forward pass; see the module docstring."""

    config: ModelConfig

    def setup(self) -> None:
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.embedding_projection = nn.Dense(self.config.embedding_dim, dtype=self.config.compute_dtype)
        if self.config.summary_slot:
            self.summary_projection = nn.Dense(self.config.d_model, dtype=self.config.compute_dtype)

    def encode(self, tokens: jax.Array, soft_features: Optional[jax.Array] = None,
               deterministic: bool = True) -> Tuple[jax.Array, jax.Array]:
        """``tokens int[B, T]`` (T <= max_tokens) -> ``(enc_states [B, T, d_model], enc_mask bool[B, T])``."""
        return self.encoder(tokens, soft_features, deterministic)

    def user_embedding(self, enc_states: jax.Array, enc_mask: jax.Array) -> jax.Array:
        """Pool the encoder states over non-pad positions, project to ``embedding_dim``: ``float32[B, E]``."""
        mask = enc_mask.astype(jnp.float32)[..., None]
        states = enc_states.astype(jnp.float32)
        count = jnp.sum(mask, axis=1)
        pooled = []
        if self.config.pooling in ("mean", "mean_last"):
            pooled.append(jnp.sum(states * mask, axis=1) / jnp.maximum(count, 1.0))
        if self.config.pooling in ("last", "mean_last"):
            # Histories are left-aligned: the last real token sits at index length - 1.
            last = jnp.maximum(count[:, 0].astype(jnp.int32) - 1, 0)
            last_states = jnp.take_along_axis(states, last[:, None, None], axis=1)[:, 0]
            pooled.append(jnp.where(count > 0, last_states, 0.0))
        pooled = jnp.concatenate(pooled, axis=-1)
        return self.embedding_projection(pooled.astype(self.config.compute_dtype)).astype(jnp.float32)

    def memory(self, enc_states: jax.Array, enc_mask: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """What the decoder cross-attends to: ``[summary slot ;] enc_states`` and its mask."""
        if not self.config.summary_slot:
            return enc_states, enc_mask
        slot = self.summary_projection(self.user_embedding(enc_states, enc_mask).astype(self.config.compute_dtype))
        memory = jnp.concatenate([slot[:, None, :].astype(enc_states.dtype), enc_states], axis=1)
        return memory, jnp.concatenate([jnp.ones((enc_mask.shape[0], 1), bool), enc_mask], axis=1)

    def decode(self, enc_states: jax.Array, enc_mask: jax.Array, decoder_inputs: jax.Array,
               deterministic: bool = True) -> jax.Array:
        """Causal decoder over ``decoder_inputs int[N, t]`` (condition token, then SID tokens; t <= L), row n
        reading row n of the encoder states: ``logits float32[N, t, vocab_size]``; position j predicts token j+1."""
        length = decoder_inputs.shape[1]
        if length > self.config.sid_length:
            raise ValueError(f"decoder inputs have {length} tokens; the model decodes at most "
                             f"{self.config.sid_length} (condition token + L-1 SID tokens)")
        memory, memory_mask = self.memory(enc_states, enc_mask)
        self_mask = nn.make_causal_mask(decoder_inputs, dtype=bool)
        return self.decoder(memory, memory_mask, decoder_inputs, jnp.arange(length), self_mask, deterministic)

    def decode_grouped(self, enc_states: jax.Array, enc_mask: jax.Array, decoder_inputs: jax.Array,
                       deterministic: bool = True) -> jax.Array:
        """``decode`` for R decoder rows per user, reading the memory once: ``decoder_inputs int[B, R, t]`` (row r
        of group b reads user b's encoder states ``[B, T, d]``) -> ``logits float32[B, R, t, vocab_size]``.

        The R rows are folded into the decoder's sequence axis (``[B, R * t]``) with a block-diagonal causal mask
        and positions ``0..t-1`` repeated per row (``__call__`` folds the K training targets through it), so the
        memory and its cross-attention keys/values are computed once per user instead of once per row. Block r
        equals ``decode`` of that row alone (the masked attention weights are exactly zero). This is the grouped
        ``logits_fn`` contract of ``tokenminds_model.decoding`` (``grouped=True``).
        """
        batch, rows, length = decoder_inputs.shape
        if length > self.config.sid_length:
            raise ValueError(f"decoder inputs have {length} tokens; the model decodes at most "
                             f"{self.config.sid_length} (condition token + L-1 SID tokens)")
        memory, memory_mask = self.memory(enc_states, enc_mask)
        inputs = decoder_inputs.reshape(batch, rows * length)
        block = jnp.arange(rows * length) // length
        positions = jnp.arange(rows * length) % length
        self_mask = ((block[:, None] == block[None, :]) & (positions[:, None] >= positions[None, :]))[None, None]
        logits = self.decoder(memory, memory_mask, inputs, positions, self_mask, deterministic)
        return logits.reshape(batch, rows, length, -1)

    def decode_start(self, enc_states: jax.Array, enc_mask: jax.Array) -> Dict[str, Any]:
        """What incremental decoding reads for every step, computed once per user: the memory mask and every
        decoder layer's cross-attention keys/values of the memory (``[B, 1 + T, heads, head_dim]`` each)."""
        memory, memory_mask = self.memory(enc_states, enc_mask)
        return {"cross": self.decoder.start(memory), "mask": memory_mask}

    def decode_step(self, start: Mapping[str, Any], cache: Optional[Any], tokens: jax.Array,
                    position: int) -> Tuple[jax.Array, Any]:
        """One incremental decoder step for R rows per user: ``tokens int[B, R]`` are the rows' tokens at decoder
        position ``position`` (static; 0 = the condition token), ``cache`` the rows' self-attention keys/values of
        positions ``0..position-1`` (None at 0; reorder its axis 1 to follow beams). Returns ``(logits float32[B, R,
        V] for the next token, cache through position)``: the same logits as the last position of
        ``decode_grouped`` on the rows' whole inputs, computed for that position only."""
        if not 0 <= position < self.config.sid_length:
            raise ValueError(f"decoder position {position} out of range [0, {self.config.sid_length})")
        return self.decoder.step(tokens, position, cache, start["cross"], start["mask"])

    def __call__(self, tokens: jax.Array, targets: jax.Array, soft_features: Optional[jax.Array] = None,
                 deterministic: bool = True) -> jax.Array:
        """Teacher-forced logits ``float32[B, K, L, vocab_size]`` for ``targets int[B, K, 1 + L]``.

        One encoder pass; the K targets are folded into the decoder's sequence axis with a block-diagonal causal
        mask, so they all read the same memory (computed once) and never attend to each other.
        """
        enc_states, enc_mask = self.encode(tokens, soft_features, deterministic)
        # Teacher forcing: each target's input is [condition, sid_0 .. sid_{L-2}], its labels [sid_0 .. sid_{L-1}].
        return self.decode_grouped(enc_states, enc_mask, targets[:, :, :-1], deterministic)


# ---------------------------------------------------------------------------------------------------------------
# Loss.
# ---------------------------------------------------------------------------------------------------------------
def target_mask(num_targets: jax.Array, max_targets: int) -> jax.Array:
    """``bool[B, K]``: target row k of example b is real iff ``k < num_targets[b]``."""
    return jnp.arange(max_targets)[None, :] < jnp.reshape(num_targets, (-1, 1))


def target_loss(logits: jax.Array, targets: jax.Array, num_targets: jax.Array) -> Tuple[jax.Array, Dict[str, Any]]:
    """The paper's loss from teacher-forced ``logits [B, K, L, V]`` and ``targets int[B, K, 1 + L]``.

    Labels are ``targets[..., 1:]`` (the L SID tokens; ``targets[..., 0]``, the condition token, is never read).
    Per target the cross-entropy is summed over the L positions; the loss is the mean over real targets
    (``k < num_targets``) of the batch. Padded target rows are excluded with ``where`` (their logits get exactly
    zero gradient, even if non-finite). Returns ``(loss, metrics)``.
    """
    labels = targets[..., 1:]
    real = target_mask(num_targets, targets.shape[1])
    # Padded rows' logits are replaced before the softmax (not only their losses after it): a `where` after a
    # non-finite softmax would still send NaN * 0 back into the model.
    logits = jnp.where(real[..., None, None], logits.astype(jnp.float32), 0.0)
    token_nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)  # [B, K, L]
    per_target = jnp.where(real, jnp.sum(token_nll, axis=-1), 0.0)
    real_count = jnp.sum(real)
    loss = jnp.sum(per_target) / jnp.maximum(real_count, 1).astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == labels) & real[..., None]
    denominator = jnp.maximum(real_count, 1).astype(jnp.float32)
    metrics = {
        "loss": loss,
        "real_targets": real_count,
        "token_accuracy": jnp.sum(correct) / (denominator * labels.shape[-1]),
        # Exact match of all L SID tokens under teacher forcing.
        "target_accuracy": jnp.sum(jnp.all(correct, axis=-1)) / denominator,
    }
    return loss, metrics


# ---------------------------------------------------------------------------------------------------------------
# Functional API (what training, evaluation, batch inference and ``decoding`` call).
# ---------------------------------------------------------------------------------------------------------------
class ModelFunctions:
    """Pure functions of ``params`` for one config. Get them from :func:`model_functions` (cached per config), so
    ``model_functions(config).decode`` is always the same (equal, equally hashed) bound method: pass it to
    ``decoding.beam_search(..., params=params)`` as ``logits_fn`` and repeated calls share one compilation (likewise
    ``decode_grouped`` with ``grouped=True``, which projects each user's memory once instead of once per beam)."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.module = TokenMindsModel(config)

    def init(self, rng: jax.Array) -> Params:
        """Fresh parameters (float32) for this config (jitted: initialising op by op is slow)."""
        return self._jitted_init(rng)

    @functools.cached_property
    def _jitted_init(self):
        return jax.jit(self._init)

    def _init(self, rng: jax.Array) -> Params:
        config = self.config
        tokens = jnp.zeros((1, config.max_tokens), jnp.int32)
        targets = jnp.zeros((1, config.num_targets, config.target_len), jnp.int32)
        soft = jnp.zeros((1, config.max_tokens, config.soft_feature_dim), jnp.float32) if config.soft else None
        return self.module.init({"params": rng}, tokens, targets, soft, deterministic=True)["params"]

    def param_shapes(self) -> Params:
        """The parameter pytree as ``jax.ShapeDtypeStruct`` leaves (no arrays allocated)."""
        return jax.eval_shape(self._init, jax.random.key(0))

    def encode(self, params: Params, tokens: jax.Array, soft_features: Optional[jax.Array] = None
               ) -> Tuple[jax.Array, jax.Array]:
        return self.module.apply({"params": params}, tokens, soft_features, method=TokenMindsModel.encode)

    def user_embedding(self, params: Params, enc_states: jax.Array, enc_mask: jax.Array) -> jax.Array:
        return self.module.apply({"params": params}, enc_states, enc_mask, method=TokenMindsModel.user_embedding)

    def decode(self, params: Params, enc_states: jax.Array, enc_mask: jax.Array,
               decoder_inputs: jax.Array) -> jax.Array:
        return self.module.apply({"params": params}, enc_states, enc_mask, decoder_inputs,
                                 method=TokenMindsModel.decode)

    def decode_grouped(self, params: Params, enc_states: jax.Array, enc_mask: jax.Array,
                       decoder_inputs: jax.Array) -> jax.Array:
        """``decoder_inputs int[B, R, t]`` -> ``logits float32[B, R, t, V]``, memory projected once per user: pass
        to ``decoding.multi_context_decode(..., params=params, grouped=True)``."""
        return self.module.apply({"params": params}, enc_states, enc_mask, decoder_inputs,
                                 method=TokenMindsModel.decode_grouped)

    def decode_start(self, params: Params, enc_states: jax.Array, enc_mask: jax.Array) -> Dict[str, Any]:
        return self.module.apply({"params": params}, enc_states, enc_mask, method=TokenMindsModel.decode_start)

    def decode_step(self, params: Params, start: Mapping[str, Any], cache: Optional[Any], tokens: jax.Array,
                    position: int) -> Tuple[jax.Array, Any]:
        return self.module.apply({"params": params}, start, cache, tokens, position,
                                 method=TokenMindsModel.decode_step)

    @functools.cached_property
    def incremental_decoder(self) -> "IncrementalModelDecoder":
        """This model as a ``decoding.IncrementalDecoder`` (one object per config): beam search computes each
        user's memory and its cross-attention keys/values once, caches every row's decoder self-attention
        keys/values across levels and projects logits only for each row's newest position. Pass it as the
        ``logits_fn`` of ``decoding.beam_search`` / ``multi_context_decode`` with ``params=``; it decodes the same
        codes and scores (to float rounding) as ``decode_grouped``."""
        return IncrementalModelDecoder(self)

    def embed_users(self, params: Params, tokens: jax.Array, soft_features: Optional[jax.Array] = None) -> jax.Array:
        """Dense user embeddings ``float32[B, embedding_dim]`` straight from tokens."""
        return self.user_embedding(params, *self.encode(params, tokens, soft_features))

    def logits(self, params: Params, tokens: jax.Array, targets: jax.Array,
               soft_features: Optional[jax.Array] = None, *, dropout_rng: Optional[jax.Array] = None) -> jax.Array:
        """Teacher-forced logits ``[B, K, L, V]``; dropout is on iff ``dropout_rng`` is given."""
        deterministic = dropout_rng is None
        rngs = {} if deterministic else {"dropout": dropout_rng}
        return self.module.apply({"params": params}, tokens, targets, soft_features, deterministic=deterministic,
                                 rngs=rngs)

    @functools.cached_property
    def jitted_loss(self):
        """``jax.jit(self.loss)`` without dropout (evaluation), one per config."""
        return jax.jit(lambda params, inputs: self.loss(params, inputs))

    def loss(self, params: Params, inputs: Mapping[str, jax.Array], *,
             dropout_rng: Optional[jax.Array] = None) -> Tuple[jax.Array, Dict[str, Any]]:
        """The training loss for :func:`model_inputs` output; returns ``(loss, metrics)``."""
        logits = self.logits(params, inputs["tokens"], inputs["targets"], inputs.get("soft_features"),
                             dropout_rng=dropout_rng)
        return target_loss(logits, inputs["targets"], inputs["num_targets"])


class IncrementalModelDecoder(decoding_lib.IncrementalDecoder):
    """``ModelFunctions.incremental_decoder``: the model's ``decode_start`` / ``decode_step`` under the
    ``decoding.IncrementalDecoder`` contract."""

    def __init__(self, fns: ModelFunctions) -> None:
        self.fns = fns

    def start(self, params: Params, enc_states: jax.Array, enc_mask: jax.Array) -> Dict[str, Any]:
        return self.fns.decode_start(params, enc_states, enc_mask)

    def step(self, params: Params, memory: Mapping[str, Any], cache: Optional[Any], tokens: jax.Array,
             position: int) -> Tuple[jax.Array, Any]:
        return self.fns.decode_step(params, memory, cache, tokens, position)


@functools.lru_cache(maxsize=None)
def model_functions(config: ModelConfig) -> ModelFunctions:
    """The (cached) :class:`ModelFunctions` of ``config``."""
    return ModelFunctions(config)


def count_params(params: Params) -> int:
    return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params)))
