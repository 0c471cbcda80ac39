"""Train the SentencePiece query tokenizer on a deterministic sample of validated search queries.

    python -m pipelines.train_query_tokenizer --date=2026-01-01 --output_root=workdir/out \
        --query_tokenizer=workdir/out/query_tokenizer --runner=FnApiRunner

Reads   <validated_root>/search_events/date=D/ for --date, or every day of --start_date..--end_date
Writes  <query_tokenizer>/query_tokenizer.model   the SentencePiece model (its serialized proto; no pickle)
        <query_tokenizer>/query_tokenizer.json    vocab size, model type, version (hash of the model), sample size
        <query_tokenizer>/_MANIFEST.json          both files' sizes and sha256 (``tokenminds_model.manifest``)

The tokenizer is written into a staging directory beside <query_tokenizer> and swapped in once the job succeeded,
so a failed run keeps the previous tokenizer; a folder holding anything but a query tokenizer is refused before the
job starts.

The sample is chosen by a keyed hash (``transforms.query_sampling.SampleQueries``), so it is identical across runs
and runners; training then runs on one worker, since SentencePiece trains in memory on the whole sample.
"""
from __future__ import annotations

import argparse
from typing import List, Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import console
from pipelines.cli import run_main
from pipelines.options import (DAYS, JobSpec, TokenMindsOptions, artifact_paths, is_dry_run, parse_job_options,
                               processing_dates, validated_root)
from tokenminds_model import manifest as manifest_lib
from tokenminds_model.query_tokenizer import (ARTIFACT_KIND, METADATA_FILENAME, QueryTokenizer,
                                              train_query_tokenizer)
from transforms import schemas
from transforms.query_sampling import SampleQueries
from transforms.sources import ReadTableBatches, SourceConfig, batch_rows


class TrainQueryTokenizerOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser):
        parser.add_argument("--query_vocab_size", type=int, default=2000,
                            help="Upper bound on SentencePiece pieces (a small corpus yields fewer).")
        parser.add_argument("--query_model_type", choices=("unigram", "bpe"), default="unigram",
                            help="SentencePiece model type.")
        parser.add_argument("--max_training_queries", type=int, default=200_000,
                            help="Queries in the deterministic training sample.")


def _train_and_save(queries, directory, vocab_size, model_type, seed):
    """On one worker: train on the whole sample, write into the driver's staging directory (published by it)."""
    tokenizer = train_query_tokenizer(queries, vocab_size, model_type, seed=seed)
    tokenizer.write_files(directory)
    return tokenizer.metadata()


JOB = JobSpec(name="train_query_tokenizer", summary=__doc__.split("\n\n")[0],
              option_classes=(TrainQueryTokenizerOptions,),
              shared=DAYS + ("output_root", "validated_root", "query_tokenizer", "seed"),
              ranges={"query_vocab_size": (8, 1 << 20), "max_training_queries": (1, None)})


def run(argv: Optional[List[str]] = None) -> Optional[dict]:
    options = parse_job_options(argv, JOB)
    common = options.view_as(TokenMindsOptions)
    job = options.view_as(TrainQueryTokenizerOptions)
    validated_tables = validated_root(options)
    _, directory, _ = artifact_paths(options)
    source = SourceConfig(kind="parquet", input_root=validated_tables)
    staged = None
    if not is_dry_run(options):  # refuses someone else's folder before the job starts
        staged = manifest_lib.staged_artifact_dir(directory, ARTIFACT_KIND, legacy_markers=(METADATA_FILENAME,))
    try:
        console.prepare_dry_run(options)  # a dry run only: names the job and the file its JSON goes to
        pipeline = beam.Pipeline(options=options)
        # The whole range in one read (not one branch per date), as rows for the sampler.
        _ = (pipeline
             | "ReadSearches" >> ReadTableBatches(schemas.SEARCH_EVENTS, processing_dates(options), source)
             | "AllSearches" >> beam.FlatMap(batch_rows, columns=schemas.input_schema(schemas.SEARCH_EVENTS).names)
             | "Sample" >> SampleQueries(job.max_training_queries, seed=common.seed)
             | "CollectSample" >> beam.combiners.ToList()
             | "TrainAndSave" >> beam.Map(_train_and_save, directory=staged or directory,
                                          vocab_size=job.query_vocab_size, model_type=job.query_model_type,
                                          seed=common.seed))
        result = pipeline.run()
        if staged is None:
            console.report_dry_run(pipeline, options, result)
            return None
        result.wait_until_finish()
        version = QueryTokenizer.load(staged, verify=False).version
        manifest_lib.publish_artifact(staged, directory, ARTIFACT_KIND, extra={"version": version},
                                      legacy_markers=(METADATA_FILENAME,))
    except BaseException:
        if staged is not None:
            manifest_lib.discard_staged(staged)
        raise
    return QueryTokenizer.load(directory).metadata()


def main(argv=None):
    metadata = run(argv)
    if metadata:
        print(f"query tokenizer {metadata['version']}: {metadata['vocab_size']} pieces from "
              f"{metadata['num_training_queries']} queries")


if __name__ == "__main__":
    run_main(main)
