"""build_adaptation on a tiny hand-made catalog (every value checked against a direct computation), and the pure
helpers of tokenminds_model.adaptation on hand-computed cases."""
import datetime as dt
import json
import math
import os
import shutil

import numpy as np
import pytest

from pipelines import build_adaptation
from tests.helpers import (FNAPI, MULTIPROCESS, T0, assert_translated, dataflow_args, read_parquet_dir, video,
                           write_partition)
# translated_jobs is a fixture: imported so that pytest finds it here.
from tokenminds_model import adaptation as A
from transforms import adaptation, outputs, schemas

D1, D2, D3 = dt.date(2026, 1, 1), dt.date(2026, 1, 2), dt.date(2026, 1, 3)
DIM, LEVELS, K = 4, 3, 4
SHAPE = [f"--embedding_dim={DIM}", f"--sid_levels={LEVELS}", f"--sid_codebook_size={K}", "--sid_spm_vocab_size=40"]

# video_id -> (scenario, SID, embedding). Embeddings are multiples of 1/8, so float64 sums are exact and the
# pipeline's means must equal NumPy's bit for bit.
GOOD = {
    "a": ("LFV", [0, 1, 2], [1, 0, 0, 0.5]),
    "b": ("LFV", [0, 1, 3], [0, 1, 0, 0.25]),
    "c": ("LFV", [0, 2, 0], [0, 0, 1, -0.5]),
    "d": ("LFV", [1, 1, 2], [0.125, 0.375, 0, 0]),
    "e": ("SFV", [0, 1, 2], [2, 2, 2, 2]),  # a's SID in the other scenario: a separate table entry
    "f": ("SFV", [3, 0, 0], [-1, 0, 0.75, 0]),
    "r": ("SFV", [3, 0, 1], [0.5, 0.5, 0.5, 0.5]),  # republished on D2 with another embedding: D1's copy is used
}


def sid_row(video_id, scenario, sid):
    return {"video_id": video_id, "scenario": scenario, "sid": sid, "disambiguation": 0,
            "sid_model_version": "test-v1", "assigned_date": D1.isoformat()}


def write_catalog(root):
    """validated/videos for D1..D3 and video_sids for D2 under ``root``, with one planted row per failure."""
    def vid(video_id, day, scenario, embedding):
        return video(video_id=video_id, scenario=scenario, content_embedding=embedding,
                     publish_ts=T0 + dt.timedelta(days=(day - D1).days))

    validated = f"{root}/validated"
    good = [vid(v, D1 if v in "abcr" else D2, s, e) for v, (s, _, e) in GOOD.items()]
    write_partition(validated, schemas.VIDEOS, D1, [r for r in good if r["publish_ts"].date() == D1])
    write_partition(validated, schemas.VIDEOS, D2, [r for r in good if r["publish_ts"].date() == D2] + [
        vid("r", D2, "SFV", [8, 8, 8, 8]),  # republished: dropped
        vid("n", D2, "LFV", [1, 1, 1, 1]),  # no SID
        vid("w", D2, "LFV", [1, 1, 1]),  # embedding of the wrong width
        vid("s", D2, "SFV", [1, 1, 1, 1])])  # SID code outside the codebook
    write_partition(validated, schemas.VIDEOS, D3, [vid("z", D3, "LFV", [1, 1, 1, 1])])  # after D: never read
    sids = [sid_row(v, s, sid) for v, (s, sid, _) in GOOD.items()] + [
        sid_row("d", "LFV", [2, 2, 2]),  # a second SID row for d
        sid_row("o", "LFV", [0, 1, 2]),  # no catalog video
        sid_row("w", "LFV", [0, 0, 0]), sid_row("s", "SFV", [0, 9, 0])]
    write_partition(root, schemas.VIDEO_SIDS, D2, sids, schema=schemas.VIDEO_SIDS_SCHEMA)
    for directory in [schemas.partition_dir(validated, schemas.VIDEOS, d) for d in (D1, D2, D3)] + [
            schemas.partition_dir(root, schemas.VIDEO_SIDS, D2)]:
        open(f"{directory}/{outputs.SUCCESS_MARKER}", "w").close()
    os.makedirs(schemas.run_summary_dir(root, schemas.VIDEO_SIDS, D2))
    with open(schemas.run_summary_path(root, schemas.VIDEO_SIDS, D2), "w") as handle:
        json.dump({"sid_model_version": "test-v1"}, handle)


def run_job(root, *extra):
    [summary] = build_adaptation.run([f"--date={D2}", f"--output_root={root}", *SHAPE, *extra])
    return summary


def files_under(directory):
    return sorted(os.path.relpath(os.path.join(d, f), directory) for d, _, fs in os.walk(directory) for f in fs)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("adaptation") / "out"
    write_catalog(root)
    summary = run_job(root, *FNAPI)
    return {"root": root, "summary": summary, "out": build_adaptation.adaptation_dir(str(root), D2),
            "dead": build_adaptation.dead_letter_dir(str(root), D2)}


def expected_prefix_table():
    """Direct NumPy: for every scenario and prefix, the mean embedding of the good videos that have it."""
    expected = {}
    for scenario in ("LFV", "SFV"):
        rows = [(sid, np.array(e, np.float64)) for s, sid, e in GOOD.values() if s == scenario]
        for length in range(1, LEVELS + 1):
            for prefix in {tuple(sid[:length]) for sid, _ in rows}:
                members = [e for sid, e in rows if tuple(sid[:length]) == prefix]
                expected[(scenario, prefix)] = (np.mean(members, axis=0).astype(np.float32), len(members))
    return expected


# ---------------------------------------------------------------------------------------------------------------
# The pipeline.
# ---------------------------------------------------------------------------------------------------------------
def test_prefix_embeddings_match_numpy(built):
    rows = read_parquet_dir(f"{built['out']}/{adaptation.PREFIX_EMBEDDINGS}")
    expected = expected_prefix_table()
    assert len(rows) == len(expected) == 16
    for row in rows:
        mean, count = expected[(row["scenario"], tuple(row["prefix"]))]
        assert row["prefix_len"] == len(row["prefix"]) and row["num_videos"] == count
        assert np.array_equal(np.array(row["embedding"], np.float32), mean), row
    table = A.PrefixEmbeddingTable.from_parquet(f"{built['out']}/{adaptation.PREFIX_EMBEDDINGS}")
    assert table.dim == DIM and table.count("LFV", [0]) == 3 and table.count("SFV", [0, 1, 2]) == 1
    assert np.array_equal(table.embedding("SFV", [3, 0]), np.array([-0.25, 0.25, 0.625, 0.25], np.float32))
    assert table.embedding("LFV", [3]) is None
    assert [f["mode"] for f in schemas.bigquery_schema(adaptation.PREFIX_EMBEDDINGS_SCHEMA)["fields"]][-1] == "REPEATED"
    # The pure function agrees with both.
    pure = A.prefix_means(*zip(*[(s, sid, e) for s, sid, e in GOOD.values()]))
    assert pure.keys() == expected.keys()
    assert all(np.array_equal(pure[k][0], v[0]) and pure[k][1] == v[1] for k, v in expected.items())


def test_every_row_is_accounted_for(built):
    summary = built["summary"]
    assert summary["totals"]["balanced"] and summary["catalog_days_read"] == [D1.isoformat(), D2.isoformat()]
    videos, sids = summary["tables"]["videos"][D2.isoformat()], summary["tables"]["video_sids"][D2.isoformat()]
    assert (videos["rows_in"], videos["rows_out"], videos["rows_dead"], videos["rows_dropped"]) == (11, 7, 3, 1)
    assert videos["dead_by_reason"] == {"bad_embedding": 1, "bad_sid": 1, "video_without_sid": 1}
    assert videos["dropped_by_reason"] == {"republished_video": 1}
    assert (sids["rows_in"], sids["rows_out"], sids["rows_dead"]) == (11, 7, 4)
    assert sids["dead_by_reason"] == {"bad_embedding": 1, "bad_sid": 1, "duplicate_sid": 1, "sid_without_video": 1}
    dead = {(r["table"], json.loads(r["raw_row"])["video_id"], r["reason"]) for r in read_parquet_dir(built["dead"])}
    assert dead == {("videos", "n", "video_without_sid"), ("video_sids", "o", "sid_without_video"),
                    ("videos", "w", "bad_embedding"), ("video_sids", "w", "bad_embedding"),
                    ("videos", "s", "bad_sid"), ("video_sids", "s", "bad_sid"), ("video_sids", "d", "duplicate_sid")}
    assert files_under(built["out"]) == ["_MANIFEST.json", "_SUCCESS", "prefix_embeddings/part-00000-of-00001.parquet",
                                         "sid_ngram_vocab.json", "sid_spm.json", "sid_spm.model", "summary.json"]
    assert summary["stats"] == {"prefix_embeddings.rows": 16}


def test_pipeline_artifacts_equal_direct_builds(built):
    sids = [sid for _, sid, _ in GOOD.values()]
    vocab = A.SidNgramVocab.load(f"{built['out']}/{A.NGRAM_VOCAB_FILENAME}")
    assert vocab == A.SidNgramVocab.build(A.count_ngrams(sids), num_sids=7)
    assert vocab.encode([0, 1, 2]) == [vocab.ids["p:0"], vocab.ids["p:0.1"], vocab.ids["p:0.1.2"]]
    assert vocab.ids["p:0"] == 1  # the most frequent n-gram (4 SIDs start with 0)
    model = A.SidPieceModel.load(built["out"])
    direct = A.train_sid_piece_model(sids, A.SidSymbols(LEVELS, K), 40)
    assert model.serialized_model == direct.serialized_model and model.version == built["summary"]["sid_spm"]["version"]
    assert all(model.decode(model.encode(sid)) == sid for sid in sids)


def test_rerun_with_worker_processes_replaces_the_output(built, tmp_path):
    root = tmp_path / "out"
    shutil.copytree(built["root"], root)
    out, dead = build_adaptation.adaptation_dir(str(root), D2), build_adaptation.dead_letter_dir(str(root), D2)
    for stale in (f"{out}/prefix_embeddings/part-00007-of-00009.parquet", f"{out}/old.json", f"{dead}/x.parquet"):
        open(stale, "w").close()
    summary = run_job(root, "--prefix_embedding_shards=2", *MULTIPROCESS)
    assert files_under(out) == ["_MANIFEST.json", "_SUCCESS", "prefix_embeddings/part-00000-of-00002.parquet",
                                "prefix_embeddings/part-00001-of-00002.parquet", "sid_ngram_vocab.json",
                                "sid_spm.json", "sid_spm.model", "summary.json"]
    assert files_under(dead) == ["_MANIFEST.json", "part-00000-of-00001.parquet"]
    assert summary["totals"] == built["summary"]["totals"]

    def rows(directory):
        return sorted(read_parquet_dir(f"{directory}/{adaptation.PREFIX_EMBEDDINGS}"),
                      key=lambda r: (r["scenario"], r["prefix"]))

    assert rows(out) == rows(built["out"])
    for name in (A.NGRAM_VOCAB_FILENAME, A.SPM_MODEL_FILENAME, A.SPM_METADATA_FILENAME):
        with open(f"{out}/{name}", "rb") as new, open(f"{built['out']}/{name}", "rb") as old:
            assert new.read() == old.read(), name


def test_missing_inputs_fail_before_the_job(tmp_path):
    write_catalog(tmp_path)
    with pytest.raises(FileNotFoundError, match="SID assignment is not complete"):
        build_adaptation.run([f"--date={D1}", f"--output_root={tmp_path}", *SHAPE, *FNAPI])
    with pytest.raises(ValueError, match="cannot map"):  # no symbol for every code
        build_adaptation.run([f"--date={D2}", f"--output_root={tmp_path}", *SHAPE, "--sid_codebook_size=99999",
                              *FNAPI])


def test_job_translates_for_dataflow(built, translated_jobs):
    assert build_adaptation.run([f"--date={D2}", f"--output_root={built['root']}", *SHAPE, *dataflow_args()]) == []
    assert_translated(translated_jobs, 1, "JoinCatalogSids", "PrefixEmbeddings/MeanPerPrefix", "NgramVocab",
                      "SidPieces/TrainAndSave", "WriteSummary")


# ---------------------------------------------------------------------------------------------------------------
# Pooling a user's decoded prefixes.
# ---------------------------------------------------------------------------------------------------------------
LOOKUP = A.PrefixEmbeddingTable.from_rows([
    {"scenario": "LFV", "prefix": [0, 1], "num_videos": 2, "embedding": [1, 0]},
    {"scenario": "LFV", "prefix": [0, 2], "num_videos": 1, "embedding": [0, 2]},
    {"scenario": "LFV", "prefix": [1, 1], "num_videos": 5, "embedding": [4, 4]},
    {"scenario": "SFV", "prefix": [3, 3], "num_videos": 1, "embedding": [9, 9]},  # other scenario: never used
]).for_scenario("LFV")
# Found rows: 0, 1 and 4. Row 2 is a sentinel slot, row 3's prefix is in no LFV video, row 5 has a -1 code.
CODES = [[0, 1], [1, 1], [-1, -1], [3, 3], [0, 2], [0, -1]]
SCORES = [math.log(0.5), math.log(0.25), -math.inf, math.log(0.9), math.log(0.25), math.log(0.8)]


@pytest.mark.parametrize("method, k, expected", [
    ("mean", None, [5 / 3, 2]),
    ("max", None, [4, 4]),
    ("score_weighted", None, [0.5 * 1 + 0.25 * 4, 0.25 * 4 + 0.25 * 2]),  # softmax(log .5, log .25, log .25)
    ("topk_concat", 2, [1, 0, 4, 4]),  # ties: the earlier row first
    ("topk_concat", 4, [1, 0, 4, 4, 0, 2, 0, 0]),
])
def test_pooling(method, k, expected):
    pooled = A.pool_prefix_embeddings(CODES, SCORES, LOOKUP, method, k=k)
    assert pooled.dtype == np.float32
    np.testing.assert_allclose(pooled, expected, rtol=1e-6)


def test_pooling_with_nothing_found_gives_zeros_and_checks_arguments():
    assert A.pool_prefix_embeddings([[-1, -1], [3, 3]], [-math.inf, 0.0], LOOKUP).tolist() == [0, 0]
    assert A.pool_prefix_embeddings([[3, 3]], [0.0], LOOKUP, "topk_concat", k=2).tolist() == [0, 0, 0, 0]
    assert A.pool_prefix_embeddings(np.zeros((0, 2), int), [], {}, "max", dim=3).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="k >= 1"):
        A.pool_prefix_embeddings(CODES, SCORES, LOOKUP, "topk_concat")
    with pytest.raises(ValueError, match="unknown pooling"):
        A.pool_prefix_embeddings(CODES, SCORES, LOOKUP, "sum")
    with pytest.raises(ValueError, match="dim is required"):
        A.pool_prefix_embeddings(CODES, SCORES, {})


def test_sentinel_matches_the_decoder():
    from tokenminds_model.decoding import SENTINEL_CODE

    assert A.SENTINEL_CODE == SENTINEL_CODE


# ---------------------------------------------------------------------------------------------------------------
# n-gram vocabulary.
# ---------------------------------------------------------------------------------------------------------------
def test_ngram_ids_are_deterministic_with_oov():
    assert A.sid_ngram_keys([5, 6, 7]) == ["p:5", "p:5.6", "p:5.6.7"]
    assert A.sid_ngram_keys([5, 6, 7], contiguous=True) == ["p:5", "p:5.6", "p:5.6.7", "c1:6", "c1:6.7", "c2:7"]
    sids = [[0, 1, 2], [0, 1, 3], [1, 1, 2], [0, 2, 2]]
    counts = A.count_ngrams(sids)
    assert counts["p:0"] == 3 and counts["p:0.1"] == 2 and counts["p:1"] == 1
    # By count, then key: "p:0" (3), "p:0.1" (2), then the count-1 keys in string order.
    ids = A.assign_ngram_ids(counts, min_count=1)
    assert list(ids.items())[:4] == [("p:0", 1), ("p:0.1", 2), ("p:0.1.2", 3), ("p:0.1.3", 4)]
    assert A.assign_ngram_ids(dict(reversed(list(counts.items())))) == ids  # input order does not matter
    assert A.assign_ngram_ids(counts, min_count=2) == {"p:0": 1, "p:0.1": 2}
    assert A.assign_ngram_ids(counts, max_ngrams=1) == {"p:0": 1}
    vocab = A.SidNgramVocab.build(counts, num_sids=4, min_count=2)
    assert vocab.size == 3 and vocab.encode([0, 1, 2]) == [1, 2, A.OOV_ID] and vocab.encode([3]) == [A.OOV_ID]
    assert A.SidNgramVocab.from_json(vocab.to_json()) == vocab
    contiguous = A.SidNgramVocab.build(A.count_ngrams(sids, contiguous=True), 4, contiguous=True)
    assert len(contiguous.encode([0, 1, 2])) == 6 and A.OOV_ID not in contiguous.encode([0, 1, 2])


# ---------------------------------------------------------------------------------------------------------------
# SentencePiece over SIDs.
# ---------------------------------------------------------------------------------------------------------------
def catalog_sids(n=400, seed=3):
    rng = np.random.default_rng(seed)  # skewed codes, so some pairs are frequent enough to merge
    return [[int(rng.integers(0, 3)), int(rng.integers(0, 4)), int(rng.integers(0, 16))] for _ in range(n)]


def test_symbols_round_trip_across_private_use_planes():
    symbols = A.SidSymbols(levels=4, codebook_size=20000)  # 80,000 symbols: past the BMP, into planes 15 and 16
    for sid in ([0, 0, 0, 0], [19999, 123, 6399, 19999], [5, 7]):
        text = symbols.to_text(sid)
        assert len(text) == len(sid) and symbols.to_sid(text) == sid
    assert len({symbols.symbol(level, code) for level in range(4) for code in range(0, 20000, 97)}) == 4 * 207
    with pytest.raises(ValueError):
        symbols.to_sid(symbols.symbol(1, 0))  # a level-1 symbol cannot start a SID
    with pytest.raises(ValueError):
        symbols.to_text([20000])


def test_sid_pieces_round_trip_and_are_deterministic():
    symbols, sids = A.SidSymbols(3, 16), catalog_sids()
    model = A.train_sid_piece_model(sids, symbols, 60, seed=1)
    again = A.train_sid_piece_model(list(reversed(sids)), symbols, 60, seed=1)
    assert model.serialized_model == again.serialized_model and model.version == again.version
    assert 3 + 4 + 16 < model.vocab_size <= 60  # every symbol, plus merged pieces
    assert all(model.decode(model.encode(sid)) == sid for sid in sids)
    assert sum(len(model.encode(sid)) for sid in sids) < 3 * len(sids)  # frequent code pairs became one piece
    assert 0 not in model.encode([2, 3, 15]) and model.encode([0, 5, 0]).count(0) == 1  # code 5: never seen
    with pytest.raises(ValueError, match="<unk>"):
        model.decode([0])
    restored = A.SidPieceModel.from_bytes(model.serialized_model, model.metadata_json())
    assert restored.encode([1, 2, 3]) == model.encode([1, 2, 3])
    import pickle

    assert pickle.loads(pickle.dumps(model)).encode([1, 2, 3]) == model.encode([1, 2, 3])


def test_sid_piece_vocab_size_guard():
    symbols, sids = A.SidSymbols(3, 16), catalog_sids()
    with pytest.raises(ValueError, match=r"too small .* at least 24 pieces"):  # 23 symbols in use, plus <unk>
        A.train_sid_piece_model(sids, symbols, 10)
    clamped = A.train_sid_piece_model(sids, symbols, 100_000)  # more than this catalog has: a smaller model
    assert 24 <= clamped.vocab_size < 100_000 and clamped.requested_vocab_size == 100_000
    with pytest.raises(ValueError, match="no SIDs"):
        A.train_sid_piece_model([], symbols, 100)
