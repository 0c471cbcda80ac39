"""Reading training examples (gzip TFRecords of tf.train.Example) into fixed-shape NumPy batches for JAX.

The example pipeline writes ``feature_spec.json`` next to its shards; this reader parses exactly that spec, so shapes
are static (what jit on an accelerator wants) and a change of format is caught as an error, not a silent reshape.
Uses tf.data for the input pipeline: shards read in parallel (interleave), a shuffle buffer, batching, prefetch.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np

FEATURE_SPEC_FILE = "feature_spec.json"


def load_feature_spec(examples_dir: str) -> Dict[str, Dict]:
    import tensorflow as tf

    path = os.path.join(examples_dir, FEATURE_SPEC_FILE)
    with tf.io.gfile.GFile(path, "r") as handle:
        return json.load(handle)


def parsing_spec(feature_spec: Dict[str, Dict]):
    """feature_spec.json -> tf.io.parse_example spec (flat FixedLenFeatures, reshaped after parsing)."""
    import tensorflow as tf

    dtypes = {"int64": tf.int64, "float32": tf.float32, "string": tf.string}
    return {name: tf.io.FixedLenFeature([int(np.prod(entry["shape"]))], dtypes[entry["dtype"]])
            for name, entry in feature_spec.items()}


def shard_files(examples_dirs: Sequence[str]) -> List[str]:
    import tensorflow as tf

    files = []
    for directory in examples_dirs:
        if not tf.io.gfile.exists(os.path.join(directory, "_SUCCESS")):
            raise FileNotFoundError(f"{directory} has no _SUCCESS: the examples are incomplete or missing")
        files += sorted(tf.io.gfile.glob(os.path.join(directory, "part-*.tfrecord.gz")))
    if not files:
        raise FileNotFoundError(f"no TFRecord shards under {list(examples_dirs)}")
    return files


def make_dataset(examples_dirs: Sequence[str], batch_size: int, *, shuffle_buffer: int = 10_000,
                 seed: Optional[int] = 0, repeat: bool = False, drop_remainder: bool = True,
                 feature_spec: Optional[Dict[str, Dict]] = None):
    """A tf.data.Dataset of dict batches with the spec's shapes (leading dim = batch_size).

    ``seed=None`` disables shuffling (deterministic order: shards sorted, records in file order).
    """
    import tensorflow as tf

    examples_dirs = [examples_dirs] if isinstance(examples_dirs, str) else list(examples_dirs)
    spec = feature_spec or load_feature_spec(examples_dirs[0])
    for other in examples_dirs[1:]:
        if load_feature_spec(other) != spec:
            raise ValueError(f"{other} has a different feature spec than {examples_dirs[0]}")
    files = tf.data.Dataset.from_tensor_slices(shard_files(examples_dirs))
    shuffle = seed is not None
    if shuffle:
        files = files.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    records = files.interleave(lambda f: tf.data.TFRecordDataset(f, compression_type="GZIP"),
                               cycle_length=4, num_parallel_calls=tf.data.AUTOTUNE,
                               # Parallel reads, but records in a fixed order: a seed must give one order.
                               deterministic=True)
    if repeat:
        records = records.repeat()
    if shuffle:
        records = records.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    parse = parsing_spec(spec)

    def parse_batch(serialized):
        parsed = tf.io.parse_example(serialized, parse)
        return {name: tf.reshape(parsed[name], [-1] + list(spec[name]["shape"])) for name in spec}

    return (records.batch(batch_size, drop_remainder=drop_remainder)
            .map(parse_batch, num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE))


class CorruptShardError(IOError):
    """A TFRecord shard that cannot be read to the end (truncated or corrupted), named."""


def find_corrupt_shards(files: Sequence[str]) -> List[str]:
    """The shards among ``files`` that fail to read to the end. Only used on the error path: it reads every file."""
    import tensorflow as tf

    corrupt = []
    for path in files:
        try:
            for _ in tf.data.TFRecordDataset(path, compression_type="GZIP"):
                pass
        except (tf.errors.DataLossError, tf.errors.OutOfRangeError, tf.errors.InvalidArgumentError):
            corrupt.append(path)
    return corrupt


def numpy_batches(examples_dirs: Sequence[str], batch_size: int, **kwargs) -> Iterator[Dict[str, np.ndarray]]:
    """Fixed-shape NumPy batches (``user_id`` as bytes) for a JAX training loop.

    A truncated or corrupt shard raises ``CorruptShardError`` naming the file(s): tf.data's own error does not say
    which of the interleaved shards failed.
    """
    import tensorflow as tf

    dirs = [examples_dirs] if isinstance(examples_dirs, str) else list(examples_dirs)
    try:
        yield from make_dataset(dirs, batch_size, **kwargs).as_numpy_iterator()
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as err:
        corrupt = find_corrupt_shards(shard_files(dirs))
        if not corrupt:
            raise
        raise CorruptShardError(f"corrupt or truncated TFRecord shard(s): {corrupt} ({type(err).__name__})") from err
