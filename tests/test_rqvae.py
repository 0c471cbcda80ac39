"""Tests of the item tokenizer: RQ-VAE, RQ-KMeans baseline, SID metrics, disambiguation and checkpoints.

Synthetic data is built here: well separated Gaussian clusters, so the first SID level has a known right answer.
Codebooks are small (3 levels x 16 codes) and training short, so the whole file runs in well under two minutes on
two CPU cores. The MovieLens check runs only where ../shared/data holds the imported items.
"""
from __future__ import annotations

import json
import math
import pathlib

import jax
import numpy as np
import pytest

from tokenminds_model.checkpoints import CONFIG_FILENAME, load_sid_model, save_sid_model
from tokenminds_model.rqvae import RQKMeansConfig, RQVAEConfig, TrainedSIDModel, rq_kmeans, train_rqvae
from tokenminds_model.sid_metrics import disambiguate, label_agreement, sid_metrics

NUM_CLUSTERS = 12
NUM_POINTS = 3000
DIM = 64
CODEBOOK_SIZE = 16
LEVELS = 3
MOVIELENS_ITEMS = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "movielens-1m" / \
    "items.parquet"


def small_config(**overrides) -> RQVAEConfig:
    values = dict(input_dim=DIM, latent_dim=32, hidden_dims=(64, 32), levels=LEVELS, codebook_size=CODEBOOK_SIZE,
                  batch_size=256, steps=1000, seed=0, dead_code_reseed_every=100, log_every=100)
    values.update(overrides)
    return RQVAEConfig(**values)


def first_level_purity(first_codes: np.ndarray, cluster_labels: np.ndarray) -> float:
    """Fraction of items whose cluster is the majority cluster of their first-level code."""
    majority_sizes = [np.bincount(cluster_labels[first_codes == code]).max() for code in np.unique(first_codes)]
    return float(sum(majority_sizes) / len(cluster_labels))


@pytest.fixture(scope="module")
def clustered_data():
    rng = np.random.default_rng(1234)
    centers = rng.normal(size=(NUM_CLUSTERS, DIM)) * 3.0  # centers ~34 apart, points within ~4 of theirs
    labels = rng.integers(0, NUM_CLUSTERS, NUM_POINTS)
    points = centers[labels] + rng.normal(size=(NUM_POINTS, DIM)) * 0.5
    return points.astype(np.float32), labels


@pytest.fixture(scope="module")
def trained(clustered_data):
    points, _ = clustered_data
    model, history = train_rqvae(points, small_config())
    return model, history


# ---------------------------------------------------------------------------------------------------------------
# RQ-VAE quality.
# ---------------------------------------------------------------------------------------------------------------
def test_planted_clusters_are_recovered_by_first_level_codes(clustered_data, trained):
    points, labels = clustered_data
    model, _ = trained
    codes = model.encode_batched(points)
    assert codes.shape == (NUM_POINTS, LEVELS) and codes.dtype == np.int32
    purity = first_level_purity(codes[:, 0], labels)
    chance = first_level_purity(np.random.default_rng(0).integers(0, CODEBOOK_SIZE, NUM_POINTS), labels)
    assert chance < 0.2
    assert purity > 0.95, f"first-level purity {purity:.3f} (chance {chance:.3f})"


def test_codebook_utilisation_stays_high(clustered_data, trained):
    points, _ = clustered_data
    model, history = trained
    metrics = model.metrics(points)
    assert all(u > 0.8 for u in metrics["utilisation_per_level"]), metrics["utilisation_per_level"]
    assert all(e > 0.8 for e in metrics["normalized_entropy_per_level"]), metrics["normalized_entropy_per_level"]
    # Reconstruction must beat predicting the mean (the data's total variance per element is ~9.25).
    assert metrics["reconstruction_mse"] < 1.0
    assert history["loss"][-1] < history["loss"][0]
    assert len(history["step"]) == len(history["window_utilisation"]) == len(history["reseeded_codes"])


def test_dead_code_reseeding_revives_codes(clustered_data):
    points, _ = clustered_data
    # k-means init on only 8 items for 16 codes: k-means++ can place only 8 distinct centers, the other 8 are
    # duplicates that never win an argmin, i.e. dead from the start.
    without_reseed, history_without = train_rqvae(
        points, small_config(kmeans_init_samples=8, dead_code_reseed_every=0, steps=600))
    with_reseed, history_with = train_rqvae(
        points, small_config(kmeans_init_samples=8, dead_code_reseed_every=100, steps=600))
    level1_without = sid_metrics(without_reseed.encode_batched(points), CODEBOOK_SIZE)["utilisation_per_level"][0]
    level1_with = sid_metrics(with_reseed.encode_batched(points), CODEBOOK_SIZE)["utilisation_per_level"][0]
    assert level1_without <= 0.65, f"construction should leave dead codes, got utilisation {level1_without}"
    assert history_without["total_reseeded_codes"] == 0
    # Codes were dead over the first window, and the re-seed at its end replaced them.
    assert history_with["window_utilisation"][0][0] <= 0.8, history_with["window_utilisation"][0]
    assert history_with["reseeded_codes"][0][0] >= 1, history_with["reseeded_codes"]
    assert level1_with >= 0.9, f"re-seeding left level-1 utilisation at {level1_with}"


def test_training_is_deterministic_for_a_seed(clustered_data, trained):
    points, _ = clustered_data
    model, _ = trained
    again, _ = train_rqvae(points, small_config())
    assert again.version == model.version
    np.testing.assert_array_equal(again.encode_batched(points), model.encode_batched(points))
    for left, right in zip(jax.tree.leaves(model.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(left, right)
    other_seed, _ = train_rqvae(points, small_config(seed=1, steps=100))
    assert other_seed.version != model.version


def test_encode_is_pure_and_jittable(clustered_data, trained):
    points, _ = clustered_data
    model, _ = trained
    jitted = jax.jit(model.encode)(model.params, points[:500])
    assert jitted.dtype == np.int32 and jitted.shape == (500, LEVELS)
    np.testing.assert_array_equal(np.asarray(jitted), model.encode_batched(points[:500]))
    # Odd batch sizes (zero-padded tail) give the same codes as one big batch.
    np.testing.assert_array_equal(model.encode_batched(points, batch_size=77), model.encode_batched(points))


def test_config_json_round_trip():
    config = small_config(hidden_dims=(32, 16), codebook_update="gradient")
    restored = RQVAEConfig.from_json(config.to_json())
    assert restored == config and isinstance(restored.hidden_dims, tuple)
    assert RQKMeansConfig.from_json(RQKMeansConfig(input_dim=8).to_json()) == RQKMeansConfig(input_dim=8)
    with pytest.raises(ValueError, match="unknown"):
        RQVAEConfig.from_dict({**config.to_dict(), "not_a_field": 1})
    with pytest.raises(ValueError):
        small_config(codebook_update="adam")


def test_gradient_codebook_updates_also_train(clustered_data):
    points, labels = clustered_data
    model, _ = train_rqvae(points, small_config(codebook_update="gradient"))
    codes = model.encode_batched(points)
    assert first_level_purity(codes[:, 0], labels) > 0.95
    assert sid_metrics(codes, CODEBOOK_SIZE)["utilisation_per_level"][0] > 0.8


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints.
# ---------------------------------------------------------------------------------------------------------------
def test_save_reload_gives_identical_sids_and_version(clustered_data, trained, tmp_path):
    points, _ = clustered_data
    model, _ = trained
    directory = tmp_path / "rqvae"
    save_sid_model(model, directory)
    document = json.loads((directory / CONFIG_FILENAME).read_text())
    assert document["kind"] == "rqvae" and document["version"] == model.version
    assert (directory / "params").is_dir()

    reloaded = load_sid_model(directory)
    assert reloaded.version == model.version
    assert reloaded.config == model.config
    np.testing.assert_array_equal(reloaded.encode_batched(points), model.encode_batched(points))
    for left, right in zip(jax.tree.leaves(model.params), jax.tree.leaves(reloaded.params)):
        np.testing.assert_array_equal(left, right)

    with pytest.raises(FileExistsError):
        save_sid_model(model, directory)
    save_sid_model(reloaded, directory, overwrite=True)
    assert load_sid_model(str(directory)).version == model.version
    assert not any(path.name.endswith(".pickle") or path.name.endswith(".pkl") for path in directory.rglob("*"))


def test_load_fails_clearly_on_missing_or_corrupt_checkpoints(trained, tmp_path):
    model, _ = trained
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sid_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=CONFIG_FILENAME):
        load_sid_model(tmp_path / "empty")

    directory = save_sid_model(model, tmp_path / "model")
    config_path = pathlib.Path(str(directory)) / CONFIG_FILENAME
    good = config_path.read_text()

    config_path.write_text(good[: len(good) // 2])
    with pytest.raises(ValueError, match="corrupt config.json"):
        load_sid_model(directory)

    document = json.loads(good)
    document["config"]["levels"] = "three"
    config_path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match="corrupt config.json"):
        load_sid_model(directory)

    document = json.loads(good)
    document["version"] = "rqvae-0000000000000000"
    config_path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match="does not match"):
        load_sid_model(directory)


# ---------------------------------------------------------------------------------------------------------------
# RQ-KMeans baseline.
# ---------------------------------------------------------------------------------------------------------------
def test_rq_kmeans_baseline_works_with_the_same_encode_metrics_and_checkpoints(clustered_data, trained, tmp_path):
    points, labels = clustered_data
    baseline = rq_kmeans(points, levels=LEVELS, codebook_size=CODEBOOK_SIZE, seed=0)
    assert isinstance(baseline, TrainedSIDModel) and baseline.kind == "rq_kmeans"
    assert baseline.codebooks.shape == (LEVELS, CODEBOOK_SIZE, DIM)
    codes = baseline.encode_batched(points)
    assert codes.shape == (NUM_POINTS, LEVELS) and codes.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(jax.jit(baseline.encode)(baseline.params, points)), codes)
    assert first_level_purity(codes[:, 0], labels) > 0.95

    baseline_metrics = baseline.metrics(points)
    rqvae_metrics = trained[0].metrics(points)
    assert baseline_metrics.keys() == rqvae_metrics.keys()
    assert all(u > 0.8 for u in baseline_metrics["utilisation_per_level"])

    assert rq_kmeans(points, levels=LEVELS, codebook_size=CODEBOOK_SIZE, seed=0).version == baseline.version
    save_sid_model(baseline, tmp_path / "baseline")
    reloaded = load_sid_model(tmp_path / "baseline")
    assert reloaded.kind == "rq_kmeans" and reloaded.version == baseline.version
    np.testing.assert_array_equal(reloaded.encode_batched(points), codes)


# ---------------------------------------------------------------------------------------------------------------
# Metrics and disambiguation on hand-made codes.
# ---------------------------------------------------------------------------------------------------------------
def test_sid_metrics_exact_numbers():
    codes = np.array([[0, 0, 0],
                      [0, 0, 0],
                      [0, 1, 0],
                      [1, 2, 3]], dtype=np.int32)
    metrics = sid_metrics(codes, codebook_size=4, reconstruction_mse=0.5)
    # Level 0 uses codes {0: 3 items, 1: 1 item}; level 1 {0: 2, 1: 1, 2: 1}; level 2 {0: 3, 3: 1}.
    assert metrics["utilisation_per_level"] == [0.5, 0.75, 0.5]
    entropy_0 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    entropy_1 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert metrics["normalized_entropy_per_level"] == pytest.approx(
        [entropy_0 / math.log(4), entropy_1 / math.log(4), entropy_0 / math.log(4)])
    assert metrics["perplexity_per_level"] == pytest.approx(
        [math.exp(entropy_0), math.exp(entropy_1), math.exp(entropy_0)])
    assert metrics["unique_sids"] == 3
    assert metrics["full_sid_collision_rate"] == 0.5  # items 0 and 1 share (0, 0, 0)
    assert metrics["max_items_per_sid"] == 2
    # Prefix (0,) is shared by 3 items, (0, 0) by 2, the full SID by 2.
    assert metrics["prefix_collision_rate"] == [0.75, 0.5, 0.5]
    assert metrics["reconstruction_mse"] == 0.5
    assert metrics["num_items"] == 4 and metrics["levels"] == 3 and metrics["codebook_size"] == 4
    assert sid_metrics(codes, codebook_size=4)["reconstruction_mse"] is None

    uniform = sid_metrics(np.arange(8, dtype=np.int32)[:, None], codebook_size=8)
    assert uniform["normalized_entropy_per_level"] == pytest.approx([1.0])
    assert uniform["perplexity_per_level"] == pytest.approx([8.0])
    assert uniform["full_sid_collision_rate"] == 0.0 and uniform["unique_sids"] == 8
    with pytest.raises(ValueError):
        sid_metrics(codes, codebook_size=3)  # code 3 is out of range


def test_disambiguate_makes_full_sids_unique_and_is_deterministic():
    codes = np.array([[1, 2], [0, 0], [1, 2], [0, 0], [1, 2], [5, 5]], dtype=np.int32)
    video_ids = np.array(["v9", "v3", "v1", "v2", "v5", "v0"])
    suffix = disambiguate(codes, sort_key=video_ids)
    assert suffix.dtype == np.int32
    # Within (1, 2): v1 < v5 < v9; within (0, 0): v2 < v3; (5, 5) alone.
    np.testing.assert_array_equal(suffix, [2, 1, 0, 0, 1, 0])
    full = np.concatenate([codes, suffix[:, None]], axis=1)
    assert np.unique(full, axis=0).shape[0] == len(codes)

    # Same catalogue in another row order: every video keeps its disambiguation code.
    order = np.random.default_rng(0).permutation(len(codes))
    np.testing.assert_array_equal(disambiguate(codes[order], sort_key=video_ids[order]), suffix[order])
    np.testing.assert_array_equal(disambiguate(codes), [0, 0, 1, 1, 2, 0])  # no key: row order

    rng = np.random.default_rng(1)
    many = rng.integers(0, 3, size=(2000, 2)).astype(np.int32)
    many_suffix = disambiguate(many, sort_key=np.arange(2000)[::-1])
    assert np.unique(np.concatenate([many, many_suffix[:, None]], axis=1), axis=0).shape[0] == 2000
    assert many_suffix.max() + 1 == sid_metrics(many, codebook_size=3)["max_items_per_sid"]
    with pytest.raises(ValueError):
        disambiguate(codes, sort_key=video_ids[:3])


def test_label_agreement_exact_numbers():
    codes = np.array([[0, 0], [0, 1], [1, 0], [1, 0]], dtype=np.int32)
    labels = np.array([[1, 0], [1, 0], [0, 1], [1, 0]], dtype=bool)
    first = label_agreement(codes, labels, prefix_length=1)
    # Same first code: pairs (0,1) agree, (2,3) do not. All 6 pairs: (0,1), (0,3), (1,3) agree.
    assert first["same_prefix_pairs"] == 2 and first["same_prefix_agreement"] == 0.5
    assert first["all_pairs"] == 6 and first["all_pairs_agreement"] == 0.5
    second = label_agreement(codes, labels, prefix_length=2, block_rows=1)
    assert second["same_prefix_pairs"] == 1 and second["same_prefix_agreement"] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Real data: MovieLens-1M items with 384-d content embeddings (only where ../shared holds them).
# ---------------------------------------------------------------------------------------------------------------
def test_movielens_sids_do_not_collapse_and_group_genres():
    if not MOVIELENS_ITEMS.exists():
        pytest.skip(f"MovieLens items not found at {MOVIELENS_ITEMS.resolve()} (../shared/data is not mounted)")
    import pyarrow.parquet as pq

    table = pq.read_table(MOVIELENS_ITEMS, columns=["item_id", "genres", "content_embedding"])
    embeddings = np.stack(table["content_embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    genre_lists = [genres.split("|") for genres in table["genres"].to_pylist()]
    genre_names = sorted({genre for genres in genre_lists for genre in genres})
    genre_matrix = np.array([[name in genres for name in genre_names] for genres in genre_lists], dtype=bool)

    config = RQVAEConfig(input_dim=embeddings.shape[1], levels=3, codebook_size=64, batch_size=256, steps=500,
                         dead_code_reseed_every=100, log_every=100, seed=0)
    model, _ = train_rqvae(embeddings, config)
    codes = model.encode_batched(embeddings)
    metrics = sid_metrics(codes, 64)
    assert metrics["utilisation_per_level"][0] > 0.9, metrics["utilisation_per_level"]
    assert metrics["normalized_entropy_per_level"][0] > 0.85, metrics["normalized_entropy_per_level"]
    agreement = label_agreement(codes, genre_matrix, prefix_length=1)
    assert agreement["same_prefix_agreement"] > agreement["all_pairs_agreement"] + 0.2, agreement
