"""Collapse diagnostics: exact values on hand-made collapsed and personalised tokens and embeddings, and the CLI on a
tiny refresh_users partition written with the project's schema."""
from __future__ import annotations

import datetime as dt
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokenminds_model import diagnostics
from transforms import schemas

UTC = dt.timezone.utc


def test_fully_collapsed_tokens():
    d = diagnostics.token_diversity([["a", "b", "c"]] * 3)
    assert d == {"users": 3, "distinct_tokens": 3, "distinct_per_rank": [1, 1, 1], "top_token_share": 1.0,
                 "shared_by_all": 3, "rank0_top_share": 1.0, "mean_jaccard": 1.0}


def test_fully_personalised_tokens():
    d = diagnostics.token_diversity([[f"{u}0", f"{u}1"] for u in "abcd"])
    assert d == {"users": 4, "distinct_tokens": 8, "distinct_per_rank": [4, 4], "top_token_share": 0.25,
                 "shared_by_all": 0, "rank0_top_share": 0.25, "mean_jaccard": 0.0}


def test_partial_overlap_and_ragged_ranks():
    d = diagnostics.token_diversity([["a", "b"], ["a", "c"], ["d"]])
    assert d["distinct_tokens"] == 4 and d["distinct_per_rank"] == [2, 2]
    assert d["top_token_share"] == pytest.approx(2 / 3) and d["rank0_top_share"] == pytest.approx(2 / 3)
    assert d["shared_by_all"] == 0
    # Pairs: {a,b}-{a,c} = 1/3, {a,b}-{d} = 0, {a,c}-{d} = 0.
    assert d["mean_jaccard"] == pytest.approx(1 / 9)


def test_sampled_pairs_are_distinct_users_and_seeded():
    i, j = diagnostics.user_pairs(100, pairs=50, seed=3)
    assert len(i) == 50 and np.all(i != j)
    i2, j2 = diagnostics.user_pairs(100, pairs=50, seed=3)
    assert np.array_equal(i, i2) and np.array_equal(j, j2)
    i, j = diagnostics.user_pairs(4, pairs=50)  # 6 pairs <= 50: every pair, once
    assert sorted(zip(i.tolist(), j.tolist())) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert diagnostics.token_diversity([[f"t{u}"] for u in range(100)], pairs=50)["mean_jaccard"] == 0.0


def test_identical_embeddings_have_pairwise_cosine_one():
    e = diagnostics.embedding_spread(np.array([[1.0, 2.0, 3.0]] * 5) * np.arange(1, 6)[:, None])
    assert e["mean_pairwise_cosine"] == pytest.approx(1.0)
    assert e["mean_self_cosine_perturbed"] is None and e["separation"] is None


def test_orthogonal_embeddings_and_perturbed_separation():
    eye = np.eye(4, dtype=np.float32)
    e = diagnostics.embedding_spread(eye)
    assert e["mean_pairwise_cosine"] == pytest.approx(0.0)
    near = eye + 0.01 * np.random.default_rng(0).standard_normal(eye.shape)
    e = diagnostics.embedding_spread(eye, near)
    assert e["mean_self_cosine_perturbed"] > 0.99 and e["separation"] > 0.99
    swapped = diagnostics.embedding_spread(eye, eye[[1, 0, 3, 2]])  # each "perturbed" row is another user
    assert swapped["mean_self_cosine_perturbed"] == pytest.approx(0.0) and swapped["separation"] == pytest.approx(0.0)
    with pytest.raises(ValueError):
        diagnostics.embedding_spread(eye, eye[:3])


def test_verdict():
    collapsed = diagnostics.collapse_report({"LFV": [["a", "b"]] * 4}, np.ones((4, 3)))
    assert collapsed["personalised"] == {"LFV": False} and collapsed["embeddings_close"] is True
    text = diagnostics.format_report(collapsed)
    assert "NOT personalised" in text and "perturbed: not computed" in text
    assert "distinct rank-0 tokens: 1 of 4 users" in text
    distinct = diagnostics.collapse_report({"LFV": [[f"{u}0", f"{u}1"] for u in "abcd"]}, np.eye(4))
    assert distinct["personalised"] == {"LFV": True} and distinct["embeddings_close"] is False
    assert "NOT" not in diagnostics.format_report(distinct)
    # Distinct best tokens, low overlap, but one token every one of 100 users holds: collapsed.
    common = diagnostics.collapse_report({"SFV": [[f"u{u}", "common"] for u in range(100)]}, np.eye(100))
    assert common["scenarios"]["SFV"]["shared_by_all"] == 1 and common["personalised"] == {"SFV": False}
    assert common["collapse_reasons"] == {"SFV": ["1 token(s) held by every user"]}
    assert collapsed["collapse_reasons"]["LFV"] == ["100% of users share one rank-0 token",
                                                    "two users' token sets overlap by 100% (Jaccard)"]
    assert distinct["collapse_reasons"] == {"LFV": []}


def write_partition(directory, users, success=True):
    """A refresh_users partition: one row per (user_id, embedding, {scenario: tokens best first})."""
    os.makedirs(directory, exist_ok=True)
    now = dt.datetime(2026, 1, 9, tzinfo=UTC)
    rows = [{"user_id": user, "snapshot_date": "2026-01-08", "embedding": embedding,
             # Stored out of rank order: the reader must sort by rank.
             "user_tokens": [{"scenario": s, "rank": r, "sid": [r], "score": -float(r), "token": t}
                             for s, ts in tokens.items() for r, t in reversed(list(enumerate(ts)))],
             "model_version": "m", "vocabulary_version": "v", "sid_model_version": "s", "generated_at": now,
             "expires_at": now + dt.timedelta(hours=24), "carried_over_from": None}
            for user, embedding, tokens in users]
    pq.write_table(pa.Table.from_pylist(rows, schema=schemas.USER_REPRESENTATIONS_SCHEMA),
                   os.path.join(directory, "part-00000-of-00001.parquet"))
    if success:
        open(os.path.join(directory, "_SUCCESS"), "w").close()


def test_cli_on_refresh_users_output(tmp_path, capsys):
    root = str(tmp_path / "out")
    users = [("u2", [0.0, 1.0], {"LFV": ["x", "y"], "SFV": ["s"]}),
             ("u1", [1.0, 0.0], {"LFV": ["x", "z"]})]
    write_partition(diagnostics.representations_dir(root, "2026-01-08"), users)
    ids, tokens, embeddings = diagnostics.read_representations(diagnostics.representations_dir(root, "2026-01-08"))
    assert ids == ["u1", "u2"] and tokens == {"LFV": [["x", "z"], ["x", "y"]], "SFV": [[], ["s"]]}
    assert embeddings.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    # Perturbed: the same users (other order), each close to itself.
    perturbed = str(tmp_path / "perturbed")
    write_partition(perturbed, [("u1", [1.0, 0.1], {}), ("u2", [0.1, 1.0], {})])
    output = str(tmp_path / "report" / "diagnostics.json")
    assert diagnostics.main([f"--output_root={root}", "--date=2026-01-08", f"--perturbed_representations={perturbed}",
                             f"--output={output}"]) == 0
    printed = capsys.readouterr().out
    assert "collapse diagnostics over 2 users" in printed and "LFV: distinct rank-0 tokens: 1 of 2 users" in printed
    with open(output) as f:
        report = json.load(f)
    assert report["date"] == "2026-01-08" and report["scenarios"]["LFV"]["mean_jaccard"] == pytest.approx(1 / 3)
    assert report["scenarios"]["LFV"]["shared_by_all"] == 1 and report["scenarios"]["SFV"]["distinct_tokens"] == 1
    assert report["embedding"]["mean_pairwise_cosine"] == pytest.approx(0.0)
    assert report["embedding"]["separation"] == pytest.approx(1 / np.sqrt(1.01))
    # Without perturbed embeddings nothing is made up.
    diagnostics.main([f"--output_root={root}", "--date=2026-01-08"])
    assert "perturbed: not computed" in capsys.readouterr().out


def test_incomplete_partition_is_refused(tmp_path):
    directory = str(tmp_path / "partial")
    write_partition(directory, [("u1", [1.0], {"LFV": ["x"]})], success=False)
    with pytest.raises(FileNotFoundError):
        diagnostics.read_representations(directory)
