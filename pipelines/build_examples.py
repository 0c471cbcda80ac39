"""Build day D's training examples: interleaved token sequences cut at cutoffs in D, look-ahead targets, TFRecords.

    python -m pipelines.build_examples --date=2026-01-02 --output_root=workdir/out --runner=FnApiRunner

Reads   <output_root>/histories/date={D-1,D,D+1}/   user snapshots: history before D, the day, and the look-ahead
                                                    window into D+1 (so day D is built once D+1 is folded)
        --sid_model, --query_tokenizer, --feature_transform   the artifacts the token space is built from
Writes  <output_root>/examples/date=D/part-SSSSS-of-NNNNN.tfrecord.gz   gzip TFRecords of tf.train.Example
        <output_root>/examples/date=D/feature_spec.json     every feature's dtype and fixed shape
        <output_root>/examples/date=D/vocabulary.json       the token space and the artifact versions used
        <output_root>/examples/date=D/stats.json            examples, targets per example, length histogram,
                                                            scenario mix, reward histogram, row accounting
        <output_root>/examples/date=D/_SUCCESS              last
        <output_root>/dead_letter/examples/date=D/          users whose examples could not be built

A rerun replaces the day's output completely. --start_date/--end_date builds each day of a range, each day's output
identical to its daily run. The TFRecord schema is documented in transforms/examples.py and the README.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
from typing import List, Optional

import apache_beam as beam
from apache_beam.io.parquetio import ReadFromParquetBatched
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import daily_plan
from pipelines.cli import run_main, run_per_day
from pipelines.options import (JobSpec, TokenMindsOptions, artifact_paths, parse_job_options,
                               processing_dates)
from pipelines.update_histories import require_success, snapshot_dir, snapshot_sid_model_version
from tokenminds_model.checkpoints import read_sid_model_config
from tokenminds_model.query_tokenizer import QueryTokenizer
from tokenminds_model.vocabulary import VocabularyLayout
from transforms import examples, features, histories, outputs, schemas, sequences

STATS_FILE = "stats.json"
FEATURE_SPEC_FILE = "feature_spec.json"
VOCABULARY_FILE = "vocabulary.json"


class BuildExamplesOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser):
        parser.add_argument("--examples_output", default=None,
                            help="Root of the examples output (default: <output_root>/examples).")
        parser.add_argument("--example_shards", type=int, default=4, help="Fixed number of TFRecord shards.")


class SequenceOptions(PipelineOptions):
    """sequence options (training and serving must use the same values; defaults are the paper's figures)

    How histories become token sequences and targets: build_examples, build_eval_sets and refresh_users read them.
    """

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser):
        defaults = sequences.SequenceConfig()
        parser.add_argument("--prefix_len", type=int, default=defaults.prefix_len,
                            help="SID levels per watch in sequences (L < SID depth).")
        parser.add_argument("--full_depth_sids", action="store_true", help="Ablation: every SID level.")
        parser.add_argument("--max_tokens", type=int, default=defaults.max_tokens,
                            help="Input tokens per sequence; older events are cut first.")
        parser.add_argument("--max_watches", type=int, default=defaults.max_watches,
                            help="Most recent watches a sequence may hold.")
        parser.add_argument("--max_searches", type=int, default=defaults.max_searches,
                            help="Most recent searches a sequence may hold.")
        parser.add_argument("--max_pieces_per_query", type=int, default=defaults.max_pieces_per_query,
                            help="SentencePiece pieces kept per query.")
        parser.add_argument("--feature_mode", choices=("hard", "soft"), default=defaults.feature_mode,
                            help="Per-watch features as feature tokens (hard) or one soft vector (soft).")
        parser.add_argument("--no_searches", action="store_true", help="Ablation: drop search queries.")
        parser.add_argument("--scenarios", default=",".join(defaults.scenarios),
                            help="Ablation: comma-separated scenarios to keep (e.g. LFV).")
        parser.add_argument("--max_targets", type=int, default=defaults.max_targets, help="K; 1 is an ablation.")
        parser.add_argument("--target_mode", choices=("lookahead", "next"), default=defaults.target_mode,
                            help="Targets from the 24 h look-ahead window, or the next watch (ablation).")
        parser.add_argument("--max_cutoffs_per_day", type=int, default=defaults.max_cutoffs_per_day,
                            help="Examples (cutoffs) per active user-day.")
        parser.add_argument("--session_gap_s", type=float, default=defaults.session_gap_s,
                            help="Inactivity (seconds) that starts a new session; cutoffs fall at session starts.")
        parser.add_argument("--reward_like_weight", type=float, default=defaults.reward.like_weight,
                            help="Reward added for a like (target sampling is reward-proportional).")
        parser.add_argument("--reward_dislike_weight", type=float, default=defaults.reward.dislike_weight,
                            help="Reward taken away for a dislike.")
        parser.add_argument("--reward_min_watch_ratio", type=float, default=defaults.reward.min_watch_ratio,
                            help="Watches below this share of the video's duration have reward 0.")


def sequence_config(job: SequenceOptions) -> sequences.SequenceConfig:
    reward = sequences.RewardConfig(like_weight=job.reward_like_weight, dislike_weight=job.reward_dislike_weight,
                                    min_watch_ratio=job.reward_min_watch_ratio)
    return sequences.SequenceConfig(
        prefix_len=job.prefix_len, full_depth_sids=job.full_depth_sids, max_tokens=job.max_tokens,
        max_watches=job.max_watches, max_searches=job.max_searches, max_pieces_per_query=job.max_pieces_per_query,
        feature_mode=job.feature_mode, include_searches=not job.no_searches,
        scenarios=tuple(s.strip() for s in job.scenarios.split(",") if s.strip()), max_targets=job.max_targets,
        target_mode=job.target_mode, max_cutoffs_per_day=job.max_cutoffs_per_day, session_gap_s=job.session_gap_s,
        reward=reward)


def vocabulary_layout(sid_model: str, query_tokenizer: str, feature_transform: str) -> VocabularyLayout:
    """The token space of these artifacts: SID levels and codebook, query pieces, feature buckets, versions."""
    sid_config = read_sid_model_config(sid_model)
    tokenizer = QueryTokenizer.load(query_tokenizer)
    transform = features.read_transform_metadata(feature_transform)
    return VocabularyLayout(sid_levels=sid_config["config"]["levels"],
                            codebook_size=sid_config["config"]["codebook_size"],
                            query_vocab_size=tokenizer.vocab_size, feature_sizes=transform["feature_sizes"],
                            sid_model_version=sid_config["version"], query_tokenizer_version=tokenizer.version,
                            transform_fn_version=transform["transform_fn_version"])


def write_example_manifests(out_dir: str, spec, layout: VocabularyLayout) -> None:
    """``feature_spec.json`` and ``vocabulary.json`` of an example directory: what the trainer checks agree across
    every directory it reads (behaviour and grounding examples alike)."""
    outputs.write_text_file(outputs.join(out_dir, FEATURE_SPEC_FILE), json.dumps(spec, indent=2) + "\n")
    layout.save_manifest(outputs.join(out_dir, VOCABULARY_FILE))


def examples_dir(output_root: str, job: BuildExamplesOptions, date: dt.date) -> str:
    return outputs.join(job.examples_output or outputs.join(output_root, "examples"), f"date={date.isoformat()}")


def build_day(pipeline: beam.Pipeline, date: dt.date, output_root: str, job: BuildExamplesOptions, artifacts,
              layout: VocabularyLayout, config: sequences.SequenceConfig, seed: int, staged=lambda path: path) -> str:
    day = date.isoformat()
    _, tokenizer_dir, transform_dir = artifacts
    snapshot_days = [date - dt.timedelta(days=1), date, date + dt.timedelta(days=1)]
    for snapshot_day in snapshot_days[1:]:
        require_success(snapshot_dir(output_root, snapshot_day), f"history snapshot of {snapshot_day}")
        snapshot_version = snapshot_sid_model_version(output_root, snapshot_day)
        if snapshot_version != layout.sid_model_version:
            raise ValueError(f"snapshot {snapshot_day} uses SID model {snapshot_version}, --sid_model is "
                             f"{layout.sid_model_version}")
    start, end = schemas.day_bounds(date)
    context = examples.ExampleBuildContext(layout=layout, config=config, seed=seed,
                                           query_tokenizer_dir=tokenizer_dir, feature_transform_dir=transform_dir,
                                           day_start_us=schemas.to_epoch_us(start), day_end_us=schemas.to_epoch_us(end),
                                           date=day)

    # 1-2. Build the examples of the users active on D from the three snapshots (the day before is optional: a first
    #      day has no history), in columnar batches. Snapshots written with one shard count hold the same users in
    #      part s, sorted, so each shard is a merge join of its three parts and nothing is shuffled; otherwise the
    #      snapshots are read as Arrow tables and joined by user.
    directories = [directory if outputs.success_marker_exists(directory) else None
                   for directory in (snapshot_dir(output_root, d) for d in snapshot_days)]
    shard_counts = {histories.snapshot_shard_count(d) for d in directories if d is not None}
    if len(shard_counts) == 1 and None not in shard_counts:
        built = pipeline | "BuildExamplesByShard" >> examples.BuildExamplesByShard(context, directories,
                                                                                   shard_counts.pop())
    else:
        snapshots = []
        for label, directory in zip(("Before", "Day", "After"), directories):
            if directory is None:
                snapshots.append(pipeline | f"No{label}" >> beam.Create([]))
            else:
                snapshots.append(pipeline | f"Read{label}" >> ReadFromParquetBatched(
                    outputs.join(directory, "*.parquet"), columns=examples.SNAPSHOT_COLUMN_NAMES))
        built = tuple(snapshots) | "BuildExamples" >> examples.BuildExamples(context)

    # 3. Write shards and dead letters, then stats.json and _SUCCESS.
    out_dir = staged(examples_dir(output_root, job, date))
    dead_dir = staged(dead_letter_dir(output_root, date))
    writes = [built["examples"] | "WriteTFRecords" >> outputs.WriteTFRecordShards(out_dir, job.example_shards),
              built["dead"] | "WriteDead" >> outputs.WriteParquetShards(dead_dir, schemas.DEAD_LETTER_SCHEMA)]
    summary = (built["counts"] | "Summarize" >> outputs.SummarizeCounts(extra={
        "job": "build_examples", "date": day, "seed": seed, "sequence_config": repr(config),
        "versions": {"sid_model": layout.sid_model_version, "query_tokenizer": layout.query_tokenizer_version,
                     "transform_fn": layout.transform_fn_version}}))
    stats = (summary | "AddExampleStats" >> beam.Map(lambda s, st: {**s, "examples": st},
                                                       st=beam.pvalue.AsSingleton(built["stats"])))
    _ = stats | "Finish" >> outputs.WriteSummaryAndSuccess(outputs.join(out_dir, STATS_FILE), [out_dir],
                                                           after=writes)
    return out_dir


def dead_letter_dir(output_root: str, date: dt.date) -> str:
    return schemas.partition_dir(outputs.join(output_root, schemas.DEAD_LETTER), "examples", date)


SEQUENCE_RANGES = {"prefix_len": (1, None), "max_tokens": (8, 1 << 20), "max_watches": (1, None),
                   "max_searches": (0, None), "max_pieces_per_query": (1, None), "max_targets": (1, None),
                   "max_cutoffs_per_day": (1, None), "session_gap_s": (0, None), "reward_min_watch_ratio": (0, 1)}


def check_sequence_options(options: PipelineOptions) -> None:
    config = sequence_config(options.view_as(SequenceOptions))
    unknown = sorted(set(config.scenarios) - set(schemas.SCENARIOS))
    if unknown or not config.scenarios:
        raise ValueError(f"--scenarios names unknown scenarios {unknown}; expected a subset of {schemas.SCENARIOS}")


JOB = JobSpec(name="build_examples", summary=__doc__.split("\n\n")[0],
              option_classes=(BuildExamplesOptions, SequenceOptions),
              shared=daily_plan.get_task("build_examples").reads,
              ranges={**SEQUENCE_RANGES, "example_shards": (1, 10000)}, check=check_sequence_options)


def run(argv: Optional[List[str]] = None) -> List[dict]:
    options = parse_job_options(argv, JOB)
    common = options.view_as(TokenMindsOptions)
    job = options.view_as(BuildExamplesOptions)
    config = sequence_config(options.view_as(SequenceOptions))
    # Fail fast, before reading any data: every artifact must be intact and agree on one token space.
    artifacts = artifact_paths(options)
    layout = vocabulary_layout(*artifacts)
    spec = examples.feature_spec(config, layout)
    root = common.output_root

    def write_spec_and_vocabulary(date, day_outputs):
        write_example_manifests(day_outputs.staged(examples_dir(root, job, date)), spec, layout)

    # Days are independent of each other; a range builds them one after another, each as its daily run would.
    return run_per_day(
        options, processing_dates(options), JOB.name,
        build_day=lambda pipeline, date, out: build_day(pipeline, date, root, job, artifacts, layout, config,
                                                        common.seed, out.staged),
        output_dirs=lambda date: [dead_letter_dir(root, date), examples_dir(root, job, date)],
        summary_path=lambda date: outputs.join(examples_dir(root, job, date), STATS_FILE),
        before_run=write_spec_and_vocabulary)


def main(argv=None):
    for stats in run(argv):
        ex = stats["examples"]
        print(f"{stats['date']}: {ex['examples']} examples, {ex['mean_targets_per_example']:.2f} targets/example, "
              f"scenario mix {ex['target_scenario_mix']}, users {stats['totals']}")


if __name__ == "__main__":
    run_main(main)
