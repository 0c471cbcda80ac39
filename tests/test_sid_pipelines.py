"""train_sid_model, assign_sids and train_query_tokenizer end to end on generated data (Beam in-process runner)."""
import datetime as dt
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines import assign_sids, train_query_tokenizer, train_sid_model
from tests.helpers import FNAPI, MULTIPROCESS, read_parquet_dir
from tokenminds_model.checkpoints import load_sid_model
from tokenminds_model.query_tokenizer import QueryTokenizer
from transforms import schemas
from transforms.sid_assignment import assign_disambiguation

SMALL_MODEL = ["--levels=3", "--codebook_size=16", "--steps=300", "--batch_size=256", "--latent_dim=16"]


def train(root, output, *extra):
    return train_sid_model.train(train_sid_model.parse_args(
        [f"--videos={root}/out/validated/videos", f"--output={output}", *SMALL_MODEL, *extra]))


def assign(root, model, days, runner=FNAPI):
    return assign_sids.run([f"--start_date={days[0]}", f"--end_date={days[-1]}", f"--sid_model={model}",
                            f"--output_root={root}/out", *runner])


def sids_of(root, day):
    rows = read_parquet_dir(assign_sids.sids_dir(f"{root}/out", dt.date.fromisoformat(day)))
    return {r["video_id"]: (tuple(r["sid"]), r["disambiguation"], r["sid_model_version"]) for r in rows}


@pytest.fixture(scope="module")
def trained(validated_sample, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("model") / "sid_model"
    metrics = train(validated_sample["root"], model_dir, f"--date={validated_sample['dates'][0]}")
    return model_dir, metrics


def test_training_writes_checkpoint_and_metrics(trained):
    model_dir, metrics = trained
    assert json.loads((model_dir / "metrics.json").read_text()) == metrics
    assert metrics["sid_model_version"] == load_sid_model(model_dir).version
    assert set(metrics["items_per_scenario"]) == {"LFV", "SFV"} and min(metrics["items_per_scenario"].values()) > 0
    assert min(metrics["utilisation_per_level"]) > 0.8  # no codebook collapse on the sample catalog
    assert metrics["reconstruction_mse"] is not None


def test_first_level_codes_recover_the_planted_topics(validated_sample, trained, tmp_path):
    model_dir, _ = trained
    root, day = validated_sample["root"], validated_sample["dates"][0]
    truth = pq.read_table(root / "raw/_truth/videos.parquet").to_pylist()
    topic = {r["video_id"]: r["topic"] for r in truth}
    summaries = assign_sids.run([f"--date={day}", f"--sid_model={model_dir}", f"--output_root={tmp_path}/out",
                                 f"--validated_root={root}/out/validated", *FNAPI])
    assert summaries[0]["mode"] == "full"
    sids = sids_of(tmp_path, day)
    by_code = {}
    for video_id, (sid, _, _) in sids.items():
        by_code.setdefault(sid[0], []).append(topic[video_id])
    # Purity: share of videos whose first code's majority topic is their own topic.
    purity = sum(max(np.bincount(t)) for t in by_code.values()) / len(sids)
    chance = max(np.bincount(list(topic.values()))) / len(topic)
    assert purity > 0.8 > 3 * chance, (purity, chance)


def test_assignment_is_incremental_and_never_changes_an_existing_sid(sample_copy, trained):
    model_dir, metrics = trained
    root, days = sample_copy["root"], sample_copy["dates"]
    summaries = assign(root, model_dir, days)
    assert [s["mode"] for s in summaries] == ["full", "incremental", "incremental"]
    first, second, third = (sids_of(root, d) for d in days)
    assert set(first) < set(second) < set(third)
    for earlier, later in ((first, second), (second, third)):
        assert {v: later[v] for v in earlier} == earlier  # SID, disambiguation and version all carried over
    new_on_day_2 = summaries[1]["tables"]["videos"][days[1]]["rows_out"]
    assert new_on_day_2 == len(second) - len(first) > 0
    assert summaries[1]["stats"]["video_sids.carried_over"] == len(first)
    # (full SID, disambiguation) is unique, and matches what the bare model computes.
    assert len({(sid, d) for sid, d, _ in third.values()}) == len(third)
    model = load_sid_model(model_dir)
    videos = read_parquet_dir(schemas.partition_dir(f"{root}/out/validated", schemas.VIDEOS, days[1]))
    direct = model.encode_batched(np.asarray([v["content_embedding"] for v in videos], np.float32))
    assert all(third[v["video_id"]][0] == tuple(s) for v, s in zip(videos, direct.tolist()))
    assert all(s["totals"]["balanced"] for s in summaries)


def test_a_new_model_version_triggers_full_reassignment(sample_copy, trained):
    model_dir, _ = trained
    root, days = sample_copy["root"], sample_copy["dates"]
    assign(root, model_dir, days[:1])
    other_dir = root / "other_model"
    train(root, other_dir, f"--date={days[0]}", "--seed=5")
    [summary] = assign(root, other_dir, days[1:2])
    assert summary["mode"] == "full"
    assert {v[2] for v in sids_of(root, days[1]).values()} == {load_sid_model(other_dir).version}


def test_assign_sids_survives_pickling_to_worker_processes(sample_copy, trained):
    model_dir, _ = trained
    root, days = sample_copy["root"], sample_copy["dates"]
    [summary] = assign(root, model_dir, days[:1], runner=MULTIPROCESS)
    assert summary["totals"]["balanced"] and len(sids_of(root, days[0])) > 0


def test_checkpoint_embedding_width_must_match_the_catalog(validated_sample, trained, tmp_path):
    model_dir, _ = trained
    with pytest.raises(ValueError, match="expects 64-d embeddings, --embedding_dim is 384"):
        assign_sids.run([f"--date={validated_sample['dates'][0]}", f"--sid_model={model_dir}",
                         f"--output_root={tmp_path}", "--embedding_dim=384", *FNAPI])


def test_disambiguation_keeps_existing_codes_and_fills_free_ones_in_id_order():
    assigned, overflow = assign_disambiguation([("v9", 0), ("v5", 2)], ["v3", "v1", "v2"], max_codes=4)
    assert assigned == [("v1", 1), ("v2", 3)] and overflow == ["v3"]
    assert assign_disambiguation([], ["b", "a"], max_codes=64) == ([("a", 0), ("b", 1)], [])


def test_query_tokenizer_pipeline_is_deterministic_and_round_trips(validated_sample, tmp_path):
    root, days = validated_sample["root"], validated_sample["dates"]
    args = [f"--start_date={days[0]}", f"--end_date={days[-1]}", f"--validated_root={root}/out/validated",
            f"--output_root={tmp_path}", "--query_vocab_size=200", *FNAPI]
    first = train_query_tokenizer.run(args + [f"--query_tokenizer={tmp_path}/a"])
    second = train_query_tokenizer.run(args + [f"--query_tokenizer={tmp_path}/b"])
    assert first["version"] == second["version"] and first["num_training_queries"] > 0
    tokenizer = QueryTokenizer.load(str(tmp_path / "a"))
    searches = read_parquet_dir(schemas.partition_dir(f"{root}/out/validated", schemas.SEARCH_EVENTS, days[0]))
    query = searches[0]["query"]
    assert tokenizer.decode(tokenizer.encode(query)) == tokenizer.normalize(query)


def test_catalog_order_does_not_depend_on_row_order_in_the_files(tmp_path):
    """The SID model trains in batches of the catalog's order, so that order must be the video ids', never the
    order validate_inputs happened to write rows in; a republished video keeps its earliest copy."""
    import pyarrow as pa

    def write(name, ids, value):
        table = pa.table({"video_id": ids, "scenario": ["LFV"] * len(ids),
                          "content_embedding": [[float(value)] * 2 for _ in ids]})
        path = str(tmp_path / name)
        pq.write_table(table, path)
        return path

    day1, day2 = ["v3", "v1", "v2"], ["v4", "v1"]
    forward = train_sid_model.read_catalog([write("a1.parquet", day1, 1), write("a2.parquet", day2, 2)])
    shuffled = train_sid_model.read_catalog([write("b1.parquet", day1[::-1], 1), write("b2.parquet", day2[::-1], 2)])
    assert forward.equals(shuffled)
    assert forward["video_id"].to_pylist() == ["v1", "v2", "v3", "v4"]
    assert forward["content_embedding"].to_pylist()[0] == [1.0, 1.0]  # v1's day-1 copy
