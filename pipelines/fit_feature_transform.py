"""Fit the per-watch feature transform (tensorflow-transform analyzers) on a reference day.

    python -m pipelines.fit_feature_transform --date=2026-01-01 --output_root=workdir/out --runner=FnApiRunner

Reads   <output_root>/histories/date=D/                   the reference day's user snapshots
Writes  <feature_transform>/transform_fn/, transformed_metadata/   the fitted tft transform (TF SavedModel)
        <feature_transform>/transform_fn_metadata.json     its version (content hash), reference day, sizes

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
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.cli import run_main
from pipelines.options import TokenMindsOptions, artifact_paths, is_dry_run, processing_dates
from pipelines.update_histories import require_success, snapshot_dir
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


def run(argv: Optional[List[str]] = None) -> Optional[dict]:
    options = PipelineOptions(argv)
    common = options.view_as(TokenMindsOptions)
    [date] = processing_dates(options) if common.date else [None]
    if date is None:
        raise ValueError("--date (the reference day) is required")
    _, _, output = artifact_paths(options)
    snapshots = snapshot_dir(common.output_root, date)
    require_success(snapshots, "the reference day's history snapshot")
    if not is_dry_run(options):
        outputs.replace_artifact_dir(output, features.METADATA_FILE)

    start, end = schemas.day_bounds(date)
    pipeline = beam.Pipeline(options=options)
    _ = (pipeline
         | "ReadSnapshots" >> ReadFromParquet(outputs.join(snapshots, "*.parquet"))
         | "ReferenceDayWatches" >> beam.ParDo(_ReferenceDayRows(schemas.to_epoch_us(start),
                                                                 schemas.to_epoch_us(end)))
         | "Fit" >> features.FitFeatureTransform(output, temp_dir=outputs.join(output, "tmp")))
    result = pipeline.run()
    if is_dry_run(options):
        return None
    result.wait_until_finish()
    counters = result.metrics().query(MetricsFilter().with_name("reference_watches"))["counters"]
    num_watches = sum(c.committed or c.attempted or 0 for c in counters)
    FileSystems.delete([outputs.join(output, "tmp")])  # tft's scratch space, created by this run
    return features.write_transform_metadata(output, date.isoformat(), int(num_watches))


def main(argv=None):
    metadata = run(argv)
    if metadata:
        print(f"feature transform {metadata['transform_fn_version']} fitted on {metadata['reference_date']} "
              f"({metadata['num_reference_watches']} watches)")


if __name__ == "__main__":
    run_main(main)
