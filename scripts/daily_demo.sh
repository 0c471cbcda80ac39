#!/usr/bin/env bash
# The daily flow on the embedded default: a generated sample dataset, Beam's in-process runner, local files.
# Usage: make demo   (or WORKDIR=... PY=... USERS=... bash scripts/daily_demo.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR=${WORKDIR:-workdir}
PY=${PY:-.venv/bin/python}
USERS=${USERS:-2000}
RAW=$WORKDIR/raw
OUT=$WORKDIR/out
START=2026-01-01
END=2026-01-08           # 8 days of data
LAST_EXAMPLE_DAY=2026-01-07  # a day's examples need the next day (the 24 h look-ahead window)
RUNNER=(--runner=FnApiRunner)
export TF_CPP_MIN_LOG_LEVEL=3  # TensorFlow start-up chatter (no GPU found, CPU flags) is not news here
RANGE=(--start_date=$START --end_date=$END)

step() { printf '\n=== %s\n' "$*"; }

step "1/8 Generate the sample dataset ($USERS users, 8 days) into $RAW"
$PY -m pipelines.make_sample_data --output_root="$RAW" --users="$USERS" --days=8 --seed=0 --start_date=$START

step "2/8 Validate every input table, $START..$END"
$PY -m pipelines.validate_inputs "${RANGE[@]}" --input_root="$RAW" --output_root="$OUT" "${RUNNER[@]}"

step "3/8 Train the SID model (RQ-VAE) on the first day's catalog"
$PY -m pipelines.train_sid_model --videos="$OUT/validated/videos" --date=$START --output="$OUT/sid_model" \
  --steps=1000 --overwrite

step "4/8 Assign SIDs day by day (the first day in full, then only new videos)"
$PY -m pipelines.assign_sids "${RANGE[@]}" --output_root="$OUT" "${RUNNER[@]}"

step "5/8 Fold each day into the user history snapshots"
$PY -m pipelines.update_histories "${RANGE[@]}" --output_root="$OUT" --backfill_days=1 "${RUNNER[@]}"

step "6/8 Train the query tokenizer and fit the feature transform (reference day $START)"
$PY -m pipelines.train_query_tokenizer "${RANGE[@]}" --output_root="$OUT" "${RUNNER[@]}"
$PY -m pipelines.fit_feature_transform --date=$START --output_root="$OUT" "${RUNNER[@]}"

step "7/8 Build training examples, $START..$LAST_EXAMPLE_DAY"
$PY -m pipelines.build_examples --start_date=$START --end_date=$LAST_EXAMPLE_DAY --output_root="$OUT" "${RUNNER[@]}"

step "8/8 Read one day's examples back through the tf.data reader"
$PY - "$OUT/examples/date=$LAST_EXAMPLE_DAY" <<'PYEOF'
import sys
from tokenminds_model.data import numpy_batches
from tokenminds_model.vocabulary import VocabularyLayout
directory = sys.argv[1]
layout = VocabularyLayout.load_manifest(f"{directory}/vocabulary.json")
batch = next(numpy_batches([directory], batch_size=8, seed=0))
print({name: value.shape for name, value in batch.items()})
length = int(batch["length"][0, 0])
print("history (first 30 tokens):", layout.format_tokens(batch["tokens"][0, :30]), "...", f"({length} tokens)")
print("targets:", layout.format_tokens(batch["targets"][0, :int(batch["num_targets"][0, 0])].ravel()))
PYEOF

step "Outputs"
cat <<TXT
validated tables     $OUT/validated/<table>/date=D/          dead letters  $OUT/dead_letter/<job or table>/date=D/
validation summaries $OUT/validation_runs/date=D/summary.json
SID model            $OUT/sid_model/ (metrics.json)           SIDs          $OUT/video_sids/date=D/
history snapshots    $OUT/histories/date=D/
query tokenizer      $OUT/query_tokenizer/                     feature transform $OUT/feature_transform/
training examples    $OUT/examples/date=D/ (part-*.tfrecord.gz, feature_spec.json, vocabulary.json, stats.json)
TXT
