"""Eval sets (transforms.eval_sets, pipelines.build_eval_sets) and the evaluator (tokenminds_model.evaluate).

Hand-written timelines with exact expectations for the protocol rules; hand-made rankings for the metrics; then the
pipeline and the evaluate CLI end to end on the shared ``daily_flow`` fixture with a model trained a few steps.
"""
import json
import math

import numpy as np
import pytest

from tests.helpers import FNAPI, MULTIPROCESS, assert_translated, dataflow_args
from tokenminds_model import evaluate as ev
from tokenminds_model.vocabulary import LFV_ID, PAD_ID, SFV_ID, VocabularyLayout
from transforms import eval_sets
from transforms import sequences as seq
from transforms import targets as target_lib
from transforms.sequences import SequenceConfig

S = 1_000_000
HOUR = 3600 * S
DAY = 24 * HOUR
D0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
D = D0 + DAY  # the eval day [D, D + DAY)
LAYOUT = VocabularyLayout(sid_levels=3, codebook_size=8, query_vocab_size=20)
CONFIG = SequenceConfig(prefix_len=2, max_targets=4)


def watch(video_id, ts, scenario="LFV", sid=(1, 2, 3), watch_time_s=30.0, liked=False):
    return dict(video_id=video_id, scenario=scenario, event_ts_us=ts, watch_time_s=watch_time_s,
                video_duration_s=60.0, surface="home", device="IOS", liked=liked, disliked=False, sid=list(sid))


def search(ts, query="cats"):
    return dict(event_ts_us=ts, query=query, pieces=[1, 2])


def timeline(watches, searches=(), config=CONFIG):
    return seq.build_timeline(watches, searches, config)


def names(history):
    return [e.video_id if isinstance(e, seq.WatchEvent) else f"q:{e.query}" for e in history.events]


def zero_featurize(watches, gaps):
    return {name: np.zeros(len(watches), np.int64) for name in LAYOUT.feature_names}


# ---------------------------------------------------------------------------------------------------------------
# Protocol rules on hand-written timelines.
# ---------------------------------------------------------------------------------------------------------------
def test_session_target_is_the_final_watch_of_the_day_and_not_in_the_history():
    tl = timeline([watch("old", D - 5 * HOUR), watch("a", D + 9 * HOUR), watch("b", D + 12 * HOUR),
                   watch("final", D + 15 * HOUR, sid=(4, 5, 6)), watch("next_day", D + DAY + 2 * HOUR)],
                  [search(D + 14 * HOUR)])
    case = eval_sets.session_case(tl, D, D + DAY, LAYOUT, CONFIG)
    assert case.target.video_id == "final" and case.cutoff_ts_us == D + 15 * HOUR
    assert names(case.history) == ["old", "a", "b", "q:cats"]
    # Ground-truth future: positive-reward watches of the target's scenario in [cutoff, cutoff + 24 h).
    assert [w.video_id for w in case.future] == ["final", "next_day"]


def test_session_drops_users_without_a_watch_on_the_day_or_without_history():
    assert eval_sets.session_case(timeline([watch("old", D - HOUR)]), D, D + DAY, LAYOUT, CONFIG) == \
        eval_sets.NOT_ACTIVE
    assert eval_sets.session_case(timeline([watch("only", D + HOUR)]), D, D + DAY, LAYOUT, CONFIG) == \
        eval_sets.EMPTY_HISTORY


def test_cold_start_history_is_the_first_events_and_the_target_lies_in_the_window():
    early = [watch(f"h{i}", D0 + i * HOUR) for i in range(8)]
    t = D + 10 * HOUR
    tl = timeline(early + [watch("at_t", t), watch("later", t + 3 * HOUR)], [search(D0 + 30 * 60 * S)])
    case = eval_sets.cold_start_case(tl, D, D + DAY, LAYOUT, CONFIG, seed=0, user_id="u", history_events=3)
    assert case.cutoff_ts_us == t
    assert names(case.history) == ["h0", "q:cats", "h1"]  # the user's first three events, search included
    assert case.target.video_id in {"at_t", "later"}
    # A keyed draw: the same inputs give the same target, as targets.sample_targets would draw it.
    expected = target_lib.sample_targets([w for w in tl.watches if w.event_ts_us >= t], 1, 0, "u", t)[0]
    assert case.target == expected
    assert case == eval_sets.cold_start_case(tl, D, D + DAY, LAYOUT, CONFIG, seed=0, user_id="u", history_events=3)


def test_cold_start_window_excludes_t_plus_24h_and_zero_reward_watches():
    t = D + 10 * HOUR
    history = [watch("h0", D0)]
    skip = watch("skip", t, watch_time_s=1.0)  # ratio 1/60 < min_watch_ratio: reward 0
    boundary = watch("boundary", t + DAY)  # exactly t + 24 h: outside [t, t + 24 h)
    tl = timeline(history + [skip, boundary])
    assert eval_sets.cold_start_case(tl, D, D + DAY, LAYOUT, CONFIG, 0, "u") == eval_sets.NO_COLD_START
    inside = watch("inside", t + DAY - 1)
    case = eval_sets.cold_start_case(timeline(history + [skip, boundary, inside]), D, D + DAY, LAYOUT, CONFIG, 0, "u")
    assert case.target.video_id == "inside"
    assert [w.video_id for w in case.future] == ["inside"]


def test_leave_one_out_split_is_exact():
    tl = timeline([watch("w1", D0), watch("w2", D0 + HOUR), watch("w3", D0 + 2 * HOUR),
                   watch("w4", D + HOUR), watch("tomorrow", D + DAY + HOUR)], [search(D0 + 3 * HOUR)])
    out = eval_sets.leave_one_out_cases(tl, D + DAY, LAYOUT, CONFIG)
    test, validation = out[eval_sets.LEAVE_ONE_OUT], out[eval_sets.LEAVE_ONE_OUT_VALIDATION]
    assert test.target.video_id == "w4" and names(test.history) == ["w1", "w2", "w3", "q:cats"]
    assert validation.target.video_id == "w3" and names(validation.history) == ["w1", "w2"]
    assert test.future == (test.target,)
    one = eval_sets.leave_one_out_cases(timeline([watch("w1", D0)]), D + DAY, LAYOUT, CONFIG)
    assert one == {eval_sets.LEAVE_ONE_OUT: eval_sets.EMPTY_HISTORY,
                   eval_sets.LEAVE_ONE_OUT_VALIDATION: eval_sets.TOO_FEW_WATCHES}


def test_perturbed_timeline_drops_whole_watches_deterministically():
    tl = timeline([watch(f"v{i}", D0 + i * S) for i in range(200)], [search(D0 + 5 * S)])
    dropped = eval_sets.perturbed_timeline(tl, 0, "u", 0.2)
    assert dropped == eval_sets.perturbed_timeline(tl, 0, "u", 0.2)
    assert 20 < 200 - len(dropped.watches) < 60 and len(dropped.searches) == 1
    assert dropped.gaps_s == tuple(seq.time_gaps_s(dropped.events))
    assert eval_sets.perturbed_timeline(tl, 0, "u", 0.0).events == tl.events


def test_eval_record_uses_the_training_history_and_target_encoding():
    tl = timeline([watch("a", D0, sid=(1, 2, 3)), watch("b", D + HOUR, scenario="SFV", sid=(7, 6, 5))])
    case = eval_sets.session_case(tl, D, D + DAY, LAYOUT, CONFIG)
    record = eval_sets.eval_record("u", case, case.history, LAYOUT, CONFIG, zero_featurize, zero_featurize)
    expected = seq.build_history(tl, D + HOUR, LAYOUT, CONFIG, zero_featurize)
    np.testing.assert_array_equal(record["tokens"], expected.tokens)
    assert record["targets"].shape == (4, 3) and record["num_targets"] == 1
    assert record["targets"][0].tolist() == [SFV_ID, LAYOUT.sid_token(0, 7), LAYOUT.sid_token(1, 6)]
    assert (record["targets"][1:] == PAD_ID).all()
    assert record["target_sid"].tolist() == [7, 6, 5] and record["num_future"] == 1
    spec = eval_sets.eval_feature_spec(CONFIG, LAYOUT)
    for name, entry in spec.items():
        assert np.asarray(record[name]).size == int(np.prod(entry["shape"])) or entry["dtype"] == "string"


# ---------------------------------------------------------------------------------------------------------------
# Metrics on hand-made cases.
# ---------------------------------------------------------------------------------------------------------------
def test_recall_and_ndcg_exact():
    rankings = [["a", "b", "c"], ["d", "e"], ["f"], ["x", "y", "z", "t"]]
    targets = ["b", "q", "f", "t"]
    assert ev.recall_at_k(rankings, targets, 1) == pytest.approx(1 / 4)
    assert ev.recall_at_k(rankings, targets, 2) == pytest.approx(2 / 4)
    assert ev.recall_at_k(rankings, targets, 4) == pytest.approx(3 / 4)
    assert ev.ndcg_at_k(rankings, targets, 2) == pytest.approx((1 / math.log2(3) + 1) / 4)
    assert ev.ndcg_at_k(rankings, targets, 10) == pytest.approx((1 / math.log2(3) + 1 + 1 / math.log2(5)) / 4)
    assert math.isnan(ev.recall_at_k([], [], 10))


def test_most_popular_prefixes_per_scenario():
    def row(cond, a, b):
        return [cond, LAYOUT.sid_token(0, a), LAYOUT.sid_token(1, b)]

    rows = np.array([row(LFV_ID, 1, 1), row(LFV_ID, 2, 2), row(LFV_ID, 2, 2), row(LFV_ID, 0, 5),
                     row(SFV_ID, 3, 3)])
    popular = ev.most_popular_prefixes(rows, LAYOUT, prefix_len=2, top_n=2)
    assert popular == {"LFV": [(2, 2), (0, 5)], "SFV": [(3, 3)]}  # ties: the smaller prefix first
    assert ev.most_popular_prefixes(rows, LAYOUT, prefix_len=1)["LFV"] == [(2,), (0,), (1,)]


def test_user_recent_prefixes_from_history_tokens():
    tl = timeline([watch("a", D0, sid=(1, 1, 0)), watch("b", D0 + 1, sid=(2, 2, 0)),
                   watch("s", D0 + 2, scenario="SFV", sid=(5, 5, 0)), watch("c", D0 + 3, sid=(1, 1, 1)),
                   watch("d", D0 + 4, sid=(3, 3, 0))], [search(D0 + 1)])
    history = seq.build_history(tl, D, LAYOUT, CONFIG, zero_featurize)
    watches = ev.history_watch_prefixes(history.tokens, history.length, LAYOUT, history_sid_len=2, prefix_len=2)
    assert watches == [("LFV", (1, 1)), ("LFV", (2, 2)), ("SFV", (5, 5)), ("LFV", (1, 1)), ("LFV", (3, 3))]
    # (1, 1) twice first; then ties by recency: (3, 3) before (2, 2).
    assert ev.user_recent_prefixes(watches, "LFV") == [(1, 1), (3, 3), (2, 2)]
    assert ev.user_recent_prefixes(watches, "LFV", recent_watches=2) == [(3, 3), (1, 1)]
    assert ev.user_recent_prefixes(watches, "SFV", top_n=1) == [(5, 5)]


def test_diversity_exact_on_a_hand_made_case():
    decoded = np.array([[0, 1], [0, 2], [1, 1]])
    truth = np.array([[5, 5]] * 4)  # any 3 of them: one distinct code per position, one distinct prefix
    out = ev.diversity_case(decoded, truth, np.random.default_rng(0))
    assert out["decoded"]["collision_rate_per_position"] == pytest.approx([1 / 3, 1 / 3])
    assert out["decoded"]["prefix_duplication_rate"] == 0.0
    assert out["truth"]["collision_rate_per_position"] == pytest.approx([2 / 3, 2 / 3])
    assert out["truth"]["prefix_duplication_rate"] == pytest.approx(2 / 3)
    assert ev.diversity_case(decoded, truth[:1], np.random.default_rng(0)) is None  # n < 2


def test_stability_against_a_derangement():
    other = ev.derangement(7, seed=3)
    assert sorted(other.tolist()) == list(range(7)) and not (other == np.arange(7)).any()
    embeddings = np.array([[1.0, 0.0], [0.0, 1.0]])
    result = ev.stability(embeddings, embeddings * 2.0, seed=0)
    assert result["mean_cosine_perturbed"] == pytest.approx(1.0)
    assert result["mean_cosine_other"] == pytest.approx(0.0)


def test_expand_to_items_orders_by_decoded_prefix_then_catalogue_order():
    index = {(1,): ["a", "b"], (2,): ["c"], (3,): ["d", "e", "f"]}
    assert ev.expand_to_items([(3,), (9,), (1,)], index, 4) == ["d", "e", "f", "a"]


# ---------------------------------------------------------------------------------------------------------------
# Pipeline + CLI end to end on the daily_flow fixture.
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def evaluated(daily_flow, tmp_path_factory):
    from pipelines import build_eval_sets
    from tokenminds_model import train

    work = tmp_path_factory.mktemp("evaluate")
    out = f"{daily_flow['root']}/out"
    dates = daily_flow["dates"]
    day = dates[1]  # the eval day needs the snapshot of the day after
    [summary] = build_eval_sets.run([f"--date={day}", f"--output_root={out}", f"--eval_output={work}/eval_sets",
                                     *FNAPI])
    train_dirs = [f"{out}/examples/date={dates[0]}"]
    train.train(train_dirs, f"{work}/model", steps=5, batch_size=8, progress=False, tensorboard=False,
                log_every=5, d_model=32, mlp_dim=64, embedding_dim=32, max_tokens=128)
    args = [f"--model={work}/model", f"--eval_sets={work}/eval_sets/date={day}",
            f"--train_examples={','.join(train_dirs)}", f"--video_sids={out}/video_sids/date={day}",
            f"--output={work}/report", "--batch_size=32"]
    code = ev.main(args)
    return {"work": work, "day": day, "summary": summary, "code": code, "args": args, "train_dirs": train_dirs}


def test_build_eval_sets_accounts_for_every_user(evaluated):
    summary = evaluated["summary"]
    assert summary["totals"]["balanced"]
    tables = summary["tables"]
    assert set(tables) == {f"eval_{p}" for p in eval_sets.PROTOCOLS}
    for table, per_date in tables.items():
        entry = per_date[str(evaluated["day"])]
        assert entry["rows_in"] == entry["rows_out"] + entry.get("rows_dropped", 0)
        assert entry["rows_out"] > 0, table


def test_eval_sets_read_back_with_the_training_reader(evaluated):
    from tokenminds_model.data import numpy_batches

    directory = f"{evaluated['work']}/eval_sets/date={evaluated['day']}/session"
    batch = next(numpy_batches([directory], 4, seed=None))
    assert (batch["num_targets"] == 1).all()
    assert set(np.unique(batch["targets"][:, 0, 0])) <= {LFV_ID, SFV_ID}
    assert (batch["targets"][:, 1:] == PAD_ID).all()
    assert (batch["target_disambiguation"] >= 0).all()  # every target joined its video_sids row
    # The target's SID tokens are its full SID's first L codes.
    layout = VocabularyLayout.load_manifest(f"{directory}/vocabulary.json")
    np.testing.assert_array_equal(layout.sid_codes(batch["targets"][:, 0, 1:]), batch["target_sid"][:, :2])


def test_evaluate_cli_writes_metrics_and_report(evaluated):
    assert evaluated["code"] == 0
    report = evaluated["work"] / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics["protocols"]) == set(ev.PROTOCOLS)
    session = metrics["protocols"]["session"]
    assert session["cases"] == sum(c["cases"] for c in session["scenarios"].values()) > 0
    for cell in session["scenarios"].values():
        if cell["cases"]:
            assert set(cell["recall@10"]) == set(ev.METHODS)
            assert all(0.0 <= v <= 1.0 for v in cell["recall@10"].values())
    assert -1.0 <= session["stability"]["mean_cosine_perturbed"] <= 1.0
    items = metrics["protocols"]["leave_one_out"]["items"]
    assert items["depth"] == 2 and "prefix-2" in items["note"]
    text = (report / "report.md").read_text()
    assert "Recall@10" in text and "Leave-one-out" in text
    assert (report / "recall_at_10.png").stat().st_size > 0 and (report / "stability_cosines.png").exists()


def test_evaluate_cli_exit_code_2_on_bad_inputs(evaluated, tmp_path, capsys):
    args = dict(a.split("=", 1) for a in evaluated["args"])
    bad_model = {**args, "--model": str(tmp_path / "missing")}
    assert ev.main([f"{k}={v}" for k, v in bad_model.items()]) == 2
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model_config.json").write_text("{not json")
    assert ev.main([f"{k}={v}" for k, v in {**args, "--model": str(corrupt)}.items()]) == 2
    assert ev.main([f"{k}={v}" for k, v in {**args, "--eval_sets": str(tmp_path / "none")}.items()]) == 2
    assert "error:" in capsys.readouterr().err


def test_read_catalogue_with_a_scenario_without_videos(tmp_path):
    """MovieLens has long-form videos only: an empty SFV catalogue must not break the evaluator."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"video_id": ["b", "a", "c"], "scenario": ["LFV"] * 3,
                             "sid": [[1, 2, 0], [1, 2, 0], [0, 5, 5]], "disambiguation": [1, 0, 0]}),
                   tmp_path / "part-00000-of-00001.parquet")
    (tmp_path / "_SUCCESS").write_text("")
    catalogue = ev.read_catalogue(str(tmp_path))
    assert catalogue["SFV"]["sid"].shape == (0, 0)
    assert catalogue["LFV"]["video_id"].tolist() == ["c", "a", "b"]  # by (SID, disambiguation)
    assert ev.items_by_prefix(catalogue["LFV"], 2) == {(0, 5): ["c"], (1, 2): ["a", "b"]}
    assert set(ev.constraints_for(catalogue, 2, LAYOUT)) == {"LFV"}


def test_build_eval_sets_translates_for_dataflow_and_runs_with_worker_processes(evaluated, daily_flow, tmp_path,
                                                                               translated_jobs):
    from pipelines import build_eval_sets

    out, day = f"{daily_flow['root']}/out", evaluated["day"]
    build_eval_sets.run([f"--date={day}", f"--output_root={out}", f"--eval_output={tmp_path}/dry", *dataflow_args()])
    assert_translated(translated_jobs, 1, "WriteSummary")
    [summary] = build_eval_sets.run([f"--date={day}", f"--output_root={out}", f"--eval_output={tmp_path}/multi",
                                     *MULTIPROCESS])
    assert summary["totals"] == evaluated["summary"]["totals"]



def test_evaluate_reads_and_writes_gcs_paths_through_epath(tmp_path, monkeypatch):
    """gs:// works as in every other job: the catalogue is listed and read, and the report written, through etils
    epath (here its gs:// backend is a mock over a local folder), never through glob, os.path or the builtin open."""
    import ast
    import inspect

    import pyarrow as pa
    import pyarrow.parquet as pq
    from etils.epath import gpath, testing

    bucket = tmp_path / "bucket"
    seen = []

    def local(path):
        seen.append(str(path))
        return str(path).replace("gs://bucket", str(bucket), 1)

    def remote(path):
        return str(path).replace(str(bucket), "gs://bucket", 1)

    def mapped(original, path, *args, **kwargs):
        return original(local(path), *args, **kwargs)

    def listing(original, path):
        return [remote(p) for p in original(local(path))]

    sids = bucket / "out" / "video_sids" / "date=2026-01-02"
    sids.mkdir(parents=True)
    pq.write_table(pa.table({"video_id": ["b", "a"], "scenario": ["LFV", "LFV"], "sid": [[1, 2, 0], [0, 5, 5]],
                             "disambiguation": [0, 0]}), sids / "part-00000-of-00001.parquet")
    (sids / "_SUCCESS").write_text("")
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # gs:// through epath's own backend table
    with testing.mock_epath(open=mapped, exists=mapped, isdir=mapped, mkdir=mapped, makedirs=mapped, glob=listing,
                            listdir=mapped, stat=mapped):
        catalogue = ev.read_catalogue("gs://bucket/out/video_sids/date=2026-01-02")
        metrics = {"model": {"checkpoint": "gs://bucket/model", "sid_length": 2, "sid_levels": 3},
                   "eval_sets": "gs://bucket/out/eval_sets/date=2026-01-02", "prefix_len": 2, "top_n": 10,
                   "beam_size": 20, "constrained": True, "protocols": {}}
        cosines = {"session": {"perturbed": np.array([0.9, 1.0]), "other": np.array([0.1, 0.2])}}
        ev.write_report(metrics, cosines, "gs://bucket/report")
        with pytest.raises(ev.EvaluationError, match="incomplete or missing"):
            ev.read_catalogue("gs://bucket/out/video_sids/date=2026-01-03")
    assert catalogue["LFV"]["video_id"].tolist() == ["a", "b"]
    assert json.loads((bucket / "report" / "metrics.json").read_text())["prefix_len"] == 2
    assert (bucket / "report" / "report.md").read_text().startswith("# Evaluation of gs://bucket/model")
    assert (bucket / "report" / "stability_cosines.png").read_bytes()[:4] == b"\x89PNG"
    assert any(p.startswith("gs://bucket/out/video_sids") for p in seen)
    # And nothing in the module reaches a path through glob, os.path or the builtin open.
    tree = ast.parse(inspect.getsource(ev))
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    attributes = {f"{n.value.id}.{n.attr}" for n in ast.walk(tree)
                  if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
    assert not {"glob", "os", "open"} & names and not {a for a in attributes if a.startswith(("os.", "glob."))}
