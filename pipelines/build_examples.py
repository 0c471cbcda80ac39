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
from apache_beam.io.parquetio import ReadFromParquet
from apache_beam.io.tfrecordio import WriteToTFRecord
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.cli import run_main, run_per_day
from pipelines.options import TokenMindsOptions, artifact_paths, processing_dates
from pipelines.update_histories import require_success, snapshot_dir
from tokenminds_model.checkpoints import read_sid_model_config
from tokenminds_model.query_tokenizer import QueryTokenizer
from tokenminds_model.vocabulary import VocabularyLayout
from transforms import examples, features, outputs, schemas, sequences

STATS_FILE = "stats.json"
FEATURE_SPEC_FILE = "feature_spec.json"
VOCABULARY_FILE = "vocabulary.json"


class BuildExamplesOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser):
        parser.add_argument("--examples_output", default=None,
                            help="Root of the examples output (default: <output_root>/examples).")
        parser.add_argument("--example_shards", type=int, default=4, help="Fixed number of TFRecord shards.")
        # The sequence and target options; defaults are the paper's figures.
        defaults = sequences.SequenceConfig()
        parser.add_argument("--prefix_len", type=int, default=defaults.prefix_len,
                            help="SID levels per watch in sequences (L < SID depth).")
        parser.add_argument("--full_depth_sids", action="store_true", help="Ablation: every SID level.")
        parser.add_argument("--max_tokens", type=int, default=defaults.max_tokens)
        parser.add_argument("--max_watches", type=int, default=defaults.max_watches)
        parser.add_argument("--max_searches", type=int, default=defaults.max_searches)
        parser.add_argument("--max_pieces_per_query", type=int, default=defaults.max_pieces_per_query)
        parser.add_argument("--feature_mode", choices=("hard", "soft"), default=defaults.feature_mode)
        parser.add_argument("--no_searches", action="store_true", help="Ablation: drop search queries.")
        parser.add_argument("--scenarios", default=",".join(defaults.scenarios),
                            help="Ablation: comma-separated scenarios to keep (e.g. LFV).")
        parser.add_argument("--max_targets", type=int, default=defaults.max_targets, help="K; 1 is an ablation.")
        parser.add_argument("--target_mode", choices=("lookahead", "next"), default=defaults.target_mode)
        parser.add_argument("--max_cutoffs_per_day", type=int, default=defaults.max_cutoffs_per_day)
        parser.add_argument("--session_gap_s", type=float, default=defaults.session_gap_s)
        parser.add_argument("--reward_like_weight", type=float, default=defaults.reward.like_weight)
        parser.add_argument("--reward_dislike_weight", type=float, default=defaults.reward.dislike_weight)
        parser.add_argument("--reward_min_watch_ratio", type=float, default=defaults.reward.min_watch_ratio)


def sequence_config(job: BuildExamplesOptions) -> sequences.SequenceConfig:
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


def examples_dir(output_root: str, job: BuildExamplesOptions, date: dt.date) -> str:
    return outputs.join(job.examples_output or outputs.join(output_root, "examples"), f"date={date.isoformat()}")


def build_day(pipeline: beam.Pipeline, date: dt.date, output_root: str, job: BuildExamplesOptions, artifacts,
              layout: VocabularyLayout, config: sequences.SequenceConfig, seed: int) -> str:
    day = date.isoformat()
    _, tokenizer_dir, transform_dir = artifacts
    snapshot_days = [date - dt.timedelta(days=1), date, date + dt.timedelta(days=1)]
    for snapshot_day in snapshot_days[1:]:
        require_success(snapshot_dir(output_root, snapshot_day), f"history snapshot of {snapshot_day}")
        snapshot_version = outputs.read_json_file(
            outputs.join(snapshot_dir(output_root, snapshot_day), "summary.json"))["sid_model_version"]
        if snapshot_version != layout.sid_model_version:
            raise ValueError(f"snapshot {snapshot_day} uses SID model {snapshot_version}, --sid_model is "
                             f"{layout.sid_model_version}")
    start, end = schemas.day_bounds(date)
    context = examples.ExampleBuildContext(layout=layout, config=config, seed=seed,
                                           query_tokenizer_dir=tokenizer_dir, feature_transform_dir=transform_dir,
                                           day_start_us=schemas.to_epoch_us(start), day_end_us=schemas.to_epoch_us(end),
                                           date=day)

    # 1. Read the three snapshots (the day before is optional: a first day has no history before it).
    snapshots = []
    for label, snapshot_day in zip(("Before", "Day", "After"), snapshot_days):
        directory = snapshot_dir(output_root, snapshot_day)
        if outputs.success_marker_exists(directory):
            snapshots.append(pipeline | f"Read{label}" >> ReadFromParquet(outputs.join(directory, "*.parquet")))
        else:
            snapshots.append(pipeline | f"No{label}" >> beam.Create([]))

    # 2. Build examples per active user.
    built = tuple(snapshots) | "BuildExamples" >> examples.BuildExamples(context)

    # 3. Write shards and dead letters, then stats.json and _SUCCESS.
    out_dir = examples_dir(output_root, job, date)
    dead_dir = schemas.partition_dir(outputs.join(output_root, schemas.DEAD_LETTER), "examples", date)
    writes = [built["examples"] | "WriteTFRecords" >> WriteToTFRecord(
                  outputs.join(out_dir, "part"), file_name_suffix=".tfrecord.gz", num_shards=job.example_shards,
                  shard_name_template=outputs.SHARD_TEMPLATE, compression_type=CompressionTypes.GZIP),
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


def run(argv: Optional[List[str]] = None) -> List[dict]:
    options = PipelineOptions(argv)
    common = options.view_as(TokenMindsOptions)
    job = options.view_as(BuildExamplesOptions)
    config = sequence_config(job)
    # Fail fast, before reading any data: every artifact must load and agree on one token space.
    artifacts = artifact_paths(options)
    layout = vocabulary_layout(*artifacts)
    spec = examples.feature_spec(config, layout)
    dead_root = outputs.join(common.output_root, schemas.DEAD_LETTER)

    def write_spec_and_vocabulary(date):
        out_dir = examples_dir(common.output_root, job, date)
        outputs.write_text_file(outputs.join(out_dir, FEATURE_SPEC_FILE), json.dumps(spec, indent=2) + "\n")
        layout.save_manifest(outputs.join(out_dir, VOCABULARY_FILE))

    # Days are independent of each other; a range builds them one after another, each as its daily run would.
    return run_per_day(
        options, processing_dates(options),
        build_day=lambda pipeline, date: build_day(pipeline, date, common.output_root, job, artifacts, layout,
                                                   config, common.seed),
        summary_path=lambda date: outputs.join(examples_dir(common.output_root, job, date), STATS_FILE),
        clear_dirs=lambda date: [examples_dir(common.output_root, job, date),
                                 schemas.partition_dir(dead_root, "examples", date)],
        before_run=write_spec_and_vocabulary)


def main(argv=None):
    for stats in run(argv):
        ex = stats["examples"]
        print(f"{stats['date']}: {ex['examples']} examples, {ex['mean_targets_per_example']:.2f} targets/example, "
              f"scenario mix {ex['target_scenario_mix']}, users {stats['totals']}")


if __name__ == "__main__":
    run_main(main)
