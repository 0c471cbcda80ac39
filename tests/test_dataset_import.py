"""Importing a real dataset (MovieLens format) as input tables: mapping, types, order, dates, drops, manifest.

Small hand-made datasets written to tmp_path cover each rule; two tests run on the real MovieLens files in
``../shared/data`` and are skipped where that directory is absent.
"""
from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_sources import dataset_import as di
from data_sources.dataset_import import DatasetFormatError, ImportConfig, import_dataset, write_imported_dataset
from pipelines import import_dataset as import_cli
from transforms import schemas
from transforms.validation import validate_row

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DIM = 4
UTC = dt.timezone.utc


def _unix(*args) -> int:
    return int(dt.datetime(*args, tzinfo=UTC).timestamp())


def _write(path: Path, rows, schema: pa.Schema) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), str(path))


def _items(directory: Path, ids, id_column: str = "item_id", dim: int = DIM, drop: str = None) -> None:
    fields = [pa.field(id_column, pa.int64()), pa.field("title", pa.string()), pa.field("genres", pa.string()),
              pa.field("content_embedding", pa.list_(pa.float32(), dim))]
    rows = [{id_column: i, "title": f"Movie {i} (2000)", "genres": "Drama|Comedy",
             "content_embedding": [float(i) + k / 10 for k in range(dim)]} for i in ids]
    schema = pa.schema([f for f in fields if f.name != drop])
    _write(directory / "items.parquet", [{k: v for k, v in r.items() if k != drop} for r in rows], schema)


def _ratings(directory: Path, rows) -> None:
    """MovieLens-latest-small naming: ratings.parquet with userId, movieId, rating, timestamp."""
    schema = pa.schema([("userId", pa.int64()), ("movieId", pa.int64()), ("rating", pa.float64()),
                        ("timestamp", pa.int64())])
    _write(directory / "ratings.parquet",
           [dict(zip(("userId", "movieId", "rating", "timestamp"), r)) for r in rows], schema)


def _interactions(directory: Path, rows, drop: str = None) -> None:
    """MovieLens-1M naming: interactions.parquet with user_id, item_id, timestamp (no ratings)."""
    names = [n for n in ("user_id", "item_id", "timestamp") if n != drop]
    schema = pa.schema([(n, pa.int64()) for n in names])
    _write(directory / "interactions.parquet",
           [{n: v for n, v in zip(("user_id", "item_id", "timestamp"), r) if n != drop} for r in rows], schema)


def _tags(directory: Path, rows) -> None:
    schema = pa.schema([("userId", pa.int64()), ("movieId", pa.int64()), ("tag", pa.string()),
                        ("timestamp", pa.int64())])
    _write(directory / "tags.parquet", [dict(zip(("userId", "movieId", "tag", "timestamp"), r)) for r in rows], schema)


def _read_partition(root, table: str, date: str) -> pa.Table:
    return pq.read_table(os.path.join(schemas.partition_dir(str(root), table, date), di.PART_FILE))


def _all_rows(root, table: str, dates) -> list:
    return [row for date in dates for row in _read_partition(root, table, date).to_pylist()]


def _import(tmp_path: Path, dataset: Path, name: str = "out", **config) -> tuple:
    root = tmp_path / name
    manifest = write_imported_dataset(import_dataset(ImportConfig(dataset=str(dataset), **config)), str(root))
    return root, manifest


# ---------------------------------------------------------------------------------------------------------------
# The mapping.
# ---------------------------------------------------------------------------------------------------------------
RATINGS = [  # (user, movie, rating, timestamp): one user, one day, a rating per row
    (1, 10, 5.0, _unix(2001, 3, 4, 10, 0, 0)),
    (1, 11, 4.5, _unix(2001, 3, 4, 10, 0, 1)),
    (1, 12, 4.0, _unix(2001, 3, 4, 10, 0, 2)),
    (1, 13, 2.0, _unix(2001, 3, 4, 10, 0, 3)),
    (1, 14, 1.5, _unix(2001, 3, 4, 10, 0, 4)),
    (1, 15, 0.5, _unix(2001, 3, 4, 10, 0, 5)),
]


def test_ratings_map_to_watches_with_exact_contract_types(tmp_path):
    _ratings(tmp_path / "src", RATINGS)
    _items(tmp_path / "src", range(10, 16), id_column="movieId")
    root, manifest = _import(tmp_path, tmp_path / "src")

    assert manifest["dates"] == ["2001-03-04"] and manifest["embedding_dim"] == DIM
    for table in schemas.INPUT_TABLES:
        written = pq.read_schema(os.path.join(schemas.partition_dir(str(root), table, "2001-03-04"), di.PART_FILE))
        assert written.equals(schemas.input_schema(table), check_metadata=False), table
    watches = _read_partition(root, schemas.WATCH_EVENTS, "2001-03-04").to_pylist()
    assert [w["video_id"] for w in watches] == ["v10", "v11", "v12", "v13", "v14", "v15"]
    assert {w["user_id"] for w in watches} == {"u1"}
    assert watches[0]["event_ts"] == dt.datetime(2001, 3, 4, 10, 0, 0, tzinfo=UTC)
    assert {(w["scenario"], w["surface"], w["device"], w["video_duration_s"]) for w in watches} == {
        ("LFV", "home", "WEB", di.VIDEO_DURATION_S)}
    assert [w["watch_time_s"] / w["video_duration_s"] for w in watches] == pytest.approx(
        [1.0, 0.9, 0.8, 0.4, 0.3, 0.1])
    assert [w["liked"] for w in watches] == [True, True, False, False, False, False]
    assert [w["disliked"] for w in watches] == [False, False, False, False, True, True]
    assert manifest["mapping"]["has_ratings"] is True
    # Every written row passes the pipelines' own validation of the contract.
    for table in schemas.INPUT_TABLES:
        for row in _read_partition(root, table, "2001-03-04").to_pylist():
            clean, rejection = validate_row(table, row, dt.date(2001, 3, 4), embedding_dim=DIM)
            assert rejection is None, (table, row, rejection)


def test_implicit_feedback_gets_the_default_ratio_and_no_likes(tmp_path):
    _interactions(tmp_path / "src", [(1, 10, _unix(2001, 3, 4, 12))])
    _items(tmp_path / "src", [10])
    root, manifest = _import(tmp_path, tmp_path / "src")
    [watch] = _read_partition(root, schemas.WATCH_EVENTS, "2001-03-04").to_pylist()
    assert watch["watch_time_s"] == pytest.approx(di.DEFAULT_WATCH_RATIO * di.VIDEO_DURATION_S)
    assert (watch["liked"], watch["disliked"]) == (False, False)
    assert manifest["mapping"]["has_ratings"] is False


def test_ratings_outside_the_scale_are_rejected(tmp_path):
    _ratings(tmp_path / "src", [(1, 10, 8.0, _unix(2001, 3, 4))])
    _items(tmp_path / "src", [10], id_column="movieId")
    with pytest.raises(DatasetFormatError, match=r"ratings\.parquet.*'rating'.*outside"):
        import_dataset(ImportConfig(dataset=str(tmp_path / "src")))


@pytest.mark.parametrize("file, column", [("interactions", "timestamp"), ("interactions", "item_id"),
                                          ("items", "content_embedding"), ("items", "title")])
def test_missing_required_column_names_file_and_column(tmp_path, file, column):
    src = tmp_path / "src"
    _interactions(src, [(1, 10, _unix(2001, 3, 4))], drop=column if file == "interactions" else None)
    _items(src, [10], drop=column if file == "items" else None)
    with pytest.raises(DatasetFormatError) as err:
        import_dataset(ImportConfig(dataset=str(src)))
    assert f"{file}.parquet" in str(err.value) and repr(column) in str(err.value)


def test_missing_files_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetFormatError, match="interactions.parquet"):
        import_dataset(ImportConfig(dataset=str(tmp_path / "empty")))
    _interactions(tmp_path / "noitems", [(1, 10, _unix(2001, 3, 4))])
    with pytest.raises(DatasetFormatError, match="items.parquet"):
        import_dataset(ImportConfig(dataset=str(tmp_path / "noitems")))


# ---------------------------------------------------------------------------------------------------------------
# Order, duplicates, unknown items, videos.
# ---------------------------------------------------------------------------------------------------------------
def test_rows_are_ordered_by_id_strings_then_time_and_duplicates_and_unknown_items_are_dropped(tmp_path):
    t = _unix(2001, 3, 4, 8)
    _interactions(tmp_path / "src", [
        (2, 4, t), (2, 30, t), (10, 5, t + 60), (10, 5, t),  # same second: source order, v4 then v30
        (2, 4, t),  # exact duplicate of the first row
        (2, 99, t),  # item 99 is not in items.parquet
    ])
    _items(tmp_path / "src", [4, 5, 30, 77])  # 77 is never watched
    root, manifest = _import(tmp_path, tmp_path / "src")

    watches = _read_partition(root, schemas.WATCH_EVENTS, "2001-03-04").to_pylist()
    # "u10" sorts before "u2": the same string order the pipelines compare ids in.
    assert [(w["user_id"], w["video_id"], w["event_ts"].minute, w["event_ts"].microsecond) for w in watches] == [
        ("u10", "v5", 0, 0), ("u10", "v5", 1, 0), ("u2", "v4", 0, 0), ("u2", "v30", 0, 1)]  # ties: +1 µs, source order
    assert manifest["dropped"]["interactions_duplicate"] == 1
    assert manifest["dropped"]["interactions_unknown_item"] == 1
    assert manifest["totals"] == {schemas.VIDEOS: 4, schemas.WATCH_EVENTS: 4, schemas.SEARCH_EVENTS: 0}
    videos = _read_partition(root, schemas.VIDEOS, "2001-03-04").to_pylist()
    assert [v["video_id"] for v in videos] == ["v30", "v4", "v5", "v77"]  # the never-watched one too
    assert videos[0]["content_embedding"] == pytest.approx([30.0, 30.1, 30.2, 30.3])
    assert {v["publish_ts"] for v in videos} == {dt.datetime(2001, 3, 4, tzinfo=UTC)}
    catalog = pq.read_table(os.path.join(root, schemas.CATALOG_DIR, "items.parquet")).to_pylist()
    assert catalog[0] == {"video_id": "v30", "item_id": "30", "title": "Movie 30 (2000)", "genres": "Drama|Comedy"}


def test_videos_are_published_on_the_day_of_their_first_watch(tmp_path):
    _interactions(tmp_path / "src", [(1, 10, _unix(2001, 3, 1, 9)), (1, 11, _unix(2001, 3, 3, 18)),
                                     (2, 11, _unix(2001, 3, 2, 7)), (2, 10, _unix(2001, 3, 3, 1))])
    _items(tmp_path / "src", [10, 11, 12])
    root, manifest = _import(tmp_path, tmp_path / "src")
    published = {v["video_id"]: v["publish_ts"] for v in _all_rows(root, schemas.VIDEOS, manifest["dates"])}
    assert published == {"v10": dt.datetime(2001, 3, 1, tzinfo=UTC), "v11": dt.datetime(2001, 3, 2, tzinfo=UTC),
                         "v12": dt.datetime(2001, 3, 1, tzinfo=UTC)}  # never watched: in the first day's catalog
    for watch in _all_rows(root, schemas.WATCH_EVENTS, manifest["dates"]):
        assert published[watch["video_id"]] <= watch["event_ts"]


# ---------------------------------------------------------------------------------------------------------------
# Dates: UTC day boundaries, empty days, windows.
# ---------------------------------------------------------------------------------------------------------------
def test_partitions_follow_utc_days_and_empty_days_get_empty_partitions(tmp_path):
    _interactions(tmp_path / "src", [(1, 10, _unix(2001, 3, 1, 23, 59, 59)), (1, 11, _unix(2001, 3, 2)),
                                     (1, 10, _unix(2001, 3, 5, 12))])  # nothing on the 3rd and 4th
    _items(tmp_path / "src", [10, 11])
    root, manifest = _import(tmp_path, tmp_path / "src")

    assert manifest["dates"] == ["2001-03-01", "2001-03-02", "2001-03-03", "2001-03-04", "2001-03-05"]
    assert (manifest["first_date"], manifest["last_date"]) == ("2001-03-01", "2001-03-05")
    assert manifest["row_counts"][schemas.WATCH_EVENTS] == {
        "2001-03-01": 1, "2001-03-02": 1, "2001-03-03": 0, "2001-03-04": 0, "2001-03-05": 1}
    for table in schemas.INPUT_TABLES:
        for date in manifest["dates"]:
            part = _read_partition(root, table, date)  # every day has a file, empty or not
            assert part.num_rows == manifest["row_counts"][table][date]
            # ... and then its landing marker, what the daily DAG's first sensor waits for.
            assert sorted(os.listdir(schemas.partition_dir(str(root), table, date))) == ["_SUCCESS", di.PART_FILE]
            for row in part.to_pylist():
                assert row[schemas.PARTITION_COLUMN[table]].date().isoformat() == date
    assert [d["date"] for d in manifest["densest_dates"]] == ["2001-03-01", "2001-03-02", "2001-03-05"]
    assert manifest["dates_with_watches"] == 3


def test_date_window_limits_the_import_and_counts_what_is_outside(tmp_path):
    _interactions(tmp_path / "src", [(1, 10, _unix(2001, 3, d, 12)) for d in range(1, 11)]
                  + [(1, 11, _unix(1999, 12, 31, 23))])  # before the contract's plausible range
    _items(tmp_path / "src", [10, 11])
    root, manifest = _import(tmp_path, tmp_path / "src", start_date="2001-03-04", end_date="2001-03-06")
    assert manifest["dates"] == ["2001-03-04", "2001-03-05", "2001-03-06"]
    assert manifest["totals"][schemas.WATCH_EVENTS] == 3
    assert manifest["dropped"]["interactions_outside_window"] == 7
    assert manifest["dropped"]["interactions_outside_contract_range"] == 1
    # Videos first watched before the window are in its first day's catalog.
    assert manifest["row_counts"][schemas.VIDEOS]["2001-03-04"] == 2

    _, last = _import(tmp_path, tmp_path / "src", name="last", last_days=2)
    assert last["dates"] == ["2001-03-09", "2001-03-10"]
    _, clipped = _import(tmp_path, tmp_path / "src", name="clipped", start_date="2000-01-01")
    assert clipped["first_date"] == "2001-03-01"  # the window never reaches past the data
    with pytest.raises(DatasetFormatError, match="no interactions in the requested window"):
        import_dataset(ImportConfig(dataset=str(tmp_path / "src"), start_date="2002-01-01"))


# ---------------------------------------------------------------------------------------------------------------
# Tags as searches.
# ---------------------------------------------------------------------------------------------------------------
def test_own_tags_become_searches_of_the_same_users(tmp_path):
    src = tmp_path / "src"
    _ratings(src, [(1, 10, 4.0, _unix(2001, 3, 4, 10)), (2, 11, 3.0, _unix(2001, 3, 4, 11))])
    _items(src, [10, 11], id_column="movieId")
    _tags(src, [(1, 10, "dark comedy", _unix(2001, 3, 4, 10, 5)), (1, 11, "dark comedy", _unix(2001, 3, 4, 10, 5)),
                (2, 10, "", _unix(2001, 3, 4, 9)), (2, 10, "noir", _unix(2001, 3, 4, 9)),
                (2, 10, "x" * (schemas.MAX_QUERY_CHARS + 1), _unix(2001, 3, 4, 9)),
                (1, 10, "later", _unix(2005, 1, 1))])
    root, manifest = _import(tmp_path, src)

    searches = _read_partition(root, schemas.SEARCH_EVENTS, "2001-03-04").to_pylist()
    assert [(s["user_id"], s["event_ts"].hour, s["query"]) for s in searches] == [
        ("u1", 10, "dark comedy"), ("u2", 9, "noir")]
    assert manifest["dropped"]["tags_duplicate"] == 1  # one user, one second, one query: one search
    assert manifest["dropped"]["tags_empty_or_overlong"] == 2
    assert manifest["dropped"]["tags_outside_window"] == 1
    assert manifest["users"] == {"watch": 2, "search": 2}
    for row in searches:
        assert validate_row(schemas.SEARCH_EVENTS, row, dt.date(2001, 3, 4))[1] is None

    _, without = _import(tmp_path, src, name="notags", use_tags=False)
    assert without["totals"][schemas.SEARCH_EVENTS] == 0


def test_tags_of_another_dataset_get_their_own_user_prefix(tmp_path):
    main, other = tmp_path / "main", tmp_path / "other"
    _interactions(main, [(1, 10, _unix(2001, 3, 4, 10))])
    _items(main, [10])
    _tags(other, [(1, 99, "space opera", _unix(2001, 3, 4, 20)), (1, 99, "western", _unix(2006, 3, 4, 20))])
    root, manifest = _import(tmp_path, main, tags_dataset=str(other))
    searches = _read_partition(root, schemas.SEARCH_EVENTS, "2001-03-04").to_pylist()
    assert [(s["user_id"], s["query"]) for s in searches] == [("t1", "space opera")]
    assert manifest["mapping"]["tag_user_prefix"] == "t"
    assert manifest["dropped"]["tags_outside_window"] == 1

    # --shift_tags_days moves a foreign tag set in time by whole days (the time of day stays).
    shift = (dt.date(2001, 3, 4) - dt.date(2006, 3, 4)).days
    root, shifted = _import(tmp_path, main, name="shifted", tags_dataset=str(other), shift_tags_days=shift)
    searches = _read_partition(root, schemas.SEARCH_EVENTS, "2001-03-04").to_pylist()
    assert [(s["query"], s["event_ts"].hour) for s in searches] == [("western", 20)]
    assert shifted["dropped"]["tags_outside_window"] == 1

    # The main dataset named again as the tags dataset: its own users.
    _tags(main, [(1, 10, "heist", _unix(2001, 3, 4, 9))])
    root, same = _import(tmp_path, main, name="same", tags_dataset=str(main))
    assert [s["user_id"] for s in _read_partition(root, schemas.SEARCH_EVENTS, "2001-03-04").to_pylist()] == ["u1"]
    assert same["mapping"]["tag_user_prefix"] == "u"
    with pytest.raises(DatasetFormatError, match="has no tags.parquet"):
        import_dataset(ImportConfig(dataset=str(main), tags_dataset=str(tmp_path / "nowhere")))


# ---------------------------------------------------------------------------------------------------------------
# Output files: deterministic, replaced on rerun; the CLI.
# ---------------------------------------------------------------------------------------------------------------
def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_imports_are_byte_identical_and_a_rerun_replaces_old_partitions(tmp_path):
    src = tmp_path / "src"
    _ratings(src, RATINGS + [(3, 10, 3.5, _unix(2001, 3, 6, 1))])
    _items(src, range(10, 16), id_column="movieId")
    _tags(src, [(3, 10, "heist", _unix(2001, 3, 6, 2))])
    first, _ = _import(tmp_path, src, name="a")
    second, _ = _import(tmp_path, src, name="b")
    assert _files(first) == _files(second)

    stale = Path(schemas.partition_dir(str(first), schemas.WATCH_EVENTS, "1999-01-01"))
    stale.mkdir(parents=True)
    (stale / "part-00000.parquet").write_bytes(b"stale")
    (first / "_truth").mkdir()
    (first / "keep.txt").write_text("not ours")
    _import(tmp_path, src, name="a")
    assert not stale.exists() and not (first / "_truth").exists() and (first / "keep.txt").exists()


def test_cli_imports_and_prints_how_to_run_the_pipelines(tmp_path, capsys):
    _ratings(tmp_path / "src", RATINGS)
    _items(tmp_path / "src", range(10, 16), id_column="movieId")
    manifest = import_cli.main([f"--dataset={tmp_path / 'src'}", f"--output_root={tmp_path / 'out'}",
                                "--start_date=2001-03-04"])
    out = capsys.readouterr().out
    assert f"--embedding_dim={DIM}" in out and "--date=2001-03-04" in out
    assert json.loads((tmp_path / "out" / di.MANIFEST_FILE).read_text()) == manifest


# ---------------------------------------------------------------------------------------------------------------
# The real datasets.
# ---------------------------------------------------------------------------------------------------------------
def _shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real dataset {path} is absent (../shared/data is only beside a full checkout)")
    return path


def test_movielens_1m_imports_every_interaction_and_item(tmp_path):
    dataset = import_dataset(ImportConfig(dataset=str(_shared("movielens-1m"))))
    manifest = dataset.manifest()
    assert manifest["totals"][schemas.WATCH_EVENTS] == 999_611
    assert manifest["totals"][schemas.VIDEOS] == 3_416
    assert manifest["embedding_dim"] == 384
    assert (manifest["first_date"], manifest["last_date"]) == ("2000-04-25", "2003-02-28")
    assert len(manifest["dates"]) == 1040 and not any(manifest["dropped"].values())
    assert manifest["users"]["watch"] == 6_040
    # Per-day counts equal the source's own, computed independently.
    source = pq.read_table(_shared("movielens-1m") / "interactions.parquet", columns=["timestamp"])
    days, counts = np.unique(source["timestamp"].to_numpy() // 86_400, return_counts=True)
    expected = {(dt.date(1970, 1, 1) + dt.timedelta(days=int(d))).isoformat(): int(c) for d, c in zip(days, counts)}
    assert {d: n for d, n in manifest["row_counts"][schemas.WATCH_EVENTS].items() if n} == expected

    # A window written to disk reads back under the contract.
    root = tmp_path / "window"
    window = write_imported_dataset(
        import_dataset(ImportConfig(dataset=str(_shared("movielens-1m")), last_days=30)), str(root))
    assert window["dates"][0] == "2003-01-30" and window["last_date"] == "2003-02-28"
    assert window["row_counts"][schemas.VIDEOS]["2003-01-30"] == 3_416  # the catalog as of the window's start
    watches = pq.read_table(os.path.join(root, schemas.WATCH_EVENTS))
    assert watches.num_rows == sum(expected.get(d, 0) for d in window["dates"])


def test_movielens_latest_small_with_its_tags(tmp_path):
    manifest = import_dataset(ImportConfig(dataset=str(_shared("movielens-latest-small")))).manifest()
    dropped = manifest["dropped"]
    assert manifest["totals"][schemas.WATCH_EVENTS] + dropped["interactions_outside_contract_range"] == 100_004
    assert manifest["totals"][schemas.SEARCH_EVENTS] + dropped["tags_duplicate"] == 1_296
    assert manifest["totals"][schemas.VIDEOS] == 9_125
    assert manifest["mapping"]["tag_user_prefix"] == "u" and manifest["mapping"]["has_ratings"]
