"""Build the downstream adaptation artifacts of the catalog as of day D: prefix embeddings, SID n-grams, SID pieces.

    python -m pipelines.build_adaptation --date=2026-01-04 --output_root=workdir/out --runner=FnApiRunner

Reads   <validated_root>/videos/date=*/            the catalog as of D: every complete partition <= D
        <output_root>/video_sids/date=D/            assign_sids' output: every video's SID as of D (needs _SUCCESS)
        --sid_model/config.json                     SID depth and codebook size (or --sid_levels, --sid_codebook_size)
Writes  <output_root>/adaptation/date=D/prefix_embeddings/part-*.parquet
                                                    per scenario and SID prefix of length 1..L: the mean content
                                                    embedding of its videos and their number
        <output_root>/adaptation/date=D/sid_ngram_vocab.json    ids of SID n-grams counted over the catalog (0 = OOV)
        <output_root>/adaptation/date=D/sid_spm.model, sid_spm.json
                                                    SentencePiece over SID symbol strings, and the symbol map
        <output_root>/adaptation/date=D/summary.json, _SUCCESS  row accounting and artifact metadata; _SUCCESS last
        <output_root>/dead_letter/adaptation/date=D/            catalog videos without a SID, SIDs without a catalog
                                                                video, unusable embeddings or SIDs

The pure logic (and the loaders serving uses) is in ``tokenminds_model.adaptation``, the Beam steps in
``transforms.adaptation``. A rerun replaces the day's output completely.
"""
from __future__ import annotations

import argparse
import datetime as dt
from typing import List, Optional, Tuple

import apache_beam as beam
from apache_beam.io.parquetio import ReadFromParquet
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.assign_sids import catalog_dates, sids_dir, sids_model_version
from pipelines.cli import run_main, run_per_day
from pipelines.options import (DAYS, JobSpec, TokenMindsOptions, artifact_paths, parse_job_options, processing_dates,
                               validated_root)
from pipelines.update_histories import require_success
from tokenminds_model.adaptation import NGRAM_VOCAB_FILENAME, SPM_MODEL_TYPES, SidSymbols
from transforms import adaptation, outputs, schemas
from transforms.sources import ReadTableBatches, SourceConfig, batch_rows

SUMMARY_FILE = "summary.json"


class BuildAdaptationOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser):
        parser.add_argument("--sid_levels", type=int, default=None,
                            help="SID depth L (default: from the --sid_model checkpoint that assigned the SIDs).")
        parser.add_argument("--sid_codebook_size", type=int, default=None,
                            help="Codes per SID level (default: from the --sid_model checkpoint).")
        parser.add_argument("--ngram_min_count", type=int, default=1,
                            help="n-grams seen in fewer catalog SIDs get the OOV id.")
        parser.add_argument("--max_ngram_vocab", type=int, default=None,
                            help="Keep at most this many n-grams, the most frequent (default: all).")
        parser.add_argument("--ngram_contiguous", action="store_true",
                            help="Also give ids to contiguous n-grams not starting at level 0.")
        parser.add_argument("--sid_spm_vocab_size", type=int, default=2048,
                            help="Upper bound on SentencePiece pieces; must exceed the distinct (level, code) "
                                 "symbols of the catalog (a small catalog yields fewer pieces).")
        parser.add_argument("--sid_spm_model_type", choices=SPM_MODEL_TYPES, default="bpe")
        parser.add_argument("--prefix_embedding_shards", type=int, default=1)


def adaptation_dir(output_root: str, date: dt.date) -> str:
    return schemas.partition_dir(output_root, adaptation.ADAPTATION, date)


def dead_letter_dir(output_root: str, date: dt.date) -> str:
    return schemas.partition_dir(outputs.join(output_root, schemas.DEAD_LETTER), adaptation.ADAPTATION, date)


def sid_shape(options: PipelineOptions, version: str) -> Tuple[int, int]:
    """(levels, codebook_size) of the SIDs: the options, else the config of the SID model that assigned them."""
    job = options.view_as(BuildAdaptationOptions)
    levels, codebook_size = job.sid_levels, job.sid_codebook_size
    if levels is None or codebook_size is None:
        from tokenminds_model.checkpoints import read_sid_model_config  # imports JAX: only when needed

        sid_model = artifact_paths(options)[0]
        config = read_sid_model_config(sid_model)
        if config["version"] != version:
            raise ValueError(f"the SIDs were assigned by SID model {version}, --sid_model {sid_model} is "
                             f"{config['version']}; pass the matching --sid_model or --sid_levels/--sid_codebook_size")
        levels = levels or config["config"]["levels"]
        codebook_size = codebook_size or config["config"]["codebook_size"]
    SidSymbols(levels, codebook_size)  # fails here, before any data is read, if there is no symbol for each code
    return levels, codebook_size


def build_day(pipeline: beam.Pipeline, date: dt.date, options: PipelineOptions, staged=lambda path: path) -> None:
    common, job = options.view_as(TokenMindsOptions), options.view_as(BuildAdaptationOptions)
    day, output_root = date.isoformat(), common.output_root
    sids_in = sids_dir(output_root, date)
    require_success(sids_in, "SID assignment")
    version = sids_model_version(output_root, date)
    levels, codebook_size = sid_shape(options, version)
    validated_tables = validated_root(options)
    read_days = catalog_dates(validated_tables, date)
    if date not in read_days:
        raise FileNotFoundError(f"validated videos for {date} are not complete under {validated_tables}")
    validated = SourceConfig(kind="parquet", input_root=validated_tables)
    out_dir = staged(adaptation_dir(output_root, date))

    # 1. Read the catalog as of D and its SIDs.
    videos = (pipeline | "ReadVideos" >> ReadTableBatches(schemas.VIDEOS, read_days, validated)  # one read
              | "VideoRows" >> beam.FlatMap(batch_rows, columns=schemas.input_schema(schemas.VIDEOS).names))
    sids = pipeline | "ReadSids" >> ReadFromParquet(outputs.join(sids_in, "*.parquet"),
                                                    columns=["video_id", "scenario", "sid"])

    # 2. Join embeddings with SIDs; every row is joined, dead-lettered or (a republished copy) dropped.
    joined = (videos, sids) | "JoinCatalogSids" >> adaptation.JoinCatalogSids(day, levels, codebook_size,
                                                                              common.embedding_dim)

    # 3. Build the artifacts from the joined catalog.
    prefixes = joined["joined"] | "PrefixEmbeddings" >> adaptation.PrefixEmbeddings()
    vocab = joined["joined"] | "NgramVocab" >> adaptation.BuildNgramVocab(
        outputs.join(out_dir, NGRAM_VOCAB_FILENAME), job.ngram_contiguous, job.ngram_min_count, job.max_ngram_vocab)
    pieces = joined["joined"] | "SidPieces" >> adaptation.TrainSidPieces(
        out_dir, SidSymbols(levels, codebook_size), job.sid_spm_vocab_size, job.sid_spm_model_type, common.seed)

    # 4. Write, then the summary (with what each artifact step reported) and _SUCCESS.
    writes = [prefixes | "WritePrefixEmbeddings" >> outputs.WriteParquetShards(
                  outputs.join(out_dir, adaptation.PREFIX_EMBEDDINGS), adaptation.PREFIX_EMBEDDINGS_SCHEMA,
                  num_shards=job.prefix_embedding_shards),
              joined["dead"] | "WriteDead" >> outputs.WriteParquetShards(staged(dead_letter_dir(output_root, date)),
                                                                         schemas.DEAD_LETTER_SCHEMA),
              vocab, pieces]
    counts = [videos | "CountVideosIn" >> outputs.CountRows(schemas.VIDEOS, day, outputs.IN),
              sids | "CountSidsIn" >> outputs.CountRows(schemas.VIDEO_SIDS, day, outputs.IN),
              joined["joined"] | "CountVideosOut" >> outputs.CountRows(schemas.VIDEOS, day, outputs.OUT),
              joined["joined"] | "CountSidsOut" >> outputs.CountRows(schemas.VIDEO_SIDS, day, outputs.OUT),
              joined["dead"] | "CountDead" >> beam.Map(
                  lambda row: ((row["table"], day, outputs.DEAD, row["reason"]), 1)),
              joined["counts"],
              prefixes | "CountPrefixes" >> outputs.CountRows(adaptation.PREFIX_EMBEDDINGS, day, outputs.STAT,
                                                              "rows")]
    summary = (counts | "AllCounts" >> beam.Flatten()
               | "Summarize" >> outputs.SummarizeCounts(extra={
                   "job": "build_adaptation", "date": day, "sid_model_version": version, "sid_levels": levels,
                   "sid_codebook_size": codebook_size, "catalog_days_read": [d.isoformat() for d in read_days]})
               | "AddArtifacts" >> beam.Map(lambda s, v, p: {**s, "sid_ngram_vocab": v, "sid_spm": p},
                                            v=beam.pvalue.AsSingleton(vocab), p=beam.pvalue.AsSingleton(pieces)))
    _ = summary | "Finish" >> outputs.WriteSummaryAndSuccess(outputs.join(out_dir, SUMMARY_FILE), [out_dir],
                                                             after=writes)


JOB = JobSpec(name="build_adaptation", summary=__doc__.split("\n\n")[0], option_classes=(BuildAdaptationOptions,),
              shared=DAYS + ("output_root", "validated_root", "sid_model", "embedding_dim", "seed"),
              ranges={"sid_levels": (1, None), "sid_codebook_size": (2, None), "ngram_min_count": (1, None),
                      "max_ngram_vocab": (1, None), "sid_spm_vocab_size": (8, None),
                      "prefix_embedding_shards": (1, 10000)})


def run(argv: Optional[List[str]] = None) -> List[dict]:
    options = parse_job_options(argv, JOB)
    output_root = options.view_as(TokenMindsOptions).output_root
    # Days are independent; a range builds each day as its daily run would.
    return run_per_day(
        options, processing_dates(options), JOB.name,
        build_day=lambda pipeline, date, out: build_day(pipeline, date, options, out.staged),
        output_dirs=lambda date: [dead_letter_dir(output_root, date), adaptation_dir(output_root, date)],
        summary_path=lambda date: outputs.join(adaptation_dir(output_root, date), SUMMARY_FILE))


def main(argv=None):
    for summary in run(argv):
        joined = summary["tables"].get(schemas.VIDEO_SIDS, {}).get(summary["date"], {}).get("rows_out", 0)
        prefixes = summary["stats"].get(f"{adaptation.PREFIX_EMBEDDINGS}.rows", 0)
        print(f"{summary['date']}: {joined} videos joined, {prefixes} prefix embeddings, "
              f"{summary['sid_ngram_vocab']['size']} n-gram ids, {summary['sid_spm']['vocab_size']} SID pieces; "
              f"dead {summary['totals']['dead_by_reason']}")


if __name__ == "__main__":
    run_main(main)
