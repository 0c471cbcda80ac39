"""Fit the per-watch feature transform (tensorflow-transform analyzers) on a reference day.

    python -m pipelines.fit_feature_transform --date=2026-01-01 --output_root=workdir/out --runner=FnApiRunner

Reads   <output_root>/histories/date=D/                   the reference day's user snapshots
Writes  <feature_transform>/transform_fn/, transformed_metadata/   the fitted tft transform (TF SavedModel)
        <feature_transform>/transform_fn_metadata.json     its version (content hash), reference day, sizes
        <feature_transform>/_MANIFEST.json                 every file's size and sha256 (``tokenminds_model.manifest``)

The reference watches are those of the ``--reference_days`` days ending on ``--date`` (default 1: that day alone),
all read from the snapshot of ``--date`` (which holds each user's earlier watches too, up to its history cap). The
fitted transform is applied to them in the same job, and a feature whose bucket is the same for every reference
watch carries no information: it is left out of the metadata's ``feature_sizes`` (recorded under
``constant_features``), so it gets no token range and no token per watch. ``--keep_constant_features`` keeps all.

The transform is fitted into a staging directory beside <feature_transform> and swapped in once the job succeeded,
so a failed run keeps the previous transform; a folder holding anything but a feature transform is refused before
the job starts.

Run once (and again only to deliberately re-fit): build_examples and refresh_users apply the saved transform
unchanged, so feature token ids stay stable across days and identical between training and serving.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
from typing import List, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.parquetio import ReadFromParquet
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import console
from pipelines.cli import run_main
from pipelines.options import (JobSpec, TokenMindsOptions, artifact_paths, is_dry_run, parse_job_options,
                               processing_dates)
from pipelines.update_histories import require_success, snapshot_dir
from tokenminds_model import manifest as manifest_lib
from transforms import features, outputs, schemas


class _ReferenceDayRows(beam.DoFn):
    def __init__(self, day_start_us: int, day_end_us: int):
        super().__init__()
        self._bounds = (day_start_us, day_end_us)
        self._watches = Metrics.counter("fit_feature_transform", "reference_watches")

    def process(self, snapshot):
        rows = features.snapshot_raw_feature_rows(snapshot, *self._bounds)
        self._watches.inc(len(rows))
        yield from rows


class FitFeatureTransformOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser):
        parser.add_argument("--reference_days", type=int, default=1,
                            help="Fit on the watches of this many days ending on --date (a huge value: every watch "
                                 "the snapshot holds).")
        parser.add_argument("--keep_constant_features", action="store_true", default=False,
                            help="Give every feature hard tokens, even one whose bucket is the same for every "
                                 "reference watch (the fixed layout); by default such features are left out.")


JOB = JobSpec(name="fit_feature_transform", summary=__doc__.split("\n\n")[0],
              option_classes=(FitFeatureTransformOptions,), shared=("date", "output_root", "feature_transform"),
              ranges={"reference_days": (1, None)})


def reference_start(date: dt.date, reference_days: int) -> dt.datetime:
    """The start of the first of the ``reference_days`` days ending on ``date``, clamped to the epoch."""
    day_start, _ = schemas.day_bounds(date)
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    back = reference_days - 1
    if back >= (day_start - epoch).days:
        return epoch
    return day_start - dt.timedelta(days=back)


def run(argv: Optional[List[str]] = None) -> Optional[dict]:
    options = parse_job_options(argv, JOB)
    common = options.view_as(TokenMindsOptions)
    if not common.date:
        raise ValueError("--date (the reference day) is required")
    [date] = processing_dates(options)
    job = options.view_as(FitFeatureTransformOptions)
    _, _, output = artifact_paths(options)
    snapshots = snapshot_dir(common.output_root, date)
    require_success(snapshots, "the reference day's history snapshot")
    staged = None
    if not is_dry_run(options):  # refuses someone else's folder before the job starts
        staged = manifest_lib.staged_artifact_dir(output, features.ARTIFACT_KIND,
                                                  legacy_markers=(features.METADATA_FILE,))
    target = staged or output
    try:
        _, end = schemas.day_bounds(date)
        start = reference_start(date, job.reference_days)
        console.prepare_dry_run(options)  # a dry run only: names the job and the file its JSON goes to
        tft_scratch = outputs.join(target, "tmp")
        buckets_path = outputs.join(tft_scratch, features.REFERENCE_BUCKETS_FILE)
        pipeline = beam.Pipeline(options=options)
        _ = (pipeline
             | "ReadSnapshots" >> ReadFromParquet(outputs.join(snapshots, "*.parquet"))
             | "ReferenceDayWatches" >> beam.ParDo(_ReferenceDayRows(schemas.to_epoch_us(start),
                                                                     schemas.to_epoch_us(end)))
             | "Fit" >> features.FitFeatureTransform(target, temp_dir=tft_scratch, buckets_path=buckets_path))
        result = pipeline.run()
        if staged is None:
            console.report_dry_run(pipeline, options, result)
            return None
        result.wait_until_finish()
        counters = result.metrics().query(MetricsFilter().with_name("reference_watches"))["counters"]
        num_watches = sum(c.committed or c.attempted or 0 for c in counters)
        with FileSystems.open(buckets_path) as handle:
            reference_buckets = json.loads(handle.read().decode("utf-8"))
        if FileSystems.exists(tft_scratch):
            FileSystems.delete([tft_scratch])  # tft's scratch space (and the reference buckets), created by this run
        metadata = features.write_transform_metadata(
            staged, date.isoformat(), int(num_watches), reference_buckets=reference_buckets,
            keep_constant_features=job.keep_constant_features, reference_start_date=start.date().isoformat())
        manifest_lib.publish_artifact(staged, output, features.ARTIFACT_KIND,
                                      extra={"version": metadata["transform_fn_version"]},
                                      legacy_markers=(features.METADATA_FILE,))
    except BaseException:
        if staged is not None:
            manifest_lib.discard_staged(staged)
        raise
    return metadata


def main(argv=None):
    metadata = run(argv)
    if metadata:
        span = metadata["reference_date"]
        if metadata["reference_start_date"] != span:
            span = f"{metadata['reference_start_date']}..{span}"
        print(f"feature transform {metadata['transform_fn_version']} fitted on {span} "
              f"({metadata['num_reference_watches']} watches); hard-token features: "
              f"{', '.join(metadata['feature_sizes']) or 'none'}"
              + (f"; constant, left out: {', '.join(metadata['constant_features'])}"
                 if metadata["constant_features"] and not metadata["keep_constant_features"] else ""))


if __name__ == "__main__":
    run_main(main)
