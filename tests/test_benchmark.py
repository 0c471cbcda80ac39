"""Benchmark mode: the leave-one-out split, its examples against the training specification, the Beam job, early
stopping, item ranking, and the one-command run on a dataset it has never seen."""
import dataclasses
import datetime as dt
import json
import os

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import FNAPI
from transforms import benchmark_examples as bx


# ---------------------------------------------------------------------------------------------------------------
# The split (plain functions).
# ---------------------------------------------------------------------------------------------------------------
def test_leave_one_out_split_positions():
    every = bx.SplitConfig()
    assert bx.split_targets(2, every, "u") == []  # no validation and test for fewer than 3 watches
    assert bx.split_targets(3, every, "u") == [(bx.VALIDATION, 1), (bx.TEST, 2)]
    assert bx.split_targets(6, every, "u") == [(bx.TRAIN, 1), (bx.TRAIN, 2), (bx.TRAIN, 3), (bx.VALIDATION, 4),
                                               (bx.TEST, 5)]
    # A cap keeps the last training position and a seeded sample of the others: deterministic, seed-dependent.
    capped = bx.SplitConfig(max_train_positions=4, seed=1)
    picked = bx.train_positions(50, capped, "u")
    assert len(picked) == 4 and picked[-1] == 47 and picked == sorted(set(picked)) and min(picked) >= 1
    assert picked == bx.train_positions(50, capped, "u")
    others = {tuple(bx.train_positions(50, dataclasses.replace(capped, seed=s), "u")) for s in range(8)}
    assert len(others) > 1
    # Over many users the sample is spread over all earlier positions, not bunched at the start or the end.
    spread = np.concatenate([bx.train_positions(50, capped, f"user{i}")[:-1] for i in range(400)])
    assert abs(spread.mean() - 23.5) < 1.5 and spread.min() == 1 and spread.max() == 46


# ---------------------------------------------------------------------------------------------------------------
# Examples against the specification, and the Beam job.
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def benchmark_flow(daily_flow, tmp_path_factory):
    """build_benchmark_examples on the daily flow's last snapshot (a private copy of its outputs)."""
    import shutil

    from pipelines import build_benchmark_examples

    root = tmp_path_factory.mktemp("benchmark") / "out"
    shutil.copytree(f"{daily_flow['root']}/out", root)
    last = daily_flow["dates"][-1]
    args = [f"--date={last}", f"--output_root={root}", "--full_depth_sids", "--max_tokens=96",
            "--max_train_positions=5", "--train_targets=3", "--benchmark_shards=2", *FNAPI]
    summary = build_benchmark_examples.run(args)
    return {"root": str(root), "date": last, "summary": summary, "args": args}


def _records(directory):
    from tokenminds_model.evaluate import read_records

    return read_records(directory)


def test_benchmark_examples_follow_the_training_history_rule(benchmark_flow):
    """Every record's history is exactly what a training example cut at its target's time holds (the per-user
    specification, sequences.build_history), its target is that watch's full SID, and per user the test target is
    the last watch and the validation target the one before."""
    from pipelines import build_examples
    from pipelines.build_benchmark_examples import benchmark_dir, split_dir
    from pipelines.update_histories import snapshot_dir
    from tokenminds_model.query_tokenizer import QueryTokenizer
    from tokenminds_model.vocabulary import condition_token
    from transforms import examples, features, sequences

    root = benchmark_flow["root"]
    out = benchmark_dir(root, benchmark_flow["date"])
    snapshot = pq.read_table(snapshot_dir(root, dt.date.fromisoformat(benchmark_flow["date"]))).to_pylist()
    by_user = {row["user_id"]: row for row in snapshot}
    artifacts = (f"{root}/sid_model", f"{root}/query_tokenizer", f"{root}/feature_transform")
    layout = build_examples.vocabulary_layout(*artifacts)
    tokenizer, featurizer = QueryTokenizer.load(artifacts[1]), features.WatchFeaturizer(artifacts[2])
    config = sequences.SequenceConfig(full_depth_sids=True, max_tokens=96)

    summary = benchmark_flow["summary"]
    assert summary["totals"]["balanced"]
    counts = {name: summary["examples"][name]["examples"] for name in bx.SPLITS}
    eligible = [u for u, row in by_user.items() if len(row["watches"]) >= bx.MIN_WATCHES]
    assert counts[bx.TEST] == counts[bx.VALIDATION] == len(eligible) > 0
    assert summary["totals"].get("dropped_by_reason", {}).get(bx.TOO_FEW_WATCHES, 0) == len(by_user) - len(eligible)
    assert counts[bx.TRAIN] == sum(len(bx.train_positions(len(by_user[u]["watches"]), bx.SplitConfig(5), u))
                                   for u in eligible)

    checked = 0
    for name in bx.SPLITS:
        records = _records(split_dir(out, name))
        for i in range(0, len(records["length"]), max(1, len(records["length"]) // 15)):
            user = records["user_id"][i, 0].decode()
            events = examples.prepare_user_events([by_user[user]], tokenizer, featurizer, config)
            watches = events.timeline.watches
            video = records["target_video_id"][i, 0].decode()
            cutoff = int(records["cutoff_ts_us"][i, 0])
            [target] = [w for w in watches if w.event_ts_us == cutoff and w.video_id == video]
            if name == bx.TEST:
                assert target == watches[-1]
            elif name == bx.VALIDATION:
                assert target == watches[-2]
            else:
                assert watches.index(target) < len(watches) - 2
            history = sequences.build_history(events.timeline, cutoff, layout, config, events.featurize)
            assert np.array_equal(records["tokens"][i], history.tokens)
            assert int(records["length"][i, 0]) == history.length
            # Training records target the next K=3 training watches (never the validation or test one).
            position = watches.index(target)
            ahead = watches[position:min(position + 3, len(watches) - 2)] if name == bx.TRAIN else [target]
            assert int(records["num_targets"][i, 0]) == len(ahead)
            for row, watch in enumerate(ahead):
                expected = [condition_token(watch.scenario)] + layout.sid_tokens(np.array(watch.sid), 3).tolist()
                assert records["targets"][i, row].tolist() == expected
            checked += 1
    assert checked >= 30


def test_benchmark_examples_rerun_is_identical_and_sequences_match(benchmark_flow):
    from pipelines import build_benchmark_examples
    from pipelines.build_benchmark_examples import benchmark_dir, split_dir

    out = benchmark_dir(benchmark_flow["root"], benchmark_flow["date"])

    def files():
        found = {}
        for directory, _, names in os.walk(out):
            for name in names:
                with open(os.path.join(directory, name), "rb") as handle:
                    found[os.path.relpath(os.path.join(directory, name), out)] = handle.read()
        return found

    before = files()
    build_benchmark_examples.run(benchmark_flow["args"])
    assert files() == before  # deterministic, and the rerun replaced (not added to) the output
    sequences = pq.read_table(f"{out}/sequences").to_pylist()
    test = _records(split_dir(out, bx.TEST))
    last = {s["user_id"]: s["video_ids"][-1] for s in sequences}
    assert {u[0].decode(): v[0].decode() for u, v in zip(test["user_id"], test["target_video_id"])} == last


# ---------------------------------------------------------------------------------------------------------------
# Early stopping and item ranking.
# ---------------------------------------------------------------------------------------------------------------
def test_early_stopping_keeps_the_best_validated_parameters(daily_flow, tmp_path):
    """A scripted validation metric peaks at the 2nd evaluation: training stops after `patience` worse ones and the
    checkpoint holds exactly the parameters (and step) of a plain run that stopped at that step."""
    from tests.conftest import FLOW_MODEL
    from tokenminds_model import train as train_lib
    from tokenminds_model.model_checkpoints import load_model

    dirs = [f"{daily_flow['root']}/out/examples/date={day}" for day in sorted(daily_flow["stats"])]
    scripted = iter([0.1, 0.5, 0.3, 0.4, 0.2])
    seen = []

    def evaluate(config, params):
        seen.append(params)
        return {"score": next(scripted)}

    common = dict(batch_size=8, learning_rate=3e-3, progress=False, tensorboard=False)
    result = train_lib.train(dirs, str(tmp_path / "early"), steps=50, early_stopping=train_lib.EarlyStopping(
        evaluate, metric="score", every=3, patience=2), **common, **FLOW_MODEL)
    assert result.steps_run == 12 and result.best_step == result.step == 6  # evals at 3, 6, 9, 12; best at 6
    assert [v["step"] for v in result.validation] == [3, 6, 9, 12] and len(seen) == 4
    plain = train_lib.train(dirs, str(tmp_path / "plain"), steps=6, **common, **FLOW_MODEL)
    _, early_params, _ = load_model(str(tmp_path / "early"))
    _, plain_params, _ = load_model(str(tmp_path / "plain"))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(early_params), jax.tree.leaves(seen[1])))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(early_params), jax.tree.leaves(plain_params)))
    assert plain.step == 6


def test_item_ranks_expand_sids_by_popularity():
    from tokenminds_model.item_ranking import items_by_sid, ranks_in_lists

    catalogue = {"sid": np.array([[0, 1, 2], [0, 1, 2], [3, 3, 3]]), "video_id": np.array(["va", "vb", "vc"])}
    assert items_by_sid(catalogue, {"vb": 5, "va": 1}) == {(0, 1, 2): ["vb", "va"], (3, 3, 3): ["vc"]}
    assert items_by_sid(catalogue, {}) == {(0, 1, 2): ["va", "vb"], (3, 3, 3): ["vc"]}  # no counts: by id
    ranks = ranks_in_lists([["vb", "va"], ["vc"], []], ["va", "va", "vc"], miss_rank=20)
    assert ranks.tolist() == [1, 20, 20]


# ---------------------------------------------------------------------------------------------------------------
# One command on a dataset it has never seen.
# ---------------------------------------------------------------------------------------------------------------
def _tiny_dataset(directory, users=40, items=30, seed=0):
    """A MovieLens-format dataset the project never saw: user ids as strings, an item never watched, ties."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        start = int(rng.integers(0, items))
        t = 1_000_000_000 + int(rng.integers(0, 86_400 * 30))
        for k in range(int(rng.integers(4, 12))):
            rows.append((f"user-{u}", (start + k) % items, t))
            t += int(rng.integers(0, 3)) * 3600  # some equal timestamps: the file order decides
    os.makedirs(directory)
    pq.write_table(pa.table({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                             "timestamp": [r[2] for r in rows]}), f"{directory}/interactions.parquet")
    embeddings = rng.normal(size=(items + 1, 8)).astype(np.float32)
    pq.write_table(pa.table({"item_id": list(range(items + 1)),
                             "title": [f"Film number {i} ({1990 + i})" for i in range(items + 1)],
                             "content_embedding": [list(map(float, e)) for e in embeddings]}),
                   f"{directory}/items.parquet")


def test_benchmark_command_runs_end_to_end_on_a_new_dataset(tmp_path):
    from pipelines import benchmark

    _tiny_dataset(tmp_path / "data")
    metrics = benchmark.main([f"--dataset={tmp_path / 'data'}", f"--output={tmp_path / 'run'}", "--max_tokens=64",
                              "--codebook_size=8", "--sid_steps=50", "--train_steps=20", "--eval_every=10",
                              "--batch_size=8", '--model_overrides={"d_model": 32, "mlp_dim": 64}',
                              "--sasrec_steps=20", "--sasrec_eval_every=10", "--sasrec_max_len=16"])
    assert set(metrics["models"]) == {"tokenminds", "sasrec", "most_popular"}
    for entry in metrics["models"].values():
        for k in (5, 10, 20):
            assert 0.0 <= entry[f"ndcg@{k}"] <= entry[f"recall@{k}"] <= 1.0
            low, high = entry["ci95"][f"recall@{k}"]
            assert low <= entry[f"recall@{k}"] <= high
    assert metrics["dataset"]["users"] == 40 and metrics["dataset"]["catalogue"] == 31
    # Implicit feedback: only the time gap varies, every other feature token is gone.
    assert metrics["tokens"]["feature_names"] == ["time_gap"] and metrics["tokens"]["tokens_per_watch"] == 1 + 3 + 1
    assert [v["step"] for v in metrics["models"]["tokenminds"]["validation"]] == [10, 20]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Protocol" in report and "most_popular" in report and (tmp_path / "run" / "metrics.png").exists()
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk["models"]["tokenminds"]["recall@10"] == metrics["models"]["tokenminds"]["recall@10"]
