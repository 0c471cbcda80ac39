#!/usr/bin/env bash
# The paper's Table 1 directions on the generated sample: one model per variant, the same training budget, the same
# eval day, Session / Cold-start Recall@10 per scenario in one table.
#
# Usage: bash scripts/run_ablations.sh                   (all phases, generated sample)
#        PHASE=prepare bash scripts/run_ablations.sh     (only the shared daily flow)
#        PHASE=table bash scripts/run_ablations.sh       (only print the table of what has been evaluated)
#        SEEDS="0 1 2" VARIANTS="full grounded" PHASE=seeds bash scripts/run_ablations.sh
#                                      (each variant trained with every seed: Recall@10 with a t-interval over seeds)
#        PHASE=rq3 bash scripts/run_ablations.sh
#        VARIANTS="full no_searches grounded grounded_no_searches" bash scripts/run_ablations.sh
#                                      (the paper's Table 2: random initialisation vs a SID-grounded pre-trained
#                                       checkpoint, with and without searches; see pretrain below)
#                                      (the paper's RQ3: one LFV+SFV model vs one model per scenario; runs what is
#                                       missing, then prints recall and training compute side by side)
#        DATASET=movielens bash scripts/run_ablations.sh (MovieLens-1M, see below)
#   env (defaults): PY=.venv/bin/python WORK=workdir/ablations RESULTS=workdir/ablations/results USERS=1000
#                   STEPS=300 BATCH=32 VARIANTS="full k1 next full_depth no_searches"
#                   EVAL_PROTOCOLS=session,cold_start
#                   ML_SOURCE=workdir/movielens (a finished scripts/run_movielens.sh tree, DAY=2000-11-20)
#
# Days: 9 days of data, 2026-01-01..09. The eval day is D = 2026-01-08: its cold-start look-ahead window needs D+1
# (2026-01-09), which is why a 9th day is generated. Training uses the examples of 2026-01-01..06: an example of day
# d looks ahead into d+1, so day 6's windows end inside day 7 and no training target is a watch of the eval day
# (examples of day 7 would train on day-8 watches, the eval targets themselves).
#
# Shared by every variant: raw data, validation, SID model, SIDs, histories, query tokenizer, feature transform
# (WORK/out). Per variant: examples (--examples_output), model, eval sets (under WORK/variants/<v>/), evaluation.
# Each variant's eval sets are built with the variant's own sequence options, so its model reads histories in the
# format it was trained on (e.g. full-depth SID tokens); Recall is always scored at prefix L = 2.
#
# MovieLens-1M (DATASET=movielens): starts from a finished scripts/run_movielens.sh tree (ML_SOURCE; snapshots of
# 2000-11-19..21, SID model, tokenizer, transform), copied to WORK/ml and extended by two days (validate, assign SIDs,
# fold histories for 2000-11-22..23). Training: the examples of 2000-11-19..20 (their windows end inside 11-21);
# eval day 2000-11-22 (its windows need 11-23). Examples of 11-21 would look ahead into the eval day.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$PWD/.venv/bin/python}
WORK=${WORK:-workdir/ablations}
RESULTS=${RESULTS:-workdir/ablations/results}
USERS=${USERS:-1000}
STEPS=${STEPS:-300}
BATCH=${BATCH:-32}
PHASE=${PHASE:-all}
EVAL_PROTOCOLS=${EVAL_PROTOCOLS:-session,cold_start}  # what the table reads; "" or all four for full reports
VARIANTS=${VARIANTS:-"full k1 next full_depth no_searches"}
SEEDS=${SEEDS:-"0 1 2"}  # PHASE=seeds: training seeds per variant
SAMPLE_ARGS=${SAMPLE_ARGS:-}  # more make_sample_data options, e.g. "--lfv_search_session_prob=0.8" (search-heavy)
DATASET=${DATASET:-sample}
ML_SOURCE=${ML_SOURCE:-workdir/movielens}
if [[ "$DATASET" == movielens ]]; then
  TRAIN_START=2000-11-19; TRAIN_END=2000-11-20; EVAL_DAY=2000-11-22; ROOT=$WORK/ml; EXTRA=(--embedding_dim=384)
else
  START=2026-01-01; END=2026-01-09; TRAIN_START=2026-01-01; TRAIN_END=2026-01-06; EVAL_DAY=2026-01-08
  ROOT=$WORK; EXTRA=()
fi
RAW=$ROOT/raw; OUT=$ROOT/out
RUNNER=(--runner=FnApiRunner)
export TF_CPP_MIN_LOG_LEVEL=3
mkdir -p "$WORK" "$RESULTS"

step() { printf '\n=== %s [%s]\n' "$*" "$(date +%T)"; }

variant_flags() {  # the build_examples / build_eval_sets sequence options of a variant
  case "$1" in
    full) echo "" ;;
    k1) echo "--max_targets=1" ;;
    next) echo "--target_mode=next" ;;
    full_depth) echo "--full_depth_sids" ;;
    no_searches) echo "--no_searches" ;;
    lfv_only) echo "--scenarios=LFV" ;;   # RQ3: a model of one scenario (its watches, targets and cutoffs only)
    sfv_only) echo "--scenarios=SFV" ;;
    grounded) echo "" ;;                  # Table 2: as full / no_searches, fine-tuned from the grounded checkpoint
    grounded_no_searches) echo "--no_searches" ;;
    *) echo "unknown variant $1" >&2; exit 2 ;;
  esac
}

prepare() {
  if [[ -f "$OUT/.prepared" ]]; then echo "shared flow already in $OUT"; return; fi
  step "generate $USERS users x 9 days"
  # shellcheck disable=SC2086
  $PY -m pipelines.make_sample_data --output_root="$RAW" --users="$USERS" --days=9 --seed=0 --start_date=$START \
    $SAMPLE_ARGS
  local range=(--start_date=$START --end_date=$END)
  step "validate"
  $PY -m pipelines.validate_inputs "${range[@]}" --input_root="$RAW" --output_root="$OUT" "${RUNNER[@]}" >/dev/null
  step "SID model"
  $PY -m pipelines.train_sid_model --videos="$OUT/validated/videos" --date=$START --output="$OUT/sid_model" \
    --steps=1000 --overwrite >/dev/null
  step "SIDs"
  $PY -m pipelines.assign_sids "${range[@]}" --output_root="$OUT" "${RUNNER[@]}" >/dev/null
  step "histories"
  $PY -m pipelines.update_histories "${range[@]}" --output_root="$OUT" --backfill_days=1 "${RUNNER[@]}" >/dev/null
  step "query tokenizer, feature transform"
  $PY -m pipelines.train_query_tokenizer "${range[@]}" --output_root="$OUT" "${RUNNER[@]}" >/dev/null
  $PY -m pipelines.fit_feature_transform --date=$START --output_root="$OUT" "${RUNNER[@]}" >/dev/null
  touch "$OUT/.prepared"
}

prepare_movielens() {
  if [[ -f "$OUT/.prepared" ]]; then echo "MovieLens tree already in $OUT"; return; fi
  mkdir -p "$ROOT"
  cp -r "$ML_SOURCE/out" "$ML_SOURCE/raw" "$ROOT/"
  local range=(--start_date=2000-11-22 --end_date=2000-11-23)
  step "validate, assign SIDs, fold histories 2000-11-22..23"
  $PY -m pipelines.validate_inputs "${range[@]}" --input_root="$RAW" --output_root="$OUT" "${EXTRA[@]}" \
    "${RUNNER[@]}" >/dev/null
  $PY -m pipelines.assign_sids "${range[@]}" --output_root="$OUT" "${EXTRA[@]}" "${RUNNER[@]}" >/dev/null
  $PY -m pipelines.update_histories "${range[@]}" --output_root="$OUT" "${RUNNER[@]}" >/dev/null
  touch "$OUT/.prepared"
}

# SID grounding (Table 2): one example per catalogue item as of TRAIN_END, its title's query pieces -> its SID
# (pipelines.build_grounding_examples; the sample's titles come from its topic vocabularies, MovieLens' are the
# movie titles), trained PRETRAIN_STEPS steps from random weights. The grounded variants start from this checkpoint
# and then train STEPS steps on behaviour examples, like every other variant.
PRETRAIN_STEPS=${PRETRAIN_STEPS:-$STEPS}
pretrain() {
  local dir=$ROOT/pretrained
  if [[ -f "$dir/model/model_config.json" ]]; then return; fi
  step "grounding examples $TRAIN_END, pre-train $PRETRAIN_STEPS steps"
  $PY -m pipelines.build_grounding_examples --date=$TRAIN_END --input_root="$RAW" --output_root="$OUT" \
    "${RUNNER[@]}"
  $PY -m tokenminds_model.train --examples "$OUT/grounding_examples/date=$TRAIN_END" --output="$dir/model" \
    --steps="$PRETRAIN_STEPS" --batch_size="$BATCH" --no_progress --no_tensorboard --log_every=100 \
    | grep -v '^RESULT' || true
}

# A variant named NAME:sK is NAME trained with --seed=K: it shares NAME's examples and eval sets (the data do not
# depend on the training seed) and has its own model and report, so seeds give an interval over training runs.
run_variant() {
  local v=$1 base=${1%%:s*} seed=0 flags
  [[ "$v" == *:s* ]] && seed=${v##*:s}
  local dir=$ROOT/variants/$base run_dir=$ROOT/variants/$v
  flags=$(variant_flags "$base")
  mkdir -p "$dir" "$run_dir"
  if [[ ! -f "$dir/examples/.done" ]]; then
    step "[$v] examples $TRAIN_START..$TRAIN_END $flags"
    # shellcheck disable=SC2086
    $PY -m pipelines.build_examples --start_date=$TRAIN_START --end_date=$TRAIN_END --output_root="$OUT" \
      --examples_output="$dir/examples" $flags "${RUNNER[@]}"
    touch "$dir/examples/.done"
  fi
  if [[ ! -f "$dir/eval_sets/date=$EVAL_DAY/_SUCCESS" ]]; then
    step "[$v] eval sets $EVAL_DAY"
    # shellcheck disable=SC2086
    $PY -m pipelines.build_eval_sets --date=$EVAL_DAY --output_root="$OUT" --eval_output="$dir/eval_sets" \
      $flags "${RUNNER[@]}"
  fi
  local train_dirs=() d=$TRAIN_START
  while [[ ! "$d" > "$TRAIN_END" ]]; do train_dirs+=("$dir/examples/date=$d"); d=$(date -u -d "$d +1 day" +%F); done
  local init=()
  if [[ "$base" == grounded* ]]; then pretrain; init=(--init_from="$ROOT/pretrained/model"); fi
  if [[ ! -f "$run_dir/model/model_config.json" ]]; then
    step "[$v] train $STEPS steps, seed $seed ${init[*]}"
    $PY -m tokenminds_model.train --examples "${train_dirs[@]}" --output="$run_dir/model" --steps="$STEPS" \
      --batch_size="$BATCH" --seed="$seed" --no_progress --no_tensorboard --log_every=100 "${init[@]}" \
      | grep -v '^RESULT' || true
  fi
  if [[ -f "$run_dir/report/metrics.json" ]]; then echo "[$v] already evaluated: $run_dir/report"; return; fi
  step "[$v] evaluate"
  $PY -m tokenminds_model.evaluate --protocols="$EVAL_PROTOCOLS" --model="$run_dir/model" \
    --eval_sets="$dir/eval_sets/date=$EVAL_DAY" --train_examples="$(IFS=,; echo "${train_dirs[*]}")" \
    --video_sids="$OUT/video_sids/date=$EVAL_DAY" --output="$run_dir/report" --prefix_len=2 | tail -n 3
}

table() {
  $PY - "$ROOT" "$EVAL_DAY" "$DATASET" $VARIANTS <<'PY'
import json, os, sys
work, day, dataset, variants = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]


def wilson(p, n, z=1.96):  # 95% interval of a recall over n independent cases
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * ((p * (1 - p) + z * z / (4 * n)) / n) ** 0.5 / (1 + z * z / n)
    return f"[{centre - half:.3f}, {centre + half:.3f}]"


rows = []
header = ["variant", "method"] + [f"{p}/{s}" for p in ("session", "cold_start") for s in ("LFV", "SFV")] + [
    "stability(self-other)"]
lines = [f"{dataset}: Recall@10 at prefix L=2 [95% Wilson interval], eval day {day}; n = eval cases; last column: mean cosine(perturbed "
         f"self) - mean cosine(random other user), session protocol",
         " | ".join(header), " | ".join("---" for _ in header)]
for v in variants:
    path = os.path.join(work, "variants", v, "report", "metrics.json")
    if not os.path.exists(path):
        lines.append(f"{v} | (missing: {path})")
        continue
    m = json.load(open(path))
    for method in ("model", "most_popular", "user_recent"):
        cells = []
        for p in ("session", "cold_start"):
            for s in ("LFV", "SFV"):
                cell = m["protocols"].get(p, {}).get("scenarios", {}).get(s, {})
                r = cell.get("recall@10", {}).get(method)
                cells.append("-" if r is None else f"{r:.4f} {wilson(r, cell['cases'])} (n={cell['cases']})")
        stab = m["protocols"].get("session", {}).get("stability", {})
        gap = "-" if method != "model" or not stab else f"{stab['mean_cosine_perturbed'] - stab['mean_cosine_other']:.3f}"
        lines.append(" | ".join([v, method] + cells + [gap]))
print("\n".join(lines))
PY
}

# RQ3's downstream side: each model's refresh of the day after its last training day (D = TRAIN_END + 1: no training
# target lies after D) serves the downstream ranking study on D+1's engagements. Each variant refreshes into its own
# root (links to the shared tables and artifacts), so the variants' representations never mix.
rq3_downstream() {
  local v=$1 root=$ROOT/variants/$1/serving flags d
  flags=$(variant_flags "$v")
  d=$(date -u -d "$TRAIN_END +1 day" +%F)
  if [[ -f "$root/downstream/metrics.json" ]]; then return; fi
  mkdir -p "$root"
  for name in histories video_sids validated sid_model query_tokenizer feature_transform; do
    ln -sfn "$(realpath "$OUT/$name")" "$root/$name"
  done
  step "[$v] refresh $d, adaptation artifacts, downstream study on $(date -u -d "$d +1 day" +%F)"
  # shellcheck disable=SC2086
  $PY -m pipelines.refresh_users --date="$d" --model="$ROOT/variants/$v/model" --output_root="$root" $flags \
    "${RUNNER[@]}"
  $PY -m tokenminds_model.diagnostics --output_root="$root" --date="$d" \
    --output="$root/user_representations/_runs/date=$d/diagnostics.json" | tail -n 3
  $PY -m pipelines.build_adaptation --date="$d" --output_root="$root" "${EXTRA[@]}" "${RUNNER[@]}" >/dev/null
  $PY -m tokenminds_model.downstream --output_root="$root" --refresh_date="$d" --model="$ROOT/variants/$v/model" \
    --output="$root/downstream" --title="Downstream ranking study: the $v model (RQ3)" | tail -n 6
}

seeded_names() {  # the run names of base variants $VARIANTS over training seeds $SEEDS (seed 0 is the plain name)
  local v k
  for v in $VARIANTS; do for k in $SEEDS; do if [[ $k == 0 ]]; then echo "$v"; else echo "$v:s$k"; fi; done; done
}

seeds_table() {  # per base variant: Recall@10 (model) as the mean over training seeds with a 95% t-interval
  $PY - "$ROOT" "$EVAL_DAY" "$SEEDS" $VARIANTS <<'PY'
import json, os, sys
import numpy as np
from scipy import stats
work, day, seeds, variants = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4:]
cells = [(p, s) for s in ("LFV", "SFV") for p in ("session", "cold_start")]
print(f"Recall@10 at prefix L=2 (model), eval day {day}: mean over training seeds {seeds} [95% t-interval]; "
      "n = eval cases (the same cases for every seed of a variant)")
print("variant | " + " | ".join(f"{p}/{s}" for p, s in cells))
print(" | ".join(["---"] * (1 + len(cells))))
for v in variants:
    runs = [json.load(open(os.path.join(work, "variants", v if k == "0" else f"{v}:s{k}", "report", "metrics.json")))
            for k in seeds]
    row = [v]
    for p, s in cells:
        found = [m["protocols"].get(p, {}).get("scenarios", {}).get(s, {}) for m in runs]
        values = np.array([f["recall@10"]["model"] for f in found if f.get("cases")])
        if len(values) < 2:
            row.append("-")
            continue
        half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
        row.append(f"{values.mean():.4f} [{values.mean() - half:.4f}, {values.mean() + half:.4f}] (n={found[0]['cases']})")
    print(" | ".join(row))
PY
}

rq3_table() {  # unified (full) vs one model per scenario (lfv_only + sfv_only): recall and training compute
  $PY - "$ROOT" "$EVAL_DAY" "$TRAIN_START" "$TRAIN_END" <<'PY'
import datetime as dt, glob, json, os, sys
import numpy as np
from tokenminds_model.data import numpy_batches
work, day, start, end = sys.argv[1:5]
days = [(dt.date.fromisoformat(start) + dt.timedelta(days=k)).isoformat()
        for k in range((dt.date.fromisoformat(end) - dt.date.fromisoformat(start)).days + 1)]

def compute(v):  # examples, non-pad input tokens and targets of the variant's training days; the trainer's time
    dirs = [os.path.join(work, "variants", v, "examples", f"date={d}") for d in days]
    n = tokens = targets = 0
    for batch in numpy_batches(dirs, 256, seed=None, drop_remainder=False):
        n += len(batch["length"]); tokens += int(batch["length"].sum()); targets += int(batch["num_targets"].sum())
    doc = json.load(open(os.path.join(work, "variants", v, "model", "model_config.json")))
    run = doc["runs"][-1]
    return {"examples": n, "tokens": tokens, "targets": targets, "steps": run["steps_run"],
            "train_s": run["ms_per_step"] * run["steps_run"] / 1000 if run.get("ms_per_step") else float("nan")}

def recall(v, protocol, scenario):
    m = json.load(open(os.path.join(work, "variants", v, "report", "metrics.json")))
    cell = m["protocols"].get(protocol, {}).get("scenarios", {}).get(scenario, {})
    return cell.get("recall@10", {}).get("model"), cell.get("cases")

c = {v: compute(v) for v in ("full", "lfv_only", "sfv_only")}
print(f"RQ3 on {work}: training days {start}..{end}, eval day {day}, Recall@10 at prefix L=2 (model)")
print("model | LFV session | LFV cold-start | SFV session | SFV cold-start | examples | input tokens | targets | "
      "steps | train s")
print("--- | --- | --- | --- | --- | --- | --- | --- | --- | ---")
for v in ("full", "lfv_only", "sfv_only"):
    cells = []
    for s in ("LFV", "SFV"):
        for p in ("session", "cold_start"):
            r, n = recall(v, p, s)
            cells.append("-" if r is None else f"{r:.4f} (n={n})")
    x = c[v]
    print(" | ".join([v, *cells, f"{x['examples']:,}", f"{x['tokens']:,}", f"{x['targets']:,}", str(x["steps"]),
                      f"{x['train_s']:.0f}"]))
for v in ("full", "lfv_only"):  # the downstream study of each model's refresh (rq3_downstream)
    path = os.path.join(work, "variants", v, "serving", "downstream", "metrics.json")
    if os.path.exists(path):
        s = json.load(open(path))["summary"]
        cells = []
        for variant in ("+emb", "+LE", "+emb+LE"):
            a = s[variant]["auc"]
            cells.append(f"{variant} {100 * a['lift']:+.2f}% [{100 * a['lift_low']:+.2f}, {100 * a['lift_high']:+.2f}]")
        print(f"downstream AUC lift over base, {v}: " + "; ".join(cells))
two = {k: c["lfv_only"][k] + c["sfv_only"][k] for k in ("examples", "tokens", "train_s")}
print(f"unified / (LFV-only + SFV-only): examples x tokens {c['full']['tokens'] / two['tokens']:.2f} "
      f"(input tokens read per epoch), training time at equal steps {c['full']['train_s'] / two['train_s']:.2f}")
PY
}

prepare_dataset() { if [[ "$DATASET" == movielens ]]; then prepare_movielens; else prepare; fi; }
case "$PHASE" in
  prepare) prepare_dataset ;;
  table) table | tee "$RESULTS/${DATASET}_recall_table.md" ;;
  seeds)  # SEEDS="0 1 2" VARIANTS="full grounded" PHASE=seeds: each variant over training seeds, and their table
    prepare_dataset
    for v in $(seeded_names); do run_variant "$v" 2>&1 | tee "$RESULTS/${DATASET}_$v.log"; done
    seeds_table | tee "$RESULTS/${DATASET}_seeds_table.md" ;;
  rq3)
    prepare_dataset
    for v in full lfv_only sfv_only; do run_variant "$v" 2>&1 | tee "$RESULTS/${DATASET}_$v.log"; done
    for v in full lfv_only; do rq3_downstream "$v" 2>&1 | tee "$RESULTS/${DATASET}_${v}_downstream.log"; done
    rq3_table | tee "$RESULTS/${DATASET}_rq3_table.md" ;;
  all)
    prepare_dataset
    for v in $VARIANTS; do run_variant "$v" 2>&1 | tee "$RESULTS/${DATASET}_$v.log"; done
    table | tee "$RESULTS/${DATASET}_recall_table.md" ;;
  *) echo "unknown PHASE=$PHASE" >&2; exit 2 ;;
esac
