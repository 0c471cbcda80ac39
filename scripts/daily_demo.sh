#!/usr/bin/env bash
# The daily flow on the embedded default: a generated sample dataset, Beam's in-process runner, local files.
# Usage: make demo   (or WORKDIR=... PY=... bash scripts/daily_demo.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR=${WORKDIR:-workdir}
PY=${PY:-.venv/bin/python}
RAW=$WORKDIR/raw
OUT=$WORKDIR/out
START=2026-01-01
END=2026-01-08
RUNNER=(--runner=FnApiRunner)

step() { printf '\n=== %s\n' "$*"; }

step "1. Generate the sample dataset (2,000 users, 8 days) into $RAW"
$PY -m pipelines.make_sample_data --output_root="$RAW" --users=2000 --days=8 --seed=0 --start_date=$START

step "2. Validate every input table, $START..$END"
$PY -m pipelines.validate_inputs --start_date=$START --end_date=$END --input_root="$RAW" --output_root="$OUT" \
  "${RUNNER[@]}"

step "Outputs"
echo "validated tables:   $OUT/validated/<table>/date=D/"
echo "dead letters:       $OUT/dead_letter/<table>/date=D/"
echo "run summaries:      $OUT/validation_runs/date=D/summary.json"
