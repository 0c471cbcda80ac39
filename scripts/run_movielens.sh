#!/usr/bin/env bash
# The daily flow on real data: MovieLens-1M watches + MiniLM item embeddings, with the query tokenizer trained on
# movielens-latest-small's free-text tags (MovieLens-1M has no queries). Builds and reads back one dense day's examples.
#
# Usage: bash scripts/run_movielens.sh
#   env (defaults): PY=.venv/bin/python SHARED=../shared/data WORK=workdir/movielens DAY=2000-11-20
#                   BACKFILL_DAYS=30 CODEBOOK_SIZE=64 COMPARE_CODEBOOK_SIZE=256 SID_STEPS=2000
#                   TAG_WINDOW_DAYS=31 (TAG_START/TAG_END override the tag window)
#
# The window: the examples of DAY need the history snapshots of DAY-1, DAY and DAY+1. The first snapshot (DAY-1) is
# built from BACKFILL_DAYS days of raw events ending on DAY-1, so events are validated from DAY-BACKFILL_DAYS to
# DAY+1. The full import publishes each video on the day of its first interaction, so the catalog as of DAY+1
# spans every partition since the dataset's first day: those earlier days are validated too (videos table only).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SHARED=${SHARED:-../shared/data}
WORK=${WORK:-workdir/movielens}
DAY=${DAY:-2000-11-20}                        # MovieLens-1M's densest day
BACKFILL_DAYS=${BACKFILL_DAYS:-30}
CODEBOOK_SIZE=${CODEBOOK_SIZE:-64}            # the SID model the pipeline uses (3,416 items: 64 codes a level)
COMPARE_CODEBOOK_SIZE=${COMPARE_CODEBOOK_SIZE:-256}  # also trained, for its metrics only ("" skips it)
SID_STEPS=${SID_STEPS:-2000}
TAG_WINDOW_DAYS=${TAG_WINDOW_DAYS:-31}
export TF_CPP_MIN_LOG_LEVEL=3                 # TensorFlow start-up chatter
RUNNER=(--runner=FnApiRunner)
EMB=(--embedding_dim=384)                     # all-MiniLM-L6-v2 item embeddings

day() { date -u -d "$1 $2 day" +%F; }
BEFORE=$(day "$DAY" -1); AFTER=$(day "$DAY" +1)
FIRST=$(day "$BEFORE" "-$((BACKFILL_DAYS - 1))")   # the backfill reads FIRST..BEFORE
RAW=$WORK/raw; RAW_SMALL=$WORK/raw_small; OUT=$WORK/out; OUT_SMALL=$WORK/out_small
mkdir -p "$WORK"

# ---- timing: every step's wall time, and a table at the end (also when a step fails) ----------------------------
STEP_NAMES=(); STEP_SECONDS=()
exec 3>&1  # step headers go to the console even where a step's own output is redirected
now() { date +%s.%N; }
timed() {  # timed NAME command...
  local name=$1; shift
  printf '\n=== [%s] %s\n' "$name" "$*" >&3
  local t0; t0=$(now)
  "$@"
  STEP_NAMES+=("$name"); STEP_SECONDS+=("$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')")
}
print_timings() {
  local total=0 i
  printf '\n=== step timings (wall clock)\n%-34s %9s\n' step seconds
  for i in "${!STEP_NAMES[@]}"; do
    printf '%-34s %9.1f\n' "${STEP_NAMES[$i]}" "${STEP_SECONDS[$i]}"
    total=$(awk -v a="$total" -v b="${STEP_SECONDS[$i]}" 'BEGIN { printf "%.1f", a + b }')
  done
  printf '%-34s %9.1f\n' TOTAL "$total"
}
print_timings_too() { print_timings | tee "$WORK/timings.txt"; }
trap print_timings_too EXIT
pyjson() { $PY - "$@"; }  # small read-only reports on the outputs

echo "window: events $FIRST..$AFTER, history snapshots $BEFORE (backfill $BACKFILL_DAYS days), $DAY, $AFTER;" \
     "examples of $DAY; WORK=$WORK"

# ---- 1. import ---------------------------------------------------------------------------------------------------
timed 1a.import_ml1m $PY -m pipelines.import_dataset --dataset="$SHARED/movielens-1m" --output_root="$RAW"
timed 1b.import_latest_small $PY -m pipelines.import_dataset --dataset="$SHARED/movielens-latest-small" \
  --output_root="$RAW_SMALL"
CATALOG_START=$(pyjson "$RAW/_dataset.json" <<'PY'
import json, sys; print(json.load(open(sys.argv[1]))["first_date"])
PY
)
# latest-small's tags lie on a few hundred scattered days of 2006-2016, and train_query_tokenizer reads one
# contiguous range of validated days: take the TAG_WINDOW_DAYS-day window holding the most tags.
TAG_WINDOW=$(pyjson "$RAW_SMALL/_dataset.json" "$TAG_WINDOW_DAYS" <<'PY'
import json, sys
manifest, width = json.load(open(sys.argv[1])), int(sys.argv[2])
dates, counts = manifest["dates"], manifest["row_counts"]["search_events"]
per_day = [counts[d] for d in dates]
best = max(range(len(dates) - width + 1), key=lambda i: (sum(per_day[i:i + width]), -i))
window = per_day[best:best + width]
print(dates[best], dates[best + width - 1],
      f"{sum(window)}_of_{sum(per_day)}_tags_on_{sum(1 for n in window if n)}_of_{sum(1 for n in per_day if n)}_tag_days")
PY
)
read -r TAG_FIRST TAG_LAST TAG_REPORT <<< "$TAG_WINDOW"
TAG_START=${TAG_START:-$TAG_FIRST}; TAG_END=${TAG_END:-$TAG_LAST}
echo "tag window for the query tokenizer: $TAG_START..$TAG_END (densest: $TAG_FIRST..$TAG_LAST, ${TAG_REPORT//_/ })"

# ---- 2. validate -------------------------------------------------------------------------------------------------
# Days before the window: only their catalog partitions are needed (the SID model and the first full assignment
# read every videos partition up to the day). The window: every table. The two runs cover disjoint days, so each
# day's validation_runs summary is written once.
if [[ "$CATALOG_START" < "$FIRST" ]]; then
  timed 2a.validate_catalog_before_window $PY -m pipelines.validate_inputs --start_date="$CATALOG_START" \
    --end_date="$(day "$FIRST" -1)" --tables=videos --input_root="$RAW" --output_root="$OUT" "${EMB[@]}" \
    "${RUNNER[@]}" > "$WORK/validate_catalog.log"  # one line a day; the totals are printed below
else
  CATALOG_START=$FIRST
fi
timed 2b.validate_window $PY -m pipelines.validate_inputs --start_date="$FIRST" --end_date="$AFTER" \
  --input_root="$RAW" --output_root="$OUT" "${EMB[@]}" "${RUNNER[@]}"
timed 2c.validate_small_tags $PY -m pipelines.validate_inputs --start_date="$TAG_START" --end_date="$TAG_END" \
  --tables=search_events --input_root="$RAW_SMALL" --output_root="$OUT_SMALL" "${EMB[@]}" "${RUNNER[@]}" \
  > "$WORK/validate_small.log"
pyjson "$OUT" "$CATALOG_START" "$AFTER" "$OUT_SMALL" "$TAG_START" "$TAG_END" <<'PY'
import json, sys, datetime as dt
def totals(root, first, last, tables):
    per_table = {t: {"days": 0, "rows_in": 0, "rows_out": 0, "rows_dead": 0, "dead_by_reason": {}} for t in tables}
    days, balanced = 0, True
    d, end = dt.date.fromisoformat(first), dt.date.fromisoformat(last)
    while d <= end:
        summary = json.load(open(f"{root}/validation_runs/date={d}/summary.json"))
        days += 1
        balanced &= summary["totals"]["balanced"]
        for table, by_date in summary["tables"].items():
            t = per_table[table]
            for entry in by_date.values():  # a day without rows of a table has no entry for it
                t["days"] += 1
                for k in ("rows_in", "rows_out", "rows_dead"):
                    t[k] += entry[k]
                for reason, n in entry.get("dead_by_reason", {}).items():
                    t["dead_by_reason"][reason] = t["dead_by_reason"].get(reason, 0) + n
        d += dt.timedelta(days=1)
    return days, balanced, per_table
runs = {"MovieLens-1M": (*sys.argv[1:4], ("videos", "watch_events", "search_events")),
        "latest-small tags": (*sys.argv[4:7], ("search_events",))}
for label, (root, first, last, tables) in runs.items():
    days, balanced, per_table = totals(root, first, last, tables)
    print(f"validation totals, {label} {first}..{last} ({days} days, every day balanced: {balanced}):")
    for table, t in sorted(per_table.items()):
        print(f"  {table:14s} days_with_rows={t['days']:4d} in={t['rows_in']:8d} out={t['rows_out']:8d} "
              f"dead={t['rows_dead']:6d} {t['dead_by_reason'] or ''}")
PY

# ---- 3. SID model ------------------------------------------------------------------------------------------------
# On the catalog as of the window's last day (every videos partition up to AFTER).
sid_metrics() {
  pyjson "$1/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
keys = ("items", "train_seconds", "utilisation_per_level", "normalized_entropy_per_level", "perplexity_per_level",
        "unique_sids", "prefix_collision_rate", "full_sid_collision_rate", "max_items_per_sid", "reconstruction_mse",
        "final_loss", "sid_model_version")
print(json.dumps({k: m[k] for k in keys if k in m}))
PY
}
if [[ -n "$COMPARE_CODEBOOK_SIZE" && "$COMPARE_CODEBOOK_SIZE" != "$CODEBOOK_SIZE" ]]; then
  timed "3a.train_sid_model_cb$COMPARE_CODEBOOK_SIZE(compare)" $PY -m pipelines.train_sid_model \
    --videos="$OUT/validated/videos" --date="$AFTER" --output="$WORK/sid_model_cb$COMPARE_CODEBOOK_SIZE" \
    --codebook_size="$COMPARE_CODEBOOK_SIZE" --steps="$SID_STEPS" --overwrite
  sid_metrics "$WORK/sid_model_cb$COMPARE_CODEBOOK_SIZE"
fi
timed "3b.train_sid_model_cb$CODEBOOK_SIZE(used)" $PY -m pipelines.train_sid_model \
  --videos="$OUT/validated/videos" --date="$AFTER" --output="$OUT/sid_model" --codebook_size="$CODEBOOK_SIZE" \
  --steps="$SID_STEPS" --overwrite
sid_metrics "$OUT/sid_model"

# ---- 4. SIDs -----------------------------------------------------------------------------------------------------
# The snapshots need the SIDs of BEFORE, DAY and AFTER: BEFORE is a full assignment of the catalog so far, the
# next days encode only their new videos.
timed 4.assign_sids $PY -m pipelines.assign_sids --start_date="$BEFORE" --end_date="$AFTER" --output_root="$OUT" \
  "${EMB[@]}" "${RUNNER[@]}"

# ---- 5. histories ------------------------------------------------------------------------------------------------
timed 5a.update_histories_backfill $PY -m pipelines.update_histories --date="$BEFORE" \
  --backfill_days="$BACKFILL_DAYS" --output_root="$OUT" "${RUNNER[@]}"
timed 5b.update_histories_incremental $PY -m pipelines.update_histories --start_date="$DAY" --end_date="$AFTER" \
  --output_root="$OUT" "${RUNNER[@]}"
pyjson "$OUT" "$BEFORE" "$DAY" "$AFTER" <<'PY'
import json, sys
for d in sys.argv[2:]:
    s = json.load(open(f"{sys.argv[1]}/histories/_runs/date={d}/summary.json"))
    print(f"histories {d} ({s['built_from']}): stats={s['stats']} totals={s['totals']}")
PY

# ---- 6. query tokenizer (latest-small's tags) --------------------------------------------------------------------
timed 6.train_query_tokenizer $PY -m pipelines.train_query_tokenizer --start_date="$TAG_START" --end_date="$TAG_END" \
  --output_root="$OUT_SMALL" --query_tokenizer="$OUT/query_tokenizer" "${RUNNER[@]}"

# ---- 7. feature transform (reference day BEFORE) -----------------------------------------------------------------
timed 7.fit_feature_transform $PY -m pipelines.fit_feature_transform --date="$BEFORE" --output_root="$OUT" \
  "${RUNNER[@]}"

# ---- 8. examples of DAY ------------------------------------------------------------------------------------------
timed 8.build_examples $PY -m pipelines.build_examples --date="$DAY" --output_root="$OUT" "${RUNNER[@]}"
echo "--- $OUT/examples/date=$DAY/stats.json"
cat "$OUT/examples/date=$DAY/stats.json"

# ---- 9. read the examples back -----------------------------------------------------------------------------------
read_back() {
  $PY - "$OUT/examples/date=$DAY" "$OUT/video_sids/date=$DAY" "$RAW/_catalog/items.parquet" <<'PY'
import collections, datetime as dt, glob, sys
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
from tokenminds_model.data import numpy_batches
from tokenminds_model.vocabulary import VocabularyLayout

directory, sids_dir, catalog = sys.argv[1:4]
layout = VocabularyLayout.load_manifest(f"{directory}/vocabulary.json")
batch = next(numpy_batches([directory], batch_size=8, seed=None))  # seed=None: file order, reproducible
print({name: value.shape for name, value in batch.items()})
i = int(np.argmax(batch["num_targets"][:, 0] > 0))  # the first example of the batch with targets
length, n_targets = int(batch["length"][i, 0]), int(batch["num_targets"][i, 0])
cutoff = dt.datetime.fromtimestamp(int(batch["cutoff_ts_us"][i, 0]) / 1e6, dt.timezone.utc)
print(f"user {batch['user_id'][i, 0].decode()}, cutoff {cutoff:%Y-%m-%d %H:%M:%S} UTC, {length} tokens, "
      f"{int(batch['num_watches'][i, 0])} watches, {int(batch['num_searches'][i, 0])} searches, {n_targets} targets")
tokens = batch["tokens"][i, :length]
print("history, first 27 tokens:", layout.format_tokens(tokens[:27]))
print("history, last 27 tokens: ", layout.format_tokens(tokens[-27:]))
# Titles of the videos that carry each target's SID prefix (the SIDs of DAY, the catalog's titles).
sids = pa.concat_tables([pq.read_table(f, columns=["video_id", "sid"])
                        for f in sorted(glob.glob(f"{sids_dir}/part-*.parquet"))]).to_pylist()
titles = dict(zip(*pq.read_table(catalog, columns=["video_id", "title"]).to_pydict().values()))
by_prefix = collections.defaultdict(list)
for row in sids:
    by_prefix[tuple(row["sid"][:batch["targets"].shape[2] - 1])].append(titles.get(row["video_id"], row["video_id"]))
print("targets:")
for target in batch["targets"][i, :n_targets]:
    prefix = tuple(layout.describe(int(t)).code for t in target[1:])
    names = sorted(by_prefix[prefix])
    print(f"  {layout.format_tokens(target):32s} -> {len(names)} videos, e.g. {names[:3]}")
PY
}
timed 9.read_back read_back
