"""Train the SentencePiece query tokenizer on a deterministic sample of validated search queries.

    python -m pipelines.train_query_tokenizer --date=2026-01-01 --output_root=workdir/out \
        --query_tokenizer=workdir/out/query_tokenizer --runner=FnApiRunner

Reads   <validated_root>/search_events/date=D/ for --date, or every day of --start_date..--end_date
Writes  <query_tokenizer>/query_tokenizer.model   the SentencePiece model (its serialized proto; no pickle)
        <query_tokenizer>/query_tokenizer.json    vocab size, model type, version (hash of the model), sample size

The sample is chosen by a keyed hash (``transforms.query_sampling.SampleQueries``), so it is identical across runs
and runners; training then runs on one worker, since SentencePiece trains in memory on the whole sample.
"""
from __future__ import annotations

import argparse
from typing import List, Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.cli import run_main
from pipelines.options import TokenMindsOptions, artifact_paths, is_dry_run, processing_dates, validated_root
from tokenminds_model.query_tokenizer import METADATA_FILENAME, QueryTokenizer, train_query_tokenizer
from transforms import outputs, schemas
from transforms.query_sampling import SampleQueries
from transforms.sources import ReadTable, SourceConfig


class TrainQueryTokenizerOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser):
        parser.add_argument("--query_vocab_size", type=int, default=2000,
                            help="Upper bound on SentencePiece pieces (a small corpus yields fewer).")
        parser.add_argument("--query_model_type", choices=("unigram", "bpe"), default="unigram")
        parser.add_argument("--max_training_queries", type=int, default=200_000)


def _train_and_save(queries, directory, vocab_size, model_type, seed):
    tokenizer = train_query_tokenizer(queries, vocab_size, model_type, seed=seed)
    tokenizer.save(directory)
    return tokenizer.metadata()


def run(argv: Optional[List[str]] = None) -> Optional[dict]:
    options = PipelineOptions(argv)
    common = options.view_as(TokenMindsOptions)
    job = options.view_as(TrainQueryTokenizerOptions)
    validated_tables = validated_root(options)
    _, directory, _ = artifact_paths(options)
    source = SourceConfig(kind="parquet", input_root=validated_tables)
    if not is_dry_run(options):
        outputs.replace_artifact_dir(directory, METADATA_FILENAME)

    pipeline = beam.Pipeline(options=options)
    searches = [pipeline | f"ReadSearches {d}" >> ReadTable(schemas.SEARCH_EVENTS, d, source)
                for d in processing_dates(options)]
    _ = (searches | "AllSearches" >> beam.Flatten()
         | "Sample" >> SampleQueries(job.max_training_queries, seed=common.seed)
         | "CollectSample" >> beam.combiners.ToList()
         | "TrainAndSave" >> beam.Map(_train_and_save, directory=directory, vocab_size=job.query_vocab_size,
                                      model_type=job.query_model_type, seed=common.seed))
    result = pipeline.run()
    if is_dry_run(options):
        return None
    result.wait_until_finish()
    return QueryTokenizer.load(directory).metadata()


def main(argv=None):
    metadata = run(argv)
    if metadata:
        print(f"query tokenizer {metadata['version']}: {metadata['vocab_size']} pieces from "
              f"{metadata['num_training_queries']} queries")


if __name__ == "__main__":
    run_main(main)
