#!/usr/bin/env bash
# The downstream ranking study (tokenminds_model.downstream) on MovieLens-1M: does a ranker of the next week's
# movies get better with the refresh's TokenMinds embedding and tokens?
#
# Usage: bash scripts/run_downstream_movielens.sh
#   env (defaults): PY=.venv/bin/python WORK=workdir/movielens STEPS=1000 LABEL_DAYS=7 SEEDS=5
#                   TRAIN_START=2000-11-06
#
# Days. scripts/run_movielens.sh builds the tree if WORK has none (events validated from 2000-10-21, the SID model,
# query tokenizer and feature transform). This script then folds history snapshots from TRAIN_START-1 (a backfill
# from 2000-10-21) through D = 2000-11-21, builds the examples of TRAIN_START .. 2000-11-20 (one day's ~240
# examples alone overfit the model) and trains on them. The last training day's look-ahead windows end inside D, so
# the refresh of D is the first the model may serve without having seen the labels (the study's --model check
# enforces it). Labels: every movie a user rated on D+1 .. D+LABEL_DAYS (MovieLens-1M is implicit feedback: every
# rating is an engagement, so the negatives are sampled, not real). About 330 users have a history on D and a
# rating in the following week. MovieLens has one scenario: the refresh decodes LFV tokens only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${WORK:-workdir/movielens}
STEPS=${STEPS:-1000}
LABEL_DAYS=${LABEL_DAYS:-7}
SEEDS=${SEEDS:-5}
TRAIN_START=${TRAIN_START:-2000-11-06}
TRAIN_END=2000-11-20
D=2000-11-21
EVENTS_START=2000-10-21   # run_movielens.sh validates events from here (DAY - 1 - 29 days)
RAW=$WORK/raw; OUT=$WORK/out
RUNNER=(--runner=FnApiRunner)
EMB=(--embedding_dim=384)
export TF_CPP_MIN_LOG_LEVEL=3
step() { printf '\n=== %s [%s]\n' "$*" "$(date +%T)"; }

if [[ ! -f "$OUT/examples/date=$TRAIN_END/_SUCCESS" ]]; then
  step "MovieLens-1M daily flow (scripts/run_movielens.sh)"
  PY=$PY WORK=$WORK DAY=$TRAIN_END COMPARE_CODEBOOK_SIZE="" bash scripts/run_movielens.sh
fi
BEFORE=$(date -u -d "$TRAIN_START -1 day" +%F)
BACKFILL_DAYS=$(( ($(date -u -d "$BEFORE" +%s) - $(date -u -d "$EVENTS_START" +%s)) / 86400 + 1 ))
LAST=$(date -u -d "$D +$LABEL_DAYS day" +%F)
FIRST_LABEL=$(date -u -d "$D +1 day" +%F)

step "Validate the label window $FIRST_LABEL..$LAST (watches and the catalog's new movies)"
$PY -m pipelines.validate_inputs --start_date="$FIRST_LABEL" --end_date="$LAST" --input_root="$RAW" \
  --output_root="$OUT" "${EMB[@]}" "${RUNNER[@]}" >/dev/null

MODEL=$OUT/models/downstream_${TRAIN_START}_${TRAIN_END}
if [[ ! -f "$MODEL/model_config.json" ]]; then
  step "SIDs, history snapshots $BEFORE (backfill of $BACKFILL_DAYS days) .. $D, examples $TRAIN_START .. $TRAIN_END"
  $PY -m pipelines.assign_sids --start_date="$BEFORE" --end_date="$D" --output_root="$OUT" "${EMB[@]}" \
    "${RUNNER[@]}" >/dev/null
  $PY -m pipelines.update_histories --date="$BEFORE" --backfill_days="$BACKFILL_DAYS" --output_root="$OUT" \
    "${RUNNER[@]}" >/dev/null
  $PY -m pipelines.update_histories --start_date="$TRAIN_START" --end_date="$D" --output_root="$OUT" \
    "${RUNNER[@]}" >/dev/null
  $PY -m pipelines.build_examples --start_date="$TRAIN_START" --end_date="$TRAIN_END" --output_root="$OUT" \
    "${RUNNER[@]}" | tail -n 3
  DIRS=(); d=$TRAIN_START
  while [[ ! "$d" > "$TRAIN_END" ]]; do DIRS+=("$OUT/examples/date=$d"); d=$(date -u -d "$d +1 day" +%F); done
  step "Train the user model $STEPS steps on the examples of $TRAIN_START .. $TRAIN_END (tiny preset)"
  $PY -m tokenminds_model.train --examples "${DIRS[@]}" --output="$MODEL" --steps="$STEPS" \
    --batch_size=16 --learning_rate=3e-3 --log_every=250 --no_progress --no_tensorboard | grep -v '^RESULT'
fi

step "Refresh every user's embedding and tokens as of $D; collapse diagnostics; adaptation artifacts"
$PY -m pipelines.refresh_users --date=$D --model="$MODEL" --output_root="$OUT" --scenarios=LFV "${RUNNER[@]}"
$PY -m tokenminds_model.diagnostics --output_root="$OUT" --date=$D \
  --output="$OUT/user_representations/_runs/date=$D/diagnostics.json" | tail -n 4
$PY -m pipelines.build_adaptation --date=$D --output_root="$OUT" "${EMB[@]}" "${RUNNER[@]}"

step "Downstream ranking study: the refresh of $D against the ratings of $FIRST_LABEL..$LAST"
$PY -m tokenminds_model.downstream --output_root="$OUT" --refresh_date=$D --label_days="$LABEL_DAYS" \
  --model="$MODEL" --output="$OUT/downstream/date=$D" --seeds="$SEEDS" \
  --title="Downstream ranking study: MovieLens-1M, refresh of $D, ratings of the next $LABEL_DAYS days"
