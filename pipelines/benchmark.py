"""Benchmark mode: one command from a sequential-recommendation dataset to numbers comparable with published results.

    python -m pipelines.benchmark --dataset=../shared/data/movielens-1m --output=workdir/bench/ml1m
    python -m pipelines.benchmark --dataset=../shared/data/movielens-latest-small --output=workdir/bench/mlsmall

The dataset directory holds ``interactions.parquet`` (``user_id``, ``item_id``, ``timestamp`` in unix seconds,
optionally ``rating``; MovieLens' ``ratings.parquet`` is accepted too) and ``items.parquet`` (``item_id``, ``title``,
``content_embedding``: one float list per item, all the same width; optionally ``genres``), and optionally
``tags.parquet`` (``user_id``, ``tag``, ``timestamp``: free text, imported as searches). See README "Benchmark mode".

It runs the project's real jobs, in order, on the whole dataset (no calendar re-alignment, no glue):

    1. import        data_sources.dataset_import: the input tables, partitioned by day; equal timestamps of a user
                     keep the source file's order
    2. validate      pipelines.validate_inputs over the dataset's whole span (one read of the range)
    3. SID model     pipelines.train_sid_model (RQ-VAE on the items' content embeddings), then
                     pipelines.assign_sids on the last day (every item's full SID)
    4. histories     pipelines.update_histories on the last day, built from every validated day, with no history cap:
                     each user's whole timeline
    5. tokenizer     pipelines.train_query_tokenizer on the searches (tags); a dataset without any trains it on the
                     item titles instead (the token space always has a query range)
    6. features      pipelines.fit_feature_transform over the whole span; features that are constant on the data
                     (implicit feedback: ratio, surface, device, like, dislike) get no token at all
    7. examples      pipelines.build_benchmark_examples: leave-one-out per user (last watch test, the one before
                     validation, every earlier one a training target), full-depth SIDs, item ids on every record
    8. train         tokenminds_model.train with early stopping on validation NDCG@10 (item level, full ranking),
                     the best checkpoint kept
    9. evaluate      on the test split, full ranking over every item: TokenMinds (tokenminds_model.item_ranking),
                     most popular, and SASRec (tokenminds_model.sasrec, trained here on the same split);
                     Recall and NDCG @5/@10/@20 with 95% bootstrap intervals

Writes ``<output>/metrics.json`` (per model: the metrics, their intervals, steps, wall time, model size),
``<output>/report.md`` + ``<output>/*.png`` (dataset statistics, protocol, every model, published figures with
sources) and keeps every job's output under ``<output>/work`` (``raw/``: imported tables, ``out/``: the jobs').
A rerun replaces every output. Exit status 2 (one line on stderr) on a dataset the importer rejects.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from transforms import schemas

MODELS = ("tokenminds", "sasrec", "most_popular")
KS = (5, 10, 20)
# Published full-ranking leave-one-out figures on MovieLens-1M, for the report (other preprocessing: a guide only).
PUBLISHED = {
    "movielens-1m": [
        {"model": "HSTU", "recall@10": 0.3294, "ndcg@10": 0.1893,
         "source": "Zhai et al., 'Actions Speak Louder than Words', ICML 2024, Table 2 (HR@10, NDCG@10)"},
        {"model": "SASRec (as reproduced in the HSTU paper)", "recall@10": 0.2853, "ndcg@10": 0.1603,
         "source": "Zhai et al., ICML 2024, Table 2"},
    ],
}


@dataclasses.dataclass
class Step:
    name: str
    seconds: float
    detail: str = ""


class Driver:
    """Runs the jobs in order, timing each; ``jobs`` are the pipelines' ``run(argv)`` / ``main(argv)`` entry points."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = os.path.join(args.output, "work")
        self.raw = os.path.join(self.work, "raw")
        self.out = os.path.join(self.work, "out")
        self.runner = [f"--runner={args.runner}"] + list(args.beam_args)
        self.steps: List[Step] = []
        self.last_date = ""  # the dataset's last day: the snapshot the benchmark examples are cut from

    def step(self, name: str, function: Callable[[], Any], detail: str = "") -> Any:
        print(f"=== [{len(self.steps) + 1}] {name}", flush=True)
        started = time.perf_counter()
        result = function()
        self.steps.append(Step(name, time.perf_counter() - started, detail))
        print(f"    {name}: {self.steps[-1].seconds:.1f} s", flush=True)
        return result


# ---------------------------------------------------------------------------------------------------------------
# Steps 1-7: the dataset through the real jobs.
# ---------------------------------------------------------------------------------------------------------------
def import_data(d: Driver) -> Dict:
    from data_sources.dataset_import import ImportConfig, import_dataset, write_imported_dataset

    config = ImportConfig(dataset=d.args.dataset, use_tags=not d.args.no_tags)
    return write_imported_dataset(import_dataset(config), d.raw)


def prepare_tables(d: Driver, manifest: Dict) -> Dict[str, Any]:
    """Steps 2-7. Returns what later steps need (the last day, the SID model's metrics)."""
    from pipelines import (assign_sids, build_benchmark_examples, fit_feature_transform, train_query_tokenizer,
                           train_sid_model, update_histories, validate_inputs)

    first, last = manifest["first_date"], manifest["last_date"]
    d.last_date = last
    span_days = len(manifest["dates"])
    emb = [f"--embedding_dim={manifest['embedding_dim']}"]
    root = [f"--output_root={d.out}"]
    d.step("validate_inputs", lambda: validate_inputs.run(
        [f"--start_date={first}", f"--end_date={last}", f"--input_root={d.raw}", *root, *emb, *d.runner]))
    sid_model = os.path.join(d.out, "sid_model")
    d.step("train_sid_model", lambda: train_sid_model.train(train_sid_model.parse_args(
        [f"--videos={d.out}/validated/videos", f"--date={last}", f"--output={sid_model}",
         f"--codebook_size={d.args.codebook_size}", f"--steps={d.args.sid_steps}", f"--seed={d.args.seed}",
         "--overwrite"])))
    d.step("assign_sids", lambda: assign_sids.run([f"--date={last}", *root, *emb, *d.runner]))
    d.step("update_histories", lambda: update_histories.run(
        [f"--date={last}", f"--backfill_days={span_days}", "--max_history_watches=1000000",
         f"--max_history_searches={d.args.max_searches}", *root, *d.runner]))
    if manifest["totals"][schemas.SEARCH_EVENTS]:
        d.step("train_query_tokenizer", lambda: train_query_tokenizer.run(
            [f"--start_date={first}", f"--end_date={last}", *root, *d.runner]))
    else:
        d.step("train_query_tokenizer (item titles)", lambda: title_tokenizer(d))
    d.step("fit_feature_transform", lambda: fit_feature_transform.run(
        [f"--date={last}", f"--reference_days={span_days}", *root, *d.runner]))
    sequence = [f"--date={last}", "--full_depth_sids", f"--max_tokens={d.args.max_tokens}",
                f"--max_watches={d.args.max_tokens}", f"--max_searches={d.args.max_searches}",
                f"--max_train_positions={d.args.max_train_positions}", f"--train_targets={d.args.train_targets}",
                f"--seed={d.args.seed}"]
    summary = d.step("build_benchmark_examples", lambda: build_benchmark_examples.run([*sequence, *root, *d.runner]))
    with open(os.path.join(sid_model, "metrics.json")) as handle:
        sid_metrics = json.load(handle)
    return {"last_date": last, "examples_summary": summary, "sid_metrics": sid_metrics}


def title_tokenizer(d: Driver) -> Dict:
    """The query tokenizer trained on the item titles, written as train_query_tokenizer writes it."""
    import pyarrow.parquet as pq

    from tokenminds_model import manifest as manifest_lib
    from tokenminds_model.query_tokenizer import ARTIFACT_KIND, METADATA_FILENAME, train_query_tokenizer

    titles = pq.read_table(os.path.join(d.raw, schemas.CATALOG_DIR, "items.parquet"), columns=["title"])["title"]
    directory = os.path.join(d.out, "query_tokenizer")
    staged = manifest_lib.staged_artifact_dir(directory, ARTIFACT_KIND, legacy_markers=(METADATA_FILENAME,))
    try:
        tokenizer = train_query_tokenizer(titles.to_pylist(), 2000, seed=d.args.seed)
        tokenizer.write_files(staged)
        manifest_lib.publish_artifact(staged, directory, ARTIFACT_KIND, extra={"version": tokenizer.version},
                                      legacy_markers=(METADATA_FILENAME,))
    except BaseException:
        manifest_lib.discard_staged(staged)
        raise
    return tokenizer.metadata()


# ---------------------------------------------------------------------------------------------------------------
# Steps 8-9: models and evaluation.
# ---------------------------------------------------------------------------------------------------------------
def examples_root(d: Driver) -> str:
    from pipelines.build_benchmark_examples import benchmark_dir

    return benchmark_dir(d.out, d.last_date)


def split_dir(d: Driver, split: str) -> str:
    from pipelines.build_benchmark_examples import split_dir as split_of

    return split_of(examples_root(d), split)


def read_split(d: Driver, split: str, limit: Optional[int] = None) -> Dict[str, np.ndarray]:
    """A split's records as arrays (file order), at most ``limit`` of them."""
    from tokenminds_model import data as data_lib

    names = ["user_id", "tokens", "length", "targets", "target_video_id"]
    spec = data_lib.load_feature_spec(split_dir(d, split))
    names += ["soft_features"] if "soft_features" in spec else []
    columns: Dict[str, List[np.ndarray]] = {n: [] for n in names}
    rows = 0
    for batch in data_lib.numpy_batches([split_dir(d, split)], 512, seed=None, drop_remainder=False,
                                        feature_spec={n: spec[n] for n in names}):
        for name in names:
            columns[name].append(batch[name])
        rows += len(batch["length"])
        if limit is not None and rows >= limit:
            break
    return {n: np.concatenate(v)[:limit] for n, v in columns.items()}


def read_sequences(d: Driver) -> Dict[str, List[str]]:
    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(examples_root(d), "sequences"))
    return dict(zip(table["user_id"].to_pylist(), table["video_ids"].to_pylist()))


def train_popularity(sequences: Dict[str, List[str]]) -> Dict[str, int]:
    """How often each item is a training interaction (every watch but each user's last two)."""
    counts: Dict[str, int] = {}
    for videos in sequences.values():
        for video in videos[:-2]:
            counts[video] = counts.get(video, 0) + 1
    return counts


def seen_items(d: Driver, sequences: Dict[str, List[str]], user_ids: np.ndarray, held_out: int):
    """Per record, the items its user interacted with before the held-out one(s) (masked when ranking), or None
    with ``--keep_seen``."""
    if d.args.keep_seen:
        return None
    users = [u.decode() if isinstance(u, bytes) else str(u) for u in np.asarray(user_ids).reshape(-1)]
    return [set(sequences[u][:-held_out]) for u in users]


def train_tokenminds(d: Driver, catalogue, popularity: Dict[str, int],
                     sequences: Dict[str, List[str]]) -> Dict[str, Any]:
    from tokenminds_model import ranking
    from tokenminds_model.item_ranking import ItemRanker
    from tokenminds_model.train import EarlyStopping, train

    validation = read_split(d, "validation", d.args.validation_users)
    exclude = seen_items(d, sequences, validation["user_id"], held_out=2)
    ranker: Dict[str, ItemRanker] = {}

    def validate(config, params) -> Dict[str, float]:
        if "model" not in ranker:  # built once: later calls only swap parameters (no recompilation)
            from tokenminds_model.vocabulary import VocabularyLayout

            layout = VocabularyLayout.load_manifest(os.path.join(split_dir(d, "train"), "vocabulary.json"))
            ranker["model"] = ItemRanker(config, params, layout, catalogue, popularity, beam_size=d.args.beam_size)
        ranker["model"].set_params(params)
        values = ranking.metrics_from_ranks(ranker["model"].ranks(validation, exclude))
        print(f"    validation: recall@10 {values['recall@10']:.4f}, ndcg@10 {values['ndcg@10']:.4f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
        return values

    checkpoint = os.path.join(d.out, "models", "tokenminds")
    started = time.perf_counter()
    overrides = json.loads(d.args.model_overrides) if d.args.model_overrides else {}
    result = train([split_dir(d, "train")], checkpoint, preset=d.args.preset, steps=d.args.train_steps,
                   batch_size=d.args.batch_size, learning_rate=d.args.learning_rate, schedule=d.args.schedule,
                   warmup_steps=d.args.warmup_steps,
                   seed=d.args.seed, log_every=50, progress=not d.args.quiet, tensorboard=False,
                   early_stopping=EarlyStopping(validate, metric="ndcg@10", every=d.args.eval_every,
                                                patience=d.args.patience),
                   **{"max_tokens": d.args.max_tokens, "dropout": d.args.dropout, **overrides})
    return {"checkpoint": checkpoint, "result": result.summary()}


def evaluate_tokenminds(d: Driver, checkpoint: str, catalogue, popularity: Dict[str, int],
                        sequences: Dict[str, List[str]]) -> np.ndarray:
    from tokenminds_model.item_ranking import ItemRanker
    from tokenminds_model.model_checkpoints import load_model

    config, params, layout = load_model(checkpoint)
    test = read_split(d, "test")
    return ItemRanker(config, params, layout, catalogue, popularity, beam_size=d.args.beam_size).ranks(
        test, seen_items(d, sequences, test["user_id"], held_out=1))


def id_sequences(sequences: Dict[str, List[str]], users: Sequence[str]):
    """Items as ids 1..N (0 = padding), and per user (in ``users`` order) the id sequence."""
    items = sorted({v for videos in sequences.values() for v in videos})
    index = {v: i + 1 for i, v in enumerate(items)}
    return items, index, [np.asarray([index[v] for v in sequences[u]], np.int64) for u in users]


def run_baselines(d: Driver, sequences: Dict[str, List[str]], popularity: Dict[str, int],
                  test_users: Sequence[str]) -> Dict[str, Any]:
    """most_popular and SASRec on the same split, ranked over every item; returns ranks per model."""
    from tokenminds_model import ranking, sasrec

    users = sorted(sequences)
    items, index, seqs = id_sequences(sequences, users)
    position = {u: i for i, u in enumerate(users)}
    test = [seqs[position[u]] for u in test_users]
    counts = np.zeros(len(items) + 1)
    for video, n in popularity.items():
        counts[index[video]] = n
    popular_scores = ranking.most_popular_scores(counts)
    popular_scores[0] = -np.inf

    def ranks(scores: np.ndarray) -> np.ndarray:  # the test target's rank, seen items masked (unless --keep_seen)
        if not d.args.keep_seen:
            scores = ranking.exclude_seen(scores, [s[:-1] for s in test])
        return ranking.target_ranks(scores, np.array([s[-1] for s in test]))

    out: Dict[str, Any] = {"most_popular": {"ranks": ranks(np.tile(popular_scores, (len(test), 1)))}}

    config = sasrec.SASRecConfig(num_items=len(items), max_len=d.args.sasrec_max_len, seed=d.args.seed,
                                 time_budget_s=d.args.sasrec_time_budget_s, max_steps=d.args.sasrec_steps,
                                 eval_every=d.args.sasrec_eval_every, patience=d.args.patience)
    valid_users = [s for s in seqs if len(s) >= 3][:d.args.validation_users or None]
    started = time.perf_counter()
    result = sasrec.train_sasrec([s[:-2] for s in seqs], [s[:-2] for s in valid_users],
                                 np.array([s[-2] for s in valid_users]), config)
    scores = sasrec.score_users(result.params, config, [s[:-1] for s in test])
    out["sasrec"] = {"ranks": ranks(scores),
                     "best_step": result.best_step, "steps_run": result.steps_run,
                     "train_seconds": result.train_seconds, "wall_seconds": time.perf_counter() - started,
                     "num_params": result.num_params, "config": config.to_dict(), "history": result.history}
    return out


# ---------------------------------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------------------------------
def model_metrics(ranks: np.ndarray, seed: int) -> Dict[str, Any]:
    from tokenminds_model import ranking

    return {**ranking.metrics_from_ranks(ranks, KS), "ci95": ranking.bootstrap_ci(ranks, KS, seed=seed)}


def dataset_name(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


def write_report(d: Driver, metrics: Dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = d.args.output
    models = [m for m in MODELS if m in metrics["models"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("recall", "ndcg")):
        width = 0.8 / len(models)
        for i, model in enumerate(models):
            values = [metrics["models"][model][f"{metric}@{k}"] for k in KS]
            errors = np.array([[v - metrics["models"][model]["ci95"][f"{metric}@{k}"][0],
                                metrics["models"][model]["ci95"][f"{metric}@{k}"][1] - v] for k, v in zip(KS, values)])
            ax.bar(np.arange(len(KS)) + i * width, values, width, yerr=errors.T, capsize=3, label=model)
        ax.set_xticks(np.arange(len(KS)) + width * (len(models) - 1) / 2, [f"@{k}" for k in KS])
        ax.set_title(f"{metric.upper()} (test, full ranking, 95% CI)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "metrics.png"), dpi=100)
    plt.close(fig)
    curves = metrics["models"]["tokenminds"].get("validation", [])
    sas = metrics["models"].get("sasrec", {}).get("history", [])
    if curves or sas:
        fig, ax = plt.subplots(figsize=(6, 4))
        if curves:
            ax.plot([c["step"] for c in curves], [c["ndcg@10"] for c in curves], marker="o", label="tokenminds")
        if sas:
            ax.plot([h["step"] for h in sas], [h.get("ndcg@10", np.nan) for h in sas], marker=".", label="sasrec")
        ax.set_xlabel("training step")
        ax.set_ylabel("validation NDCG@10")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "validation.png"), dpi=100)
        plt.close(fig)

    ds = metrics["dataset"]
    seen_rule = ("items the user already interacted with are ranked too" if d.args.keep_seen else
                 "the items the user already interacted with are masked, as usual on data without repeat consumption")
    lines = [f"# Benchmark: {ds['name']}", "",
             f"Command: `{metrics['command']}`  ", f"Run: {metrics['finished_at']} on {metrics['platform']}", "",
             "## Dataset", "",
             f"- {ds['users']:,} users, {ds['items']:,} items, {ds['interactions']:,} interactions "
             f"({ds['first_date']} .. {ds['last_date']}); {ds['searches']:,} searches (tags)",
             f"- sequence length: mean {ds['mean_length']:.1f}, median {ds['median_length']:.0f}, "
             f"max {ds['max_length']:,}",
             f"- dropped by the import: {ds['dropped'] or 'nothing'}", "",
             "## Protocol", "",
             "Leave-one-out per user: the last interaction (in the source's order for equal timestamps) is the test "
             "item, the one before it validation, all earlier ones train. Every model ranks the **whole catalogue** "
             f"(no sampled negatives; {seen_rule}); Recall@k = target in the top k, NDCG@k = 1/log2(rank+2) on a "
             "hit. 95% intervals: percentile bootstrap over test users (1,000 draws).",
             f"- TokenMinds examples: one per training position ({metrics['examples']['train_note']}), "
             f"{metrics['examples']['counts']}; history = the most recent events before the target within "
             f"{d.args.max_tokens} tokens; items per {d.args.max_tokens}-token window: "
             f"{metrics['tokens']['items_per_window']} ({metrics['tokens']['tokens_per_watch']} tokens a watch; "
             f"{metrics['tokens']['items_per_1024']} per 1,024 tokens).",
             f"- Feature tokens kept: {metrics['tokens']['feature_names'] or 'none'}; constant on this data "
             f"(no token): {metrics['tokens']['constant_features'] or 'none'}.",
             f"- SIDs: {metrics['sids']}", "",
             "## Results (test split)", "",
             "| model | " + " | ".join(f"{m}@{k}" for m in ("recall", "ndcg") for k in KS) + " | steps | train s |",
             "|---|" + "---:|" * (2 * len(KS) + 2)]
    for model in models:
        entry = metrics["models"][model]
        cells = [f"{entry[f'{m}@{k}']:.4f} [{entry['ci95'][f'{m}@{k}'][0]:.3f}, {entry['ci95'][f'{m}@{k}'][1]:.3f}]"
                 for m in ("recall", "ndcg") for k in KS]
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {entry.get('steps', '')} | "
                     f"{entry.get('train_seconds', 0):.0f} |")
    lines += ["", "![metrics](metrics.png)", ""]
    if curves or sas:
        lines += ["![validation](validation.png)", "",
                  "(TokenMinds' validation masks seen items as the test does; SASRec's own validation during "
                  "training ranks them too, so its curve is not on the same scale.)", ""]
    lines += ["## Models", ""]
    for model in models:
        entry = metrics["models"][model]
        lines.append(f"- **{model}**: {entry.get('description', '')}")
    published = PUBLISHED.get(ds["name"])
    if published:
        lines += ["", "## Published figures (their own preprocessing; a guide, not a like-for-like comparison)", "",
                  "| model | recall@10 | ndcg@10 | source |", "|---|---:|---:|---|"]
        lines += [f"| {p['model']} | {p['recall@10']} | {p['ndcg@10']} | {p['source']} |" for p in published]
    lines += ["", "## Steps (wall clock)", "", "| step | seconds |", "|---|---:|"]
    lines += [f"| {s['name']} | {s['seconds']:.1f} |" for s in metrics["steps"]]
    with open(os.path.join(out, "report.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")


def dataset_stats(manifest: Dict, sequences: Dict[str, List[str]], name: str) -> Dict[str, Any]:
    lengths = np.array([len(v) for v in sequences.values()])
    return {"name": name, "users": len(sequences), "items": len({v for s in sequences.values() for v in s}),
            "catalogue": manifest["totals"][schemas.VIDEOS], "interactions": int(lengths.sum()),
            "searches": manifest["totals"][schemas.SEARCH_EVENTS], "first_date": manifest["first_date"],
            "last_date": manifest["last_date"], "mean_length": float(lengths.mean()),
            "median_length": float(np.median(lengths)), "max_length": int(lengths.max()),
            "dropped": {k: v for k, v in manifest["dropped"].items() if v}}


def token_stats(d: Driver) -> Dict[str, Any]:
    from transforms import features
    from tokenminds_model.vocabulary import VocabularyLayout
    from transforms.events import SequenceConfig

    layout = VocabularyLayout.load_manifest(os.path.join(split_dir(d, "train"), "vocabulary.json"))
    per_watch = SequenceConfig(full_depth_sids=True).watch_token_count(layout)
    transform = features.read_transform_metadata(os.path.join(d.out, "feature_transform"))
    return {"tokens_per_watch": per_watch, "items_per_window": d.args.max_tokens // per_watch,
            "items_per_1024": 1024 // per_watch, "feature_names": list(layout.feature_names),
            "constant_features": sorted(transform.get("constant_features", {}))}


# ---------------------------------------------------------------------------------------------------------------
# CLI.
# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipelines.benchmark", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="directory with interactions.parquet and items.parquet")
    parser.add_argument("--output", required=True, help="directory for metrics.json, report.md, plots and work/")
    parser.add_argument("--no_tags", action="store_true", help="ignore the dataset's tags.parquet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runner", default="FnApiRunner", help="Beam runner of the jobs")
    parser.add_argument("--keep_seen", action="store_true",
                        help="rank items the user already interacted with too (default: masked, the usual protocol "
                             "on data without repeat consumption)")
    parser.add_argument("--quiet", action="store_true", help="no training progress bar")
    # Token sequences and SIDs.
    parser.add_argument("--max_tokens", type=int, default=256, help="input tokens per example")
    parser.add_argument("--max_searches", type=int, default=50, help="searches a history may hold")
    parser.add_argument("--max_train_positions", type=int, default=0,
                        help="training examples per user: 0 = every training position")
    parser.add_argument("--train_targets", type=int, default=8,
                        help="next training items a training example targets (the paper's K look-ahead targets)")
    parser.add_argument("--codebook_size", type=int, default=64, help="SID codes per level (3 levels)")
    parser.add_argument("--sid_steps", type=int, default=2000, help="RQ-VAE training steps")
    # TokenMinds training (CPU defaults; on an accelerator raise --train_steps and the model size).
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--model_overrides", default=None, help='JSON of ModelConfig fields, e.g. {"d_model": 128}')
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--train_steps", type=int, default=5000, help="most steps (early stopping ends sooner)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--schedule", default="warmup_cosine", choices=("constant", "warmup_cosine"),
                        help="learning rate: linear warm-up, then cosine decay over --train_steps")
    parser.add_argument("--warmup_steps", type=int, default=200)
    parser.add_argument("--eval_every", type=int, default=500, help="steps between validations")
    parser.add_argument("--patience", type=int, default=4, help="validations without improvement before stopping")
    parser.add_argument("--validation_users", type=int, default=1000,
                        help="validation users scored during training (0: all)")
    parser.add_argument("--beam_size", type=int, default=64,
                        help="beam of the SID search (>= 20); every beam is expanded to items")
    # SASRec.
    parser.add_argument("--sasrec_max_len", type=int, default=50,
                        help="SASRec history length (the paper's 200 costs ~5x more per step on CPU)")
    parser.add_argument("--sasrec_steps", type=int, default=20000)
    parser.add_argument("--sasrec_eval_every", type=int, default=500)
    parser.add_argument("--sasrec_time_budget_s", type=float, default=600.0)
    parser.add_argument("--skip_sasrec", action="store_true")
    args, beam_args = parser.parse_known_args(argv)
    args.beam_args = beam_args
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    d = Driver(args)
    started = time.perf_counter()
    manifest = d.step("import", lambda: import_data(d))
    prepared = prepare_tables(d, manifest)

    from tokenminds_model.evaluate import read_catalogue
    from transforms.schemas import partition_dir

    sequences = read_sequences(d)
    popularity = train_popularity(sequences)
    catalogue = read_catalogue(partition_dir(d.out, schemas.VIDEO_SIDS, dt.date.fromisoformat(prepared["last_date"])))
    trained = d.step("train_tokenminds", lambda: train_tokenminds(d, catalogue, popularity, sequences))
    test_users = [u.decode() if isinstance(u, bytes) else u for u in read_split(d, "test")["user_id"].reshape(-1)]
    tokenminds_ranks = d.step("evaluate_tokenminds",
                              lambda: evaluate_tokenminds(d, trained["checkpoint"], catalogue, popularity, sequences))
    baselines = None if args.skip_sasrec else d.step(
        "baselines", lambda: run_baselines(d, sequences, popularity, test_users))

    result = trained["result"]
    models: Dict[str, Any] = {"tokenminds": {
        **model_metrics(tokenminds_ranks, args.seed), "steps": result["steps"], "best_step": result["best_step"],
        "train_seconds": next(s.seconds for s in d.steps if s.name == "train_tokenminds"),
        "num_params": result["num_params"], "validation": result["validation"],
        "description": f"encoder-decoder, preset {args.preset} {args.model_overrides or ''} "
                       f"({result['num_params']:,} parameters), {args.max_tokens} input tokens, batch "
                       f"{args.batch_size}, lr {args.learning_rate} ({args.schedule}), {args.train_targets} next "
                       f"items as targets per training example, dropout {args.dropout}; early stopping on "
                       f"validation NDCG@10 every {args.eval_every} steps (patience {args.patience}); best step "
                       f"{result['best_step']} of {result['steps']}; beam {args.beam_size} over full SIDs, "
                       "items of one SID by training popularity"}}
    if baselines:
        models["most_popular"] = {**model_metrics(baselines["most_popular"]["ranks"], args.seed),
                                  "description": "training-interaction counts, the same list for every user"}
        sas = baselines["sasrec"]
        models["sasrec"] = {**model_metrics(sas["ranks"], args.seed), "steps": sas["steps_run"],
                            "best_step": sas["best_step"], "train_seconds": sas["train_seconds"],
                            "num_params": sas["num_params"], "history": sas["history"], "config": sas["config"],
                            "description": f"SASRec (Kang & McAuley 2018) in JAX, {sas['num_params']:,} parameters, "
                                           f"{sas['config']['num_layers']} layers, d {sas['config']['d_model']}, "
                                           f"max length {sas['config']['max_len']}, loss {sas['config']['loss']}; "
                                           f"early stopping on validation NDCG@10; best step {sas['best_step']} of "
                                           f"{sas['steps_run']}"}
    import jax

    summary = prepared["examples_summary"] or {}
    metrics = {
        "command": "python -m pipelines.benchmark " + " ".join(argv if argv is not None else sys.argv[1:]),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": f"{jax.devices()[0].platform}, {os.cpu_count()} CPUs",
        "dataset": dataset_stats(manifest, sequences, dataset_name(args.dataset)),
        "protocol": "leave-one-out (last = test, second-to-last = validation), full ranking over every item",
        "examples": {"counts": {k: v["examples"] for k, v in summary.get("examples", {}).items()},
                     "users": summary.get("totals"),
                     "train_note": "every position" if not args.max_train_positions else
                     f"the last plus a seeded sample, at most {args.max_train_positions} per user"},
        "tokens": token_stats(d),
        "sids": {k: prepared["sid_metrics"].get(k) for k in ("items", "unique_sids", "full_sid_collision_rate",
                                                              "max_items_per_sid", "utilisation_per_level")},
        "models": models,
        "steps": [dataclasses.asdict(s) for s in d.steps],
        "wall_seconds": time.perf_counter() - started,
        "published": PUBLISHED.get(dataset_name(args.dataset), []),
    }
    with open(os.path.join(args.output, "metrics.json"), "w") as handle:
        json.dump(metrics, handle, indent=2, default=float)
    write_report(d, metrics)
    print(json.dumps({m: {k: round(v[k], 4) for k in ("recall@10", "ndcg@10")} for m, v in models.items()}))
    print(f"wrote {args.output}/metrics.json and report.md in {metrics['wall_seconds']:.0f} s")
    return metrics


if __name__ == "__main__":
    from pipelines.cli import run_main

    run_main(main)
