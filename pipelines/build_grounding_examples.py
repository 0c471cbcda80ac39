"""Build SID-grounding examples for pre-training: each catalogue item's title pieces -> its SID, as of day D.

    python -m pipelines.build_grounding_examples --date=2026-01-06 --input_root=workdir/raw \
        --output_root=workdir/out --runner=FnApiRunner
    python -m tokenminds_model.train --examples workdir/out/grounding_examples/date=2026-01-06 \
        --output=workdir/out/models/grounded --steps=300
    python -m tokenminds_model.train --init_from=workdir/out/models/grounded --examples <behaviour days> ...

Reads   <output_root>/video_sids/date=D/         every video's SID as of D (assign_sids; needs _SUCCESS)
        --catalog (default <input_root>/_catalog/items.parquet)
                                                 item text: video_id, title (the dataset importer and the sample
                                                 generator write it; schemas.CATALOG_SCHEMA)
        --sid_model, --query_tokenizer, --feature_transform   the token space, as for build_examples
Writes  <output_root>/grounding_examples/date=D/part-*.tfrecord.gz, feature_spec.json, vocabulary.json, stats.json
                                                 one example per item (``transforms.grounding``), the layout and
                                                 feature spec of build_examples with the same sequence options, so
                                                 the trainer mixes them with behaviour examples or fine-tunes on them
        <output_root>/dead_letter/grounding_examples/date=D/   items without a SID, SIDs without a title, ...

The sequence options (``--prefix_len``, ``--max_tokens``, ``--max_targets``, ``--feature_mode``, ``--scenarios``) must
be the ones the behaviour examples were built with: the trainer refuses examples whose feature spec differs.
"""
from __future__ import annotations

import argparse
import datetime as dt
from typing import List, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.parquetio import ReadFromParquet
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.assign_sids import sids_dir, sids_model_version
from pipelines.build_examples import (SEQUENCE_RANGES, STATS_FILE, SequenceOptions, check_sequence_options,
                                      sequence_config, vocabulary_layout, write_example_manifests)
from pipelines.cli import run_main, run_per_day
from pipelines.options import (ARTIFACTS, DAYS, JobSpec, TokenMindsOptions, artifact_paths, parse_job_options,
                               processing_dates)
from pipelines.update_histories import require_success
from transforms import examples, grounding, outputs, schemas


class BuildGroundingExamplesOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser):
        parser.add_argument("--catalog", default=None,
                            help="Parquet file(s) of item text (video_id, title); default "
                                 "<input_root>/_catalog/items.parquet.")
        parser.add_argument("--grounding_shards", type=int, default=1, help="TFRecord shards of the output.")


def grounding_dir(output_root: str, date: dt.date) -> str:
    return schemas.partition_dir(output_root, grounding.GROUNDING_EXAMPLES, date)


def dead_letter_dir(output_root: str, date: dt.date) -> str:
    return schemas.partition_dir(outputs.join(output_root, schemas.DEAD_LETTER), grounding.GROUNDING_EXAMPLES, date)


def catalog_path(options: PipelineOptions) -> str:
    common, job = options.view_as(TokenMindsOptions), options.view_as(BuildGroundingExamplesOptions)
    return job.catalog or outputs.join(common.input_root, schemas.CATALOG_DIR, "items.parquet")


def build_day(pipeline: beam.Pipeline, date: dt.date, options: PipelineOptions, layout, config, spec,
              staged=lambda path: path) -> None:
    common, job = options.view_as(TokenMindsOptions), options.view_as(BuildGroundingExamplesOptions)
    day, output_root = date.isoformat(), common.output_root
    sids_in = sids_dir(output_root, date)
    require_success(sids_in, "SID assignment")
    version = sids_model_version(output_root, date)
    if version != layout.sid_model_version:
        raise ValueError(f"the SIDs of {day} were assigned by SID model {version}, --sid_model is "
                         f"{layout.sid_model_version}")
    catalog_files = catalog_path(options)
    if not FileSystems.match([catalog_files])[0].metadata_list:
        raise FileNotFoundError(f"no item catalogue at {catalog_files}: import a dataset (pipelines.import_dataset) "
                                "or generate the sample, which write <input_root>/_catalog/items.parquet, or pass "
                                "--catalog")
    out_dir = staged(grounding_dir(output_root, date))

    # 1. Read every video's SID as of D and the catalogue's titles.
    sids = pipeline | "ReadSids" >> ReadFromParquet(outputs.join(sids_in, "*.parquet"),
                                                    columns=["video_id", "scenario", "sid"])
    catalog = pipeline | "ReadCatalog" >> ReadFromParquet(catalog_files, columns=["video_id", "item_id", "title"])

    # 2. Join by video id and build one example per item with a SID and a title; the rest are dead letters.
    built = (sids, catalog) | "BuildGroundingExamples" >> grounding.BuildGroundingExamples(
        artifact_paths(options)[1], layout, config, spec, day)

    # 3. Write shards and dead letters, then stats.json and _SUCCESS.
    writes = [built["examples"] | "WriteTFRecords" >> outputs.WriteTFRecordShards(out_dir, job.grounding_shards),
              built["dead"] | "WriteDead" >> outputs.WriteParquetShards(staged(dead_letter_dir(output_root, date)),
                                                                        schemas.DEAD_LETTER_SCHEMA)]
    counts = [sids | "CountSidsIn" >> outputs.CountRows(schemas.VIDEO_SIDS, day, outputs.IN),
              catalog | "CountCatalogIn" >> outputs.CountRows(grounding.CATALOG, day, outputs.IN),
              built["counts"]]
    summary = (counts | "AllCounts" >> beam.Flatten()
               | "Summarize" >> outputs.SummarizeCounts(extra={
                   "job": "build_grounding_examples", "date": day, "catalog": catalog_files,
                   "sequence_config": repr(config), "versions": {
                       "sid_model": layout.sid_model_version, "query_tokenizer": layout.query_tokenizer_version,
                       "transform_fn": layout.transform_fn_version}}))
    _ = summary | "Finish" >> outputs.WriteSummaryAndSuccess(outputs.join(out_dir, STATS_FILE), [out_dir],
                                                             after=writes)


JOB = JobSpec(name="build_grounding_examples", summary=__doc__.split("\n\n")[0],
              option_classes=(BuildGroundingExamplesOptions, SequenceOptions),
              shared=DAYS + ARTIFACTS + ("output_root", "input_root"),
              ranges={**SEQUENCE_RANGES, "grounding_shards": (1, 10000)}, check=check_sequence_options)


def run(argv: Optional[List[str]] = None) -> List[dict]:
    options = parse_job_options(argv, JOB)
    root = options.view_as(TokenMindsOptions).output_root
    config = sequence_config(options.view_as(SequenceOptions))
    layout = vocabulary_layout(*artifact_paths(options))  # fails fast on missing or disagreeing artifacts
    spec = examples.feature_spec(config, layout)

    def write_spec_and_vocabulary(date, day_outputs):
        write_example_manifests(day_outputs.staged(grounding_dir(root, date)), spec, layout)

    return run_per_day(
        options, processing_dates(options), JOB.name,
        build_day=lambda pipeline, date, out: build_day(pipeline, date, options, layout, config, spec, out.staged),
        output_dirs=lambda date: [dead_letter_dir(root, date), grounding_dir(root, date)],
        summary_path=lambda date: outputs.join(grounding_dir(root, date), STATS_FILE),
        before_run=write_spec_and_vocabulary)


def main(argv=None):
    for summary in run(argv):
        made = summary["tables"].get(schemas.VIDEO_SIDS, {}).get(summary["date"], {}).get("rows_out", 0)
        print(f"{summary['date']}: {made} grounding examples "
              f"({ {k.split('.', 1)[1]: v for k, v in summary['stats'].items()} }); "
              f"dead {summary['totals']['dead_by_reason']}")


if __name__ == "__main__":
    run_main(main)
