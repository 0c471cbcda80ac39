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
END=2026-01-09           # 9 days of data
LAST_EXAMPLE_DAY=2026-01-07  # a day's examples need the next day (the 24 h look-ahead window)
REFRESH=2026-01-08       # the nightly refresh uses the model trained through the day before; $END is its label day
RUNNER=(--runner=FnApiRunner)
export TF_CPP_MIN_LOG_LEVEL=3  # TensorFlow start-up chatter (no GPU found, CPU flags) is not news here
RANGE=(--start_date=$START --end_date=$END)

step() { printf '\n=== %s\n' "$*"; }

step "1/12 Generate the sample dataset ($USERS users, 9 days) into $RAW"
$PY -m pipelines.make_sample_data --output_root="$RAW" --users="$USERS" --days=9 --seed=0 --start_date=$START

step "2/12 Validate every input table, $START..$END"
$PY -m pipelines.validate_inputs "${RANGE[@]}" --input_root="$RAW" --output_root="$OUT" "${RUNNER[@]}"

step "3/12 Train the SID model (RQ-VAE) on the first day's catalog"
$PY -m pipelines.train_sid_model --videos="$OUT/validated/videos" --date=$START --output="$OUT/sid_model" \
  --steps=1000 --overwrite

step "4/12 Assign SIDs day by day (the first day in full, then only new videos)"
$PY -m pipelines.assign_sids "${RANGE[@]}" --output_root="$OUT" "${RUNNER[@]}"

step "5/12 Fold each day into the user history snapshots"
$PY -m pipelines.update_histories "${RANGE[@]}" --output_root="$OUT" --backfill_days=1 "${RUNNER[@]}"

step "6/12 Train the query tokenizer and fit the feature transform (reference day $START)"
$PY -m pipelines.train_query_tokenizer "${RANGE[@]}" --output_root="$OUT" "${RUNNER[@]}"
$PY -m pipelines.fit_feature_transform --date=$START --output_root="$OUT" "${RUNNER[@]}"

step "7/12 Build training examples, $START..$LAST_EXAMPLE_DAY"
$PY -m pipelines.build_examples --start_date=$START --end_date=$LAST_EXAMPLE_DAY --output_root="$OUT" "${RUNNER[@]}"

step "8/12 Read one day's examples back through the tf.data reader"
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

step "9/12 Train the user model ${TRAIN_STEPS:-2000} steps on days $START..$LAST_EXAMPLE_DAY (tiny preset, CPU; TRAIN_STEPS=200 for a quick look)"
EXAMPLE_DIRS=()
for d in $(seq 0 6); do EXAMPLE_DIRS+=("$OUT/examples/date=$(date -u -d "$START +$d day" +%F)"); done
$PY -m tokenminds_model.train --examples "${EXAMPLE_DIRS[@]}" --output="$OUT/models/date=$LAST_EXAMPLE_DAY" \
  --steps=${TRAIN_STEPS:-2000} --batch_size=16 --learning_rate=3e-3 --log_every=500 --no_progress

step "10/12 Refresh every user's embedding and tokens as of $REFRESH (20 LFV + 20 SFV tokens per user)"
$PY -m pipelines.refresh_users --date=$REFRESH --model="$OUT/models/date=$LAST_EXAMPLE_DAY" --output_root="$OUT" \
  "${RUNNER[@]}"
$PY - "$OUT" "$REFRESH" <<'PYEOF'
import datetime as dt, sys
from transforms.representations import RepresentationStore
root, day = sys.argv[1], dt.date.fromisoformat(sys.argv[2])
at = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(6), dt.timezone.utc)
[(user, found)] = list(RepresentationStore(root).lookup(["user_0000001"], at).items())
tokens = [t["token"] for t in found.row["user_tokens"] if t["scenario"] == "LFV"][:3]
print(f"lookup {user} at {at:%Y-%m-%d %H:%M} UTC: {found.status}, embedding[{len(found.row['embedding'])}], "
      f"expires {found.row['expires_at']:%Y-%m-%d %H:%M}, top LFV tokens {tokens}")
PYEOF

step "10b/12 Collapse diagnostics: do the users' tokens and embeddings differ between users? ($REFRESH)"
DIAGNOSTICS="$OUT/user_representations/_runs/date=$REFRESH/diagnostics.json"
$PY -m tokenminds_model.diagnostics --output_root="$OUT" --date=$REFRESH --output="$DIAGNOSTICS"
$PY - "$DIAGNOSTICS" "${TRAIN_STEPS:-2000}" <<'PYEOF'
import json, sys
report, steps = json.load(open(sys.argv[1])), sys.argv[2]
for name, d in report["scenarios"].items():
    rank0 = d["distinct_per_rank"][0] if d["distinct_per_rank"] else 0
    if report["personalised"][name]:
        print(f"{name}: distinct rank-0 tokens: {rank0:,} of {d['users']:,} users: the tokens differ between users.")
    else:
        print(f"{name}: distinct rank-0 tokens: {rank0:,} of {d['users']:,} users: the demo model ({steps} steps of "
              "the tiny preset) is undertrained; its tokens are not personalised.")
PYEOF

step "11/12 Downstream adaptation artifacts (prefix embeddings, SID n-grams, SID SentencePiece) as of $REFRESH"
$PY -m pipelines.build_adaptation --date=$REFRESH --output_root="$OUT" "${RUNNER[@]}"

step "12/12 Downstream ranking study: do the refresh of $REFRESH's embedding and tokens help rank $END's engagements?"
$PY -m tokenminds_model.downstream --output_root="$OUT" --refresh_date=$REFRESH \
  --model="$OUT/models/date=$LAST_EXAMPLE_DAY" --output="$OUT/downstream/date=$REFRESH" --seeds=${SEEDS:-5} \
  --title="Downstream ranking study: the demo (${TRAIN_STEPS:-2000}-step model)"

step "Outputs"
cat <<TXT
validated tables     $OUT/validated/<table>/date=D/          dead letters  $OUT/dead_letter/<job or table>/date=D/
validation summaries $OUT/validation_runs/date=D/summary.json
SID model            $OUT/sid_model/ (metrics.json)           SIDs          $OUT/video_sids/date=D/
history snapshots    $OUT/histories/date=D/
query tokenizer      $OUT/query_tokenizer/                     feature transform $OUT/feature_transform/
training examples    $OUT/examples/date=D/ (part-*.tfrecord.gz, feature_spec.json, vocabulary.json, stats.json)
user model           $OUT/models/date=$LAST_EXAMPLE_DAY/ (model_config.json, params/, train_state/, tensorboard/)
user representations $OUT/user_representations/date=$REFRESH/ (summary, diagnostics.json: user_representations/_runs/date=$REFRESH/)
adaptation artifacts $OUT/adaptation/date=$REFRESH/ (prefix_embeddings/, sid_ngram_vocab.json, sid_spm.model)
downstream study     $OUT/downstream/date=$REFRESH/ (report.md, metrics.json, downstream.png)
TXT
