"""SID grounding examples: the layout of one example, every row accounted for, and the job end to end (its examples
train a checkpoint that ``train --init_from`` fine-tunes on behaviour examples)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from tokenminds_model.vocabulary import LFV_ID, PAD_ID, SEARCH_ID, SFV_ID, VocabularyLayout
from transforms import grounding, schemas
from transforms.events import SequenceConfig

LAYOUT = VocabularyLayout(sid_levels=3, codebook_size=8, query_vocab_size=20)
CONFIG = SequenceConfig(prefix_len=2, max_tokens=16, max_targets=4, feature_mode="hard")


class Words:
    """A stand-in tokenizer: one piece per word, its id the word's length (0-piece titles for blank words)."""

    def encode_batch(self, titles, max_pieces=None):
        return [[len(w) for w in t.split()][:max_pieces] for t in titles]


def sid(video, scenario, codes):
    return {"video_id": video, "scenario": scenario, "sid": codes}


def item(video, title):
    return {"video_id": video, "item_id": video, "title": title}


def test_an_item_becomes_search_pieces_to_its_condition_and_sid_prefix():
    examples, dead = grounding.grounding_examples(
        [("v1", [sid("v1", "SFV", [3, 5, 7])], [item("v1", "ab cde")])], Words(), LAYOUT, CONFIG, "2026-01-06")
    assert dead == []
    [ex] = examples
    assert ex["user_id"] == "item:v1" and ex["length"] == 3 and ex["num_searches"] == 1 and ex["num_watches"] == 0
    assert ex["tokens"][:3].tolist() == [SEARCH_ID, LAYOUT.query_piece_token(2), LAYOUT.query_piece_token(3)]
    assert (ex["tokens"][3:] == PAD_ID).all() and ex["tokens"].shape == (CONFIG.max_tokens,)
    assert ex["targets"][0].tolist() == [SFV_ID, *LAYOUT.sid_tokens([3, 5, 7], 2)]  # prefix L=2, not the full SID
    assert ex["num_targets"] == 1 and (ex["targets"][1:] == PAD_ID).all()


def test_every_row_ends_in_an_example_or_a_dead_letter_with_its_reason():
    items = [
        ("ok", [sid("ok", "LFV", [1, 2, 3])], [item("ok", "a b")]),
        ("twice", [sid("twice", "LFV", [1, 1, 1])], [item("twice", "zz"), item("twice", "aa")]),
        ("no_sid", [], [item("no_sid", "x")]),
        ("no_title", [sid("no_title", "SFV", [0, 0, 0])], []),
        ("blank", [sid("blank", "SFV", [0, 0, 1])], [item("blank", "  ")]),
    ]
    examples, dead = grounding.grounding_examples(items, Words(), LAYOUT, CONFIG, "2026-01-06")
    assert [e["user_id"] for e in examples] == ["item:ok", "item:twice"]
    assert examples[1]["tokens"][1] == LAYOUT.query_piece_token(2)  # "aa" sorts first: deterministic choice
    reasons = sorted((d["table"], d["reason"]) for d in dead)
    assert reasons == sorted([(grounding.CATALOG, grounding.DUPLICATE), (grounding.CATALOG, grounding.NO_SID),
                              (schemas.VIDEO_SIDS, grounding.NO_TITLE), (schemas.VIDEO_SIDS, grounding.NO_TITLE),
                              (grounding.CATALOG, grounding.NO_TITLE)])
    rows_in = sum(len(s) + len(c) for _, s, c in items)
    assert rows_in == 2 * len(examples) + len(dead)  # an example consumes one SID row and one catalogue row
    lfv_only = SequenceConfig(prefix_len=2, max_tokens=16, max_targets=4, feature_mode="hard", scenarios=("LFV",))
    _, dead = grounding.grounding_examples([("s", [sid("s", "SFV", [1, 1, 1])], [item("s", "a")])], Words(), LAYOUT,
                                           lfv_only, "2026-01-06")
    assert {d["reason"] for d in dead} == {grounding.SCENARIO_NOT_KEPT} and len(dead) == 2


def test_grounding_job_writes_examples_the_trainer_pretrains_and_fine_tunes_from(daily_flow, tmp_path,
                                                                                   translated_jobs):
    import glob

    from pipelines import build_grounding_examples
    from tests.conftest import FLOW_MODEL
    from tests.helpers import FNAPI, MULTIPROCESS, assert_translated, dataflow_args
    from tokenminds_model import train as train_lib
    from tokenminds_model.data import numpy_batches

    root, day = daily_flow["root"], daily_flow["dates"][-2]
    out = tmp_path / "out"
    out.mkdir()
    for name in ("video_sids", "sid_model", "query_tokenizer", "feature_transform"):
        (out / name).symlink_to(f"{root}/out/{name}")
    with pytest.raises(FileNotFoundError, match="no item catalogue"):
        build_grounding_examples.run([f"--date={day}", f"--input_root={tmp_path}/nothing", f"--output_root={out}",
                                      *FNAPI])
    [summary] = build_grounding_examples.run([f"--date={day}", f"--input_root={root}/raw", f"--output_root={out}",
                                              *FNAPI])
    catalog = pq.read_table(f"{root}/raw/{schemas.CATALOG_DIR}/items.parquet")
    sids = pq.read_table(f"{root}/out/video_sids/date={day}")
    assert summary["totals"]["balanced"]
    made = summary["tables"][schemas.VIDEO_SIDS][day]["rows_out"]
    assert summary["tables"][schemas.VIDEO_SIDS][day]["rows_in"] == sids.num_rows
    assert summary["tables"][grounding.CATALOG][day]["rows_in"] == catalog.num_rows
    # Every video with a SID on D has a catalogue title in the sample; later videos' titles are dead "no_sid".
    assert made == sids.num_rows and summary["totals"]["dead_by_reason"] == {
        grounding.NO_SID: catalog.num_rows - sids.num_rows}

    directory = f"{out}/{grounding.GROUNDING_EXAMPLES}/date={day}"
    # A rerun on two worker processes (pickled DoFns) replaces the day with byte-identical shards.
    shards = {p: open(p, "rb").read() for p in sorted(glob.glob(f"{directory}/part-*"))}
    build_grounding_examples.run([f"--date={day}", f"--input_root={root}/raw", f"--output_root={out}", *MULTIPROCESS])
    assert shards and {p: open(p, "rb").read() for p in sorted(glob.glob(f"{directory}/part-*"))} == shards
    assert build_grounding_examples.run([f"--date={day}", f"--input_root={root}/raw", f"--output_root={out}",
                                         *dataflow_args()]) == []
    assert_translated(translated_jobs, 1, "BuildGroundingExamples/JoinByVideo", "WriteTFRecords", "Finish")
    behaviour = f"{root}/out/examples/date={day}"
    for name in ("feature_spec.json", "vocabulary.json"):  # the trainer mixes directories only if these agree
        assert json.load(open(f"{directory}/{name}")) == json.load(open(f"{behaviour}/{name}"))
    batch = next(numpy_batches([directory], batch_size=8, seed=None))
    assert (batch["tokens"][:, 0] == SEARCH_ID).all() and (batch["num_targets"] == 1).all()
    assert np.isin(batch["targets"][:, 0, 0], [LFV_ID, SFV_ID]).all()

    pretrained = train_lib.train([directory], str(tmp_path / "grounded"), steps=3, batch_size=8, progress=False,
                                 tensorboard=False, **FLOW_MODEL)
    tuned = train_lib.train([behaviour], str(tmp_path / "tuned"), str(tmp_path / "grounded"), steps=2,
                            batch_size=8, progress=False, tensorboard=False)
    assert tuned.parent_version == pretrained.version and tuned.step == 5
