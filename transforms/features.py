"""Per-watch feature tokens with tensorflow-transform: fitted once on a reference day, reused unchanged after.

Bucket boundaries (quantiles) and categorical vocabularies are computed by ``tft_beam`` analyzers over a reference
day's watches and saved as a ``transform_fn``. Every later day's training examples and every nightly batch
inference apply that same ``transform_fn``, so a feature token id means the same thing in training and serving, and
from one day to the next.

Raw inputs are ``transforms.sequences.RAW_WATCH_FEATURE_COLUMNS``; outputs are, per layout feature, a bucket id
below the number of ids the vocabulary reserves for it (hard tokens), plus z-scored values for the soft-token
feature vector.

Which features get hard tokens is decided at fit time: a feature whose buckets are all equal on the reference
watches (implicit-feedback data: a constant watch ratio, one surface, one device, no likes) carries no information,
so it is left out of the metadata's ``feature_sizes`` (recorded under ``constant_features`` with its bucket), and the
vocabulary layout built from that metadata gives it no token range and no token per watch. The soft-token vector
keeps every feature.

The fitted transform is an artifact directory (``transform_fn/``, ``transformed_metadata/``,
``transform_fn_metadata.json`` and a ``_MANIFEST.json`` of every file: ``tokenminds_model.manifest``), written
through a staging directory by ``pipelines.fit_feature_transform``. :func:`read_transform_metadata`, what drivers
call before any data is read, verifies every file (vocabulary assets included) against the manifest and the recorded
``transform_fn_version`` against the manifest's, so a damaged transform fails at once, naming the file, instead of
silently remapping feature tokens. ``WatchFeaturizer`` (workers, after their driver verified) does not re-hash
unless asked to.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Dict, List, Mapping, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from tokenminds_model import manifest as manifest_lib
from tokenminds_model.vocabulary import DEFAULT_FEATURE_SIZES
from transforms import outputs
from transforms.sequences import (FIRST_EVENT_GAP_S, RAW_CATEGORICAL_COLUMNS, RAW_FLAG_COLUMNS,
                                  RAW_NUMERIC_COLUMNS, RAW_WATCH_FEATURE_COLUMNS, build_timeline,
                                  raw_watch_features)

FEATURE_SIZES: Dict[str, int] = dict(DEFAULT_FEATURE_SIZES)
# Soft-token vector: z-scored numerics, the two flags, one-hot surface and device.
SOFT_NUMERIC = ("watch_ratio_z", "watch_time_z", "time_gap_z")
SOFT_FEATURE_DIM = len(SOFT_NUMERIC) + 2 + FEATURE_SIZES["surface"] + FEATURE_SIZES["device"]
TRANSFORM_OUTPUTS = tuple(FEATURE_SIZES) + SOFT_NUMERIC
# WatchFeaturizer pads every TensorFlow call to a multiple of this many rows (64 floats: a multiple of every CPU
# SIMD packet width, 4 to 16 floats), so that each row's features are the same whatever call it is in.
PAD_ROWS_TO = 64
METADATA_FILE = "transform_fn_metadata.json"
ARTIFACT_KIND = "feature_transform"
# Written by FitFeatureTransform (when asked): the distinct buckets each feature took on the reference watches.
REFERENCE_BUCKETS_FILE = "reference_buckets.json"


def raw_feature_spec():
    import tensorflow as tf

    spec = {name: tf.io.FixedLenFeature([], tf.float32) for name in RAW_NUMERIC_COLUMNS}
    spec.update({name: tf.io.FixedLenFeature([], tf.int64) for name in RAW_FLAG_COLUMNS})
    spec.update({name: tf.io.FixedLenFeature([], tf.string) for name in RAW_CATEGORICAL_COLUMNS})
    return spec


def stable_z_score(x):
    """tft.scale_to_z_score, except that a (near-)constant column maps to 0.

    On a constant column the fitted variance is floating-point noise rather than 0 (it depends on the combine order),
    so dividing by it gives values in the millions that differ from run to run. Below a relative floor the column
    carries no information: it is centred, not scaled.
    """
    import tensorflow as tf
    import tensorflow_transform as tft

    mean, var = tft.mean(x), tft.var(x)
    floor = 1e-6 * tf.maximum(1.0, tf.square(mean))
    return tf.where(var > floor, (x - mean) * tf.math.rsqrt(tf.maximum(var, floor)), tf.zeros_like(x))


def preprocessing_fn(inputs):
    """The feature transform. Analyzers (bucketize, vocabulary, z-score) are fitted on the reference day only."""
    import tensorflow as tf
    import tensorflow_transform as tft

    watch_time = tf.math.log1p(inputs["watch_time_s"])
    gap = inputs["time_gap_s"]
    is_first = gap <= FIRST_EVENT_GAP_S
    log_gap = tf.math.log1p(tf.maximum(gap, 0.0))
    # The first event of a timeline has no gap: it gets bucket 0 of its own, and real gaps are fitted without it.
    gap_bucket = tft.bucketize(log_gap, num_buckets=FEATURE_SIZES["time_gap"] - 1,
                               weights=tf.cast(tf.logical_not(is_first), tf.float32)) + 1
    return {
        "watch_ratio": tft.bucketize(inputs["watch_ratio"], num_buckets=FEATURE_SIZES["watch_ratio"]),
        "watch_time": tft.bucketize(watch_time, num_buckets=FEATURE_SIZES["watch_time"]),
        "time_gap": tf.where(is_first, tf.zeros_like(gap_bucket), gap_bucket),
        # Most frequent values get their own id; everything else (new surfaces appearing later) shares one OOV id.
        "surface": tft.compute_and_apply_vocabulary(inputs["surface"], top_k=FEATURE_SIZES["surface"] - 1,
                                                    num_oov_buckets=1, vocab_filename="surface"),
        "device": tft.compute_and_apply_vocabulary(inputs["device"], top_k=FEATURE_SIZES["device"] - 1,
                                                   num_oov_buckets=1, vocab_filename="device"),
        "liked": inputs["liked"],
        "disliked": inputs["disliked"],
        "watch_ratio_z": stable_z_score(inputs["watch_ratio"]),
        "watch_time_z": stable_z_score(watch_time),
        "time_gap_z": stable_z_score(log_gap),
    }


def raw_feature_rows(raw_columns: Mapping[str, np.ndarray]) -> List[Dict]:
    """Column arrays (``raw_watch_features``) -> one instance dict per watch, as tft_beam consumes them."""
    n = len(raw_columns["watch_ratio"])
    return [{name: (raw_columns[name][i].item() if hasattr(raw_columns[name][i], "item")
                    else raw_columns[name][i]) for name in RAW_WATCH_FEATURE_COLUMNS} for i in range(n)]


def snapshot_raw_feature_rows(snapshot: Dict, day_start_us: int, day_end_us: int) -> List[Dict]:
    """The reference day's watches of one user snapshot, as raw feature rows (gaps over the whole timeline)."""
    # Gaps need the searches' times, not their pieces.
    searches = [{**search, "pieces": []} for search in snapshot["searches"]]
    timeline = build_timeline(snapshot["watches"], searches)
    columns = raw_watch_features(timeline.watches, timeline.watch_gaps_s())
    in_day = [day_start_us <= w.event_ts_us < day_end_us for w in timeline.watches]
    return [row for row, keep in zip(raw_feature_rows(columns), in_day) if keep]


def _bucket_values(column) -> np.ndarray:
    """A transformed output column (an Arrow array, possibly of one-element lists) as a flat numpy array."""
    import pyarrow as pa

    while pa.types.is_list(column.type) or pa.types.is_large_list(column.type) \
            or pa.types.is_fixed_size_list(column.type):
        column = column.flatten()
    return np.asarray(column.to_numpy(zero_copy_only=False))


class DistinctBuckets(beam.CombineFn):
    """Transformed record batches -> {feature: sorted distinct bucket ids}, for every feature of FEATURE_SIZES.

    Buckets are clipped as :class:`WatchFeaturizer` clips them, so they are the ids the feature tokens would carry.
    """

    def create_accumulator(self):
        return {name: set() for name in FEATURE_SIZES}

    def add_input(self, accumulator, element):
        batch = element[0] if isinstance(element, tuple) else element  # (RecordBatch, passthrough features)
        for name, size in FEATURE_SIZES.items():
            values = _bucket_values(batch.column(batch.schema.get_field_index(name)))
            accumulator[name].update(np.unique(np.clip(values.astype(np.int64), 0, size - 1)).tolist())
        return accumulator

    def merge_accumulators(self, accumulators):
        merged = self.create_accumulator()
        for accumulator in accumulators:
            for name, buckets in accumulator.items():
                merged[name] |= buckets
        return merged

    def extract_output(self, accumulator):
        return {name: sorted(int(b) for b in accumulator[name]) for name in FEATURE_SIZES}


def _write_json(value, path: str) -> str:
    outputs.write_text_file(path, json.dumps(value, sort_keys=True) + "\n")
    return path


class FitFeatureTransform(beam.PTransform):
    """Raw feature rows -> a transform_fn written to ``output_dir`` (a PCollection of its path, when done).

    With ``buckets_path``, the fitted transform is also applied to the same rows (in the pipeline) and the distinct
    bucket ids each feature took (:class:`DistinctBuckets`) are written there as JSON: what
    :func:`constant_features` reads to tell the features that carry no information on the reference data.
    """

    def __init__(self, output_dir: str, temp_dir: Optional[str] = None, buckets_path: Optional[str] = None):
        super().__init__()
        self._output_dir, self._temp_dir, self._buckets_path = output_dir, temp_dir, buckets_path

    def expand(self, rows):
        import tensorflow_transform.beam as tft_beam
        from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

        metadata = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(raw_feature_spec()))
        with tft_beam.Context(temp_dir=self._temp_dir or tempfile.mkdtemp(prefix="tft_")):
            if self._buckets_path is None:
                transform_fn = (rows, metadata) | "Analyze" >> tft_beam.AnalyzeDataset(preprocessing_fn)
            else:
                (transformed, _), transform_fn = ((rows, metadata) | "Analyze" >> tft_beam.AnalyzeAndTransformDataset(
                    preprocessing_fn, output_record_batches=True))
                _ = (transformed
                     | "DistinctBuckets" >> beam.CombineGlobally(DistinctBuckets())
                     | "WriteReferenceBuckets" >> beam.Map(_write_json, self._buckets_path))
            return transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(self._output_dir)


def constant_features(reference_buckets: Mapping[str, Sequence[int]]) -> Dict[str, int]:
    """{feature: its one bucket} for each feature whose buckets were all equal on the reference watches, in
    FEATURE_SIZES order. A feature seen with no bucket at all (no reference watch) is not called constant."""
    return {name: int(reference_buckets[name][0]) for name in FEATURE_SIZES
            if name in reference_buckets and len(reference_buckets[name]) == 1}


def _probe_columns() -> Dict[str, np.ndarray]:
    """A fixed grid of raw feature values that exercises every bucket boundary and vocabulary entry."""
    ratios = np.linspace(0.0, 2.0, 81, dtype=np.float32)
    times = np.geomspace(1.0, 86400.0, 81).astype(np.float32)
    gaps = np.concatenate([[FIRST_EVENT_GAP_S, 0.0], np.geomspace(1.0, 30 * 86400.0, 79)]).astype(np.float32)
    n = len(ratios)
    from transforms.schemas import DEVICES, SURFACES

    return {"watch_ratio": ratios, "watch_time_s": times, "time_gap_s": gaps,
            "liked": np.arange(n) % 2, "disliked": (np.arange(n) // 2) % 2,
            "surface": np.asarray([(SURFACES + ("never_seen",))[i % (len(SURFACES) + 1)] for i in range(n)], object),
            "device": np.asarray([(DEVICES + ("never_seen",))[i % (len(DEVICES) + 1)] for i in range(n)], object)}


def transform_fn_version(transform_dir: str, feature_names: Optional[Sequence[str]] = None) -> str:
    """What the transform does, as a hash: its outputs on a fixed probe grid, plus its vocabulary assets, plus
    ``feature_names`` (the features given hard tokens) when they are not all of FEATURE_SIZES (so a transform fitted
    with every feature keeps the version it always had, and one that drops constant features gets another).

    Not a hash of the SavedModel files: TensorFlow serializes the same graph (analyzer results baked in as
    constants) to different bytes on every save, and the version must not change when nothing did. (The manifest
    hashes the files themselves: any change of them after the fit is caught by :func:`read_transform_metadata`.)
    """
    digest = hashlib.sha256()
    buckets, soft = WatchFeaturizer(transform_dir).featurize_columns(_probe_columns())
    for name in sorted(buckets):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(buckets[name], dtype=np.int64).tobytes())
    # Fitted means and variances carry float noise from the combine order (different with other worker counts), so
    # soft values are hashed at 3 decimals: far finer than any real change of the transform, far coarser than noise.
    digest.update(np.round(soft.astype(np.float64), 3).tobytes())
    assets = outputs.join(transform_dir, "transform_fn", "assets")
    for metadata in sorted(FileSystems.match([outputs.join(assets, "*")])[0].metadata_list, key=lambda m: m.path):
        digest.update(os.path.basename(metadata.path).encode())
        with FileSystems.open(metadata.path) as handle:
            digest.update(handle.read())
    if feature_names is not None and tuple(feature_names) != tuple(FEATURE_SIZES):
        digest.update(("features:" + ",".join(feature_names)).encode())
    return f"tft-{digest.hexdigest()[:16]}"


class WatchFeaturizer:
    """Applies a fitted transform_fn to raw watch feature columns. Loaded once per worker; not thread-safe to build.

    ``featurize_columns(raw)`` returns, per watch, hard bucket ids by layout feature name and the soft feature
    vector, in one TensorFlow call for all the rows given (a user's timeline, or a whole batch of users).
    """

    def __init__(self, transform_dir: str, *, verify: bool = False):
        import tensorflow_transform as tft

        from tensorflow_transform.saved import saved_transform_io_v2

        if verify:
            read_transform_metadata(transform_dir)
        # The loader finalized for exactly our inputs and outputs, called with a dict: TFTransformOutput's
        # transform_raw_features first tries positional arguments, fails, formats every tensor into the error
        # message and only then falls back, which cost 5x the transform itself per call.
        self._loader = saved_transform_io_v2.SavedModelLoader(
            tft.TFTransformOutput(transform_dir).transform_savedmodel_dir)
        self._loader.finalize(RAW_WATCH_FEATURE_COLUMNS, TRANSFORM_OUTPUTS)

    def featurize_columns(self, raw_columns: Mapping[str, np.ndarray]):
        """(buckets by feature name, soft vectors) of every row; a row's result depends on that row alone.

        TensorFlow's CPU kernels compute a call's elements in SIMD packets, except the last ``n % P`` (P the packet
        width), which go one at a time, and the two paths of log1p differ in the last bit. So every call is padded
        (with copies of its rows) to a multiple of ``PAD_ROWS_TO``, a multiple of any packet width: every real row
        takes the packet path, whatever call it is in (a user's timeline, a batch of users, a probe grid).
        """
        import tensorflow as tf

        n = len(raw_columns["watch_ratio"])
        if n == 0:
            return {name: np.zeros((0,), np.int64) for name in FEATURE_SIZES}, np.zeros((0, SOFT_FEATURE_DIM),
                                                                                        np.float32)
        rows = np.resize(np.arange(n), -(-n // PAD_ROWS_TO) * PAD_ROWS_TO)
        tensors = {name: tf.constant(np.asarray(raw_columns[name], dtype=dtype)[rows])
                   for name, dtype in [(c, np.float32) for c in RAW_NUMERIC_COLUMNS]
                   + [(c, np.int64) for c in RAW_FLAG_COLUMNS]
                   + [(c, object) for c in RAW_CATEGORICAL_COLUMNS]}
        out = {k: v.numpy()[:n] for k, v in self._loader.apply_transform_model(tensors).items()}
        buckets = {name: np.clip(out[name].astype(np.int64), 0, FEATURE_SIZES[name] - 1) for name in FEATURE_SIZES}
        soft = np.concatenate([
            np.stack([out[name].astype(np.float32) for name in SOFT_NUMERIC], axis=1),
            np.stack([buckets["liked"], buckets["disliked"]], axis=1).astype(np.float32),
            np.eye(FEATURE_SIZES["surface"], dtype=np.float32)[buckets["surface"]],
            np.eye(FEATURE_SIZES["device"], dtype=np.float32)[buckets["device"]],
        ], axis=1)
        return buckets, soft


def lookup_featurize(watches: Sequence, buckets: Mapping[str, np.ndarray], soft: np.ndarray, soft_mode: bool):
    """A ``featurize(selected_watches, gaps)`` callback that reads features precomputed for a whole timeline.

    Features depend only on the watch and its gap in the full timeline, never on the cutoff, so they are computed
    once per user and looked up per cutoff by event identity.
    """
    index = {(w.event_ts_us, w.scenario, w.video_id): i for i, w in enumerate(watches)}

    def featurize(selected, _gaps):
        rows = np.asarray([index[(w.event_ts_us, w.scenario, w.video_id)] for w in selected], dtype=np.int64)
        if soft_mode:
            return soft[rows] if len(rows) else np.zeros((0, soft.shape[1]), np.float32)
        return {name: values[rows] for name, values in buckets.items()}

    return featurize


def write_transform_metadata(transform_dir: str, reference_date: str, num_watches: int, *,
                             reference_buckets: Optional[Mapping[str, Sequence[int]]] = None,
                             keep_constant_features: bool = False,
                             reference_start_date: Optional[str] = None) -> Dict:
    """Write ``transform_fn_metadata.json``. ``feature_sizes`` (what the vocabulary layout is built from) holds the
    features of FEATURE_SIZES, in that order, less those constant on the reference watches (``reference_buckets``,
    from :class:`DistinctBuckets`) unless ``keep_constant_features``; possibly none (a watch is then its condition
    and SID tokens)."""
    constant = constant_features(reference_buckets) if reference_buckets is not None else {}
    informative = [name for name in FEATURE_SIZES if name not in constant]
    kept = list(FEATURE_SIZES) if keep_constant_features else informative
    metadata = {"transform_fn_version": transform_fn_version(transform_dir, kept), "reference_date": reference_date,
                "reference_start_date": reference_start_date or reference_date,
                "num_reference_watches": num_watches, "feature_sizes": {name: FEATURE_SIZES[name] for name in kept},
                "informative_features": informative, "constant_features": constant,
                "keep_constant_features": bool(keep_constant_features),
                "soft_feature_dim": SOFT_FEATURE_DIM, "raw_columns": list(RAW_WATCH_FEATURE_COLUMNS)}
    if reference_buckets is not None:
        metadata["reference_bucket_counts"] = {name: len(reference_buckets.get(name, ())) for name in FEATURE_SIZES}
    outputs.write_text_file(outputs.join(transform_dir, METADATA_FILE), json.dumps(metadata, indent=2) + "\n")
    return metadata


def read_transform_metadata(transform_dir: str, *, verify: bool = True) -> Dict:
    """The fitted transform's metadata; with ``verify`` (the default, on drivers) every file of the transform is
    first checked against its manifest: a missing, truncated or edited file raises
    :class:`~tokenminds_model.manifest.ArtifactIntegrityError` naming it."""
    path = outputs.join(transform_dir, METADATA_FILE)
    try:
        with FileSystems.open(path) as handle:
            raw = handle.read()
    except Exception as err:
        raise FileNotFoundError(f"no fitted feature transform at {transform_dir} ({path}: {err}); "
                                "run pipelines.fit_feature_transform first") from err
    try:
        metadata = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"corrupt {METADATA_FILE} in {transform_dir}: not valid JSON ({err})") from None
    if not isinstance(metadata, dict) or not isinstance(metadata.get("transform_fn_version"), str):
        raise ValueError(f"corrupt {METADATA_FILE} in {transform_dir}: no transform_fn_version")
    if verify:
        manifest_lib.verify_artifact(transform_dir, ARTIFACT_KIND, version=metadata["transform_fn_version"],
                                     descriptor=METADATA_FILE)
    return metadata


def check_legacy_feature_transform(transform_dir: str) -> str:
    """For ``python -m tokenminds_model.manifest adopt``: recompute a manifest-less transform's version (its outputs
    on the probe grid and its vocabulary assets) and return it if it is the recorded one."""
    metadata = read_transform_metadata(transform_dir, verify=False)
    recorded = metadata["transform_fn_version"]
    actual = transform_fn_version(transform_dir, list(metadata.get("feature_sizes", FEATURE_SIZES)))
    if actual != recorded:
        raise ValueError(f"feature transform {transform_dir}: its files now give version {actual}, but "
                         f"{METADATA_FILE} records {recorded}: it changed after it was fitted (a damaged vocabulary "
                         "asset?); refit it (pipelines.fit_feature_transform)")
    return recorded
