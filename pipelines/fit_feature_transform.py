"""Fit the per-watch feature transform (tensorflow-transform analyzers) on a reference day.

    python -m pipelines.fit_feature_transform --date=2026-01-01 --output_root=workdir/out --runner=FnApiRunner

Reads   <output_root>/histories/date=D/                   the reference day's user snapshots
Writes  <feature_transform>/transform_fn/, transformed_metadata/   the fitted tft transform (TF SavedModel)
        <feature_transform>/transform_fn_metadata.json     its version (content hash), reference day, sizes
        <feature_transform>/_MANIFEST.json                 every file's size and sha256 (``tokenminds_model.manifest``)

The transform is fitted into a staging directory beside <feature_transform> and swapped in once the job succeeded,
so a failed run keeps the previous transform; a folder holding anything but a feature transform is refused before
the job starts.

Run once (and again only to deliberately re-fit): build_examples and refresh_users apply the saved transform
unchanged, so feature token ids stay stable across days and identical between training and serving.
"""
from __future__ import annotations

from typing import List, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.parquetio import ReadFromParquet
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter

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


JOB = JobSpec(name="fit_feature_transform", summary=__doc__.split("\n\n")[0],
              shared=("date", "output_root", "feature_transform"))


def run(argv: Optional[List[str]] = None) -> Optional[dict]:
    options = parse_job_options(argv, JOB)
    common = options.view_as(TokenMindsOptions)
    if not common.date:
        raise ValueError("--date (the reference day) is required")
    [date] = processing_dates(options)
    _, _, output = artifact_paths(options)
    snapshots = snapshot_dir(common.output_root, date)
    require_success(snapshots, "the reference day's history snapshot")
    staged = None
    if not is_dry_run(options):  # refuses someone else's folder before the job starts
        staged = manifest_lib.staged_artifact_dir(output, features.ARTIFACT_KIND,
                                                  legacy_markers=(features.METADATA_FILE,))
    target = staged or output
    try:
        start, end = schemas.day_bounds(date)
        console.prepare_dry_run(options)  # a dry run only: names the job and the file its JSON goes to
        pipeline = beam.Pipeline(options=options)
        _ = (pipeline
             | "ReadSnapshots" >> ReadFromParquet(outputs.join(snapshots, "*.parquet"))
             | "ReferenceDayWatches" >> beam.ParDo(_ReferenceDayRows(schemas.to_epoch_us(start),
                                                                     schemas.to_epoch_us(end)))
             | "Fit" >> features.FitFeatureTransform(target, temp_dir=outputs.join(target, "tmp")))
        result = pipeline.run()
        if staged is None:
            console.report_dry_run(pipeline, options, result)
            return None
        result.wait_until_finish()
        counters = result.metrics().query(MetricsFilter().with_name("reference_watches"))["counters"]
        num_watches = sum(c.committed or c.attempted or 0 for c in counters)
        tft_scratch = outputs.join(staged, "tmp")
        if FileSystems.exists(tft_scratch):
            FileSystems.delete([tft_scratch])  # tft's scratch space, created by this run
        metadata = features.write_transform_metadata(staged, date.isoformat(), int(num_watches))
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
        print(f"feature transform {metadata['transform_fn_version']} fitted on {metadata['reference_date']} "
              f"({metadata['num_reference_watches']} watches)")


if __name__ == "__main__":
    run_main(main)
