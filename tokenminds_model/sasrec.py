"""SASRec: a self-attentive sequential recommendation baseline (Flax linen + optax).

After Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018 (arXiv:1808.09781).

Model (:class:`SASRec`):

- Items are ``1..num_items``; 0 is padding. A user's history is the last ``max_len`` items, left-padded with zeros
  so the most recent item always sits at the last position (as in the paper's code).
- Input = item embedding * sqrt(d_model) + learned positional embedding, dropout, padding positions zeroed.
- ``num_layers`` pre-LayerNorm transformer blocks: causal multi-head self-attention (a position sees itself and
  earlier positions, never padding), then a pointwise feed-forward network (Dense d -> d, GELU, Dense d -> d; the
  paper uses the same width and ReLU), each with dropout and a residual connection; padding positions are zeroed
  after each block. A final LayerNorm.
- Scores: the hidden state at a position dotted with *the same* item embedding table (``logits = h . E^T``), so the
  output layer shares the input embedding, as in the paper.

Training (:func:`train_sasrec`): next-item prediction at every position. Each step samples ``batch_size`` users
uniformly (with replacement; a seeded ``np.random.default_rng(seed)``), takes each one's last ``max_len + 1``
training items, predicts ``seq[1:]`` from ``seq[:-1]`` at every non-padding position. Loss:

- ``"ce"`` (default): softmax cross-entropy over all items at every position. Recent full-ranking comparisons train
  SASRec this way and find it much stronger than the original loss (e.g. Klenitskiy & Vasilev, "Turning Dross Into
  Gold Loss: is BERT4Rec really better than SASRec?", RecSys 2023).
- ``"bce"``: the paper's binary cross-entropy with one sampled negative per position, drawn uniformly from the items
  the user has not interacted with in training.

Adam (``optax.adamw``, beta2 0.98 as in the paper's code; ``weight_decay`` 0 by default) with global-norm gradient
clipping at 1.0. Every ``eval_every`` steps, and at the last step, the model scores every item for the validation
users (:func:`score_users`) and :mod:`tokenminds_model.ranking` computes full-ranking metrics; the parameters with the
best validation NDCG@10 are kept (a host copy) and returned. Training stops after ``patience`` evaluations without
improvement, at ``max_steps``, or once ``time_budget_s`` has elapsed. Given the seed, a run is deterministic (on one
platform): parameter init from ``PRNGKey(seed)``, dropout keys from ``fold_in(key, step)``, batches from NumPy.

Full-ranking evaluation here does not mask the user's history items from the scores: that choice is left to the
caller (it makes no difference on datasets where a user never repeats an item, apart from the rank of the target).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tokenminds_model import ranking

LOSSES = ("ce", "bce")
# Global-norm gradient clipping threshold (a guard against the occasional large step; not tuned).
GRADIENT_CLIP_NORM = 1.0
# Adam's second-moment decay, as in the paper's code (optax's default is 0.999).
ADAM_BETA2 = 0.98


@dataclasses.dataclass(frozen=True)
class SASRecConfig:
    """Model and training hyper-parameters. Defaults follow common full-ranking SASRec set-ups for MovieLens-1M."""
    num_items: int               # items are 1..num_items; 0 is padding
    max_len: int = 200           # history positions (the paper's n: 200 for ML-1M)
    d_model: int = 64
    num_heads: int = 2
    num_layers: int = 2
    dropout: float = 0.2
    learning_rate: float = 1e-3
    batch_size: int = 128
    max_steps: int = 20000
    eval_every: int = 200
    patience: int = 5            # evaluations without a better validation NDCG@10 before stopping
    time_budget_s: Optional[float] = None
    seed: int = 0
    loss: str = "ce"             # "ce": full softmax; "bce": one sampled negative per position (the paper's)
    weight_decay: float = 0.0

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if self.num_items < 1 or self.max_len < 1:
            raise ValueError("num_items and max_len must be positive")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# Model.
# ---------------------------------------------------------------------------------------------------------------

class SASRecBlock(nn.Module):
    """One pre-LayerNorm transformer block: causal self-attention, then a pointwise feed-forward network."""
    d_model: int
    num_heads: int
    dropout: float

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool):
        attended = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, qkv_features=self.d_model, out_features=self.d_model,
            dropout_rate=self.dropout, deterministic=deterministic, name="attention",
        )(nn.LayerNorm(name="attention_norm")(x), mask=attention_mask)
        x = x + nn.Dropout(self.dropout)(attended, deterministic=deterministic)
        hidden = nn.LayerNorm(name="ffn_norm")(x)
        hidden = nn.gelu(nn.Dense(self.d_model, name="ffn_in")(hidden))
        hidden = nn.Dropout(self.dropout)(hidden, deterministic=deterministic)
        hidden = nn.Dense(self.d_model, name="ffn_out")(hidden)
        return x + nn.Dropout(self.dropout)(hidden, deterministic=deterministic)


class SASRec(nn.Module):
    """Left-padded item ids ``int[B, max_len]`` -> hidden states ``[B, max_len, d_model]``; see the module doc."""
    config: SASRecConfig

    def setup(self):
        config = self.config
        self.item_embedding = nn.Embed(config.num_items + 1, config.d_model, name="item_embedding")
        self.position_embedding = nn.Embed(config.max_len, config.d_model, name="position_embedding")
        self.input_dropout = nn.Dropout(config.dropout)
        self.blocks = [SASRecBlock(config.d_model, config.num_heads, config.dropout, name=f"block_{i}")
                       for i in range(config.num_layers)]
        self.final_norm = nn.LayerNorm(name="final_norm")

    def __call__(self, item_ids, deterministic: bool = True):
        is_item = item_ids > 0  # [B, T]
        positions = jnp.arange(item_ids.shape[1])
        x = self.item_embedding(item_ids) * math.sqrt(self.config.d_model) + self.position_embedding(positions)[None]
        x = self.input_dropout(x, deterministic=deterministic) * is_item[..., None]
        # Query t may attend to key s iff s <= t and s is an item. With left padding a padding query sees only
        # padding keys; flax's masked softmax then averages uniformly (no NaN), and those outputs are zeroed anyway.
        attention_mask = nn.combine_masks(nn.make_causal_mask(item_ids),
                                          nn.make_attention_mask(jnp.ones_like(is_item), is_item))
        for block in self.blocks:
            x = block(x, attention_mask, deterministic) * is_item[..., None]
        return self.final_norm(x)

    def item_logits(self, hidden):
        """Scores of every item id (column 0 is padding; callers mask it) from hidden states ``[..., d_model]``."""
        return self.item_embedding.attend(hidden)

    def item_scores(self, hidden, item_ids):
        """Scores of the given items only: ``hidden [..., d] . E[item_ids [...]]`` (for the sampled BCE loss)."""
        return jnp.sum(hidden * self.item_embedding(item_ids), axis=-1)


# ---------------------------------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------------------------------

def left_pad(sequences: Sequence[np.ndarray], length: int) -> np.ndarray:
    """The last ``length`` items of each sequence, left-padded with 0 to ``int32[len(sequences), length]``."""
    padded = np.zeros((len(sequences), length), dtype=np.int32)
    for row, sequence in enumerate(sequences):
        tail = np.asarray(sequence, dtype=np.int32)[-length:] if length else np.zeros(0, np.int32)
        if len(tail):
            padded[row, length - len(tail):] = tail
    return padded


def sample_negatives(rng: np.random.Generator, user_items: Sequence[np.ndarray], shape, num_items: int) -> np.ndarray:
    """One negative per position for each row, uniform over the items not in that row's user's training items."""
    negatives = rng.integers(1, num_items + 1, size=shape, dtype=np.int32)
    for row, items in enumerate(user_items):
        # Rejection sampling; users who interacted with (nearly) every item keep a collision after a few rounds.
        for _ in range(20):
            collides = np.isin(negatives[row], items)
            if not collides.any():
                break
            negatives[row, collides] = rng.integers(1, num_items + 1, size=int(collides.sum()), dtype=np.int32)
    return negatives


# ---------------------------------------------------------------------------------------------------------------
# Scoring.
# ---------------------------------------------------------------------------------------------------------------

def _make_score_fn(config: SASRecConfig):
    model = SASRec(config)

    @jax.jit
    def score_batch(params, item_ids):
        hidden = model.apply({"params": params}, item_ids, deterministic=True)[:, -1]  # the most recent position
        logits = model.apply({"params": params}, hidden, method=SASRec.item_logits)
        return logits.at[:, 0].set(-jnp.inf)  # padding is never recommended

    return score_batch


def _compiled_function_key(config: SASRecConfig) -> SASRecConfig:
    """The config with the fields that do not change the computation blanked, so runs that differ only in them
    (steps, evaluation cadence, seed, batch size: shapes are handled by jit) share compiled functions."""
    return dataclasses.replace(config, max_steps=0, eval_every=0, patience=0, time_budget_s=None, seed=0,
                               batch_size=0)


# Compiled functions by _compiled_function_key: compiling costs seconds on CPU, more than a short run's training.
_SCORE_FNS: Dict[SASRecConfig, Callable] = {}
_TRAIN_STEPS: Dict[SASRecConfig, Callable] = {}


def score_users(params, config: SASRecConfig, histories: Sequence[np.ndarray], batch_size: int = 256) -> np.ndarray:
    """``float32[U, num_items + 1]`` scores of every item for each history (column 0, padding, is ``-inf``).

    Each history (item ids, oldest first) is cut to its last ``max_len`` items and left-padded; the score is the last
    position's hidden state dotted with the item embeddings. Batches have a fixed shape (the last one is padded with
    empty histories) so the jit-compiled function is traced once per config and batch size.
    """
    compiled_key = _compiled_function_key(config)
    if compiled_key not in _SCORE_FNS:
        _SCORE_FNS[compiled_key] = _make_score_fn(compiled_key)
    score_batch = _SCORE_FNS[compiled_key]
    scores = np.empty((len(histories), config.num_items + 1), dtype=np.float32)
    for start in range(0, len(histories), batch_size):
        chunk = histories[start:start + batch_size]
        item_ids = np.zeros((batch_size, config.max_len), dtype=np.int32)
        item_ids[:len(chunk)] = left_pad(chunk, config.max_len)
        scores[start:start + len(chunk)] = np.asarray(score_batch(params, item_ids))[:len(chunk)]
    return scores


def evaluate(params, config: SASRecConfig, histories: Sequence[np.ndarray], targets: np.ndarray,
             batch_size: int = 256) -> Dict[str, float]:
    """Full-ranking metrics (:func:`ranking.metrics_from_ranks`) of ``targets`` given ``histories``."""
    ranks = ranking.target_ranks(score_users(params, config, histories, batch_size), np.asarray(targets))
    return ranking.metrics_from_ranks(ranks)


# ---------------------------------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class SASRecResult:
    params: Any                      # the best validation NDCG@10's parameters (NumPy arrays)
    config: SASRecConfig
    best_step: int
    steps_run: int
    train_seconds: float             # wall time of the whole run, evaluations included
    # Per evaluation: step, loss (mean training loss since the previous evaluation), the *validation* metrics under
    # their ranking names (recall@5 ... ndcg@20), seconds (since the start of the run).
    history: List[Dict[str, float]]
    num_params: int


def _make_optimizer(config: SASRecConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(GRADIENT_CLIP_NORM),
                       optax.adamw(config.learning_rate, b2=ADAM_BETA2, weight_decay=config.weight_decay))


def _make_train_step(config: SASRecConfig):
    model = SASRec(config)
    optimizer = _make_optimizer(config)

    def loss_fn(params, inputs, labels, negatives, dropout_key):
        hidden = model.apply({"params": params}, inputs, deterministic=False, rngs={"dropout": dropout_key})
        is_target = (inputs > 0).astype(jnp.float32)  # left padding: a real input always has a real next item
        if config.loss == "ce":
            logits = model.apply({"params": params}, hidden, method=SASRec.item_logits)
            logits = logits.at[..., 0].set(-1e9)  # never predict padding (finite: no inf - inf in the softmax)
            per_position = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        else:
            positive = model.apply({"params": params}, hidden, labels, method=SASRec.item_scores)
            negative = model.apply({"params": params}, hidden, negatives, method=SASRec.item_scores)
            per_position = -jax.nn.log_sigmoid(positive) - jax.nn.log_sigmoid(-negative)
        return jnp.sum(per_position * is_target) / jnp.maximum(jnp.sum(is_target), 1.0)

    @jax.jit
    def train_step(params, opt_state, inputs, labels, negatives, dropout_key):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, labels, negatives, dropout_key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def train_sasrec(train_sequences: Sequence[np.ndarray], valid_histories: Sequence[np.ndarray],
                 valid_targets: np.ndarray, config: SASRecConfig, log: Callable[[str], None] = print) -> SASRecResult:
    """Train SASRec on ``train_sequences`` (per user, item ids 1..N oldest first), early-stopping on validation
    NDCG@10 of ``valid_targets`` given ``valid_histories``. Returns the best parameters; see the module doc."""
    started = time.perf_counter()
    # Users with fewer than two training items have no (input, next item) pair.
    usable = [np.asarray(sequence, dtype=np.int32) for sequence in train_sequences if len(sequence) >= 2]
    if not usable:
        raise ValueError("no training sequence has 2 or more items")
    # Each user's last max_len + 1 items, left-padded: inputs are [:, :-1], labels [:, 1:].
    windows = left_pad(usable, config.max_len + 1)
    valid_targets = np.asarray(valid_targets)

    rng = np.random.default_rng(config.seed)
    key = jax.random.PRNGKey(config.seed)
    init_key, dropout_base_key = jax.random.split(key)
    model = SASRec(config)
    params = model.init(init_key, jnp.zeros((1, config.max_len), jnp.int32))["params"]
    num_params = int(sum(np.size(leaf) for leaf in jax.tree.leaves(params)))
    opt_state = _make_optimizer(config).init(params)
    compiled_key = _compiled_function_key(config)
    if compiled_key not in _TRAIN_STEPS:
        _TRAIN_STEPS[compiled_key] = _make_train_step(compiled_key)
    train_step = _TRAIN_STEPS[compiled_key]
    log(f"SASRec: {len(usable)} training users, {num_params:,} parameters, config {config.to_dict()}")

    history: List[Dict[str, float]] = []
    best_params, best_ndcg, best_step = None, -1.0, 0
    evaluations_without_improvement = 0
    losses_since_eval: List[Any] = []
    step = 0
    while step < config.max_steps:
        rows = rng.integers(0, len(usable), size=config.batch_size)
        batch = windows[rows]
        inputs, labels = batch[:, :-1], batch[:, 1:]
        if config.loss == "bce":
            negatives = sample_negatives(rng, [usable[row] for row in rows], labels.shape, config.num_items)
        else:
            negatives = labels  # unused by the CE loss; same shape keeps a single compiled step
        params, opt_state, loss = train_step(params, opt_state, inputs, labels, negatives,
                                             jax.random.fold_in(dropout_base_key, step))
        losses_since_eval.append(loss)
        step += 1

        out_of_time = config.time_budget_s is not None and time.perf_counter() - started >= config.time_budget_s
        if step % config.eval_every and step < config.max_steps and not out_of_time:
            continue
        metrics = evaluate(params, config, valid_histories, valid_targets)
        record = {"step": step, "loss": float(np.mean([float(x) for x in losses_since_eval])),
                  **{name: value for name, value in metrics.items() if name != "users"},
                  "seconds": time.perf_counter() - started}
        history.append(record)
        losses_since_eval = []
        if metrics["ndcg@10"] > best_ndcg:
            best_ndcg, best_step = metrics["ndcg@10"], step
            best_params = jax.tree.map(np.asarray, params)  # a host copy: later updates must not change it
            evaluations_without_improvement = 0
        else:
            evaluations_without_improvement += 1
        log(f"step {step}: loss {record['loss']:.4f}, valid recall@10 {metrics['recall@10']:.4f}, "
            f"ndcg@10 {metrics['ndcg@10']:.4f} (best {best_ndcg:.4f} at step {best_step}), "
            f"{record['seconds']:.0f}s")
        if evaluations_without_improvement >= config.patience:
            log(f"early stop: no better validation NDCG@10 in {config.patience} evaluations")
            break
        if out_of_time:
            log(f"time budget of {config.time_budget_s}s reached")
            break

    return SASRecResult(params=best_params, config=config, best_step=best_step, steps_run=step,
                        train_seconds=time.perf_counter() - started, history=history, num_params=num_params)
