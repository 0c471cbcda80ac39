"""Assigning Semantic IDs to the catalog with Beam's RunInference and a JAX model handler.

``JaxSIDModelHandler`` loads a SID model checkpoint (``tokenminds_model.checkpoints``) once per worker process and
shares it across threads (RunInference's ``Shared`` handle); batches are padded to one fixed size inside
``TrainedSIDModel.encode_batched`` so ``jax.jit`` compiles once per worker.

Assignment is incremental: a video keeps the SID (and disambiguation code) it got under the same model version;
only videos new since the last assignment are encoded. Where several videos share a full SID, a disambiguation code
makes (SID, code) unique: existing videos keep their codes and new ones take the next free codes in video-id order,
so an assignment never changes under a video that already had one.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference

SID_COLLISION_OVERFLOW = "sid_collision_overflow"


class JaxSIDModelHandler(ModelHandler[np.ndarray, PredictionResult, Any]):
    """RunInference handler: content embeddings (float32[D]) -> full-depth SIDs (int32[L])."""

    def __init__(self, model_dir: str, batch_size: int = 1024):
        self._model_dir = model_dir
        self._batch_size = batch_size

    def load_model(self):
        from tokenminds_model.checkpoints import load_sid_model  # on the worker, once per process

        return load_sid_model(self._model_dir, verify=False)  # the driver verified the checkpoint

    def run_inference(self, batch: Sequence[np.ndarray], model, inference_args: Optional[Dict[str, Any]] = None
                      ) -> Iterable[PredictionResult]:
        embeddings = np.stack([np.asarray(e, dtype=np.float32) for e in batch])
        # RunInference's batches vary in length, and jit compiles once per input shape (about a second each).
        # Padding every batch to the handler's fixed batch size gives one shape, so each worker compiles once.
        padded = np.zeros((self._batch_size * -(-len(batch) // self._batch_size), embeddings.shape[1]), np.float32)
        padded[:len(batch)] = embeddings
        codes = model.encode_batched(padded, batch_size=self._batch_size)[:len(batch)]
        return [PredictionResult(example, sid) for example, sid in zip(batch, codes)]

    def batch_elements_kwargs(self):
        return {"min_batch_size": 1, "max_batch_size": self._batch_size}

    def share_model_across_processes(self) -> bool:
        return False  # the model is small; one copy per process avoids cross-process coordination

    def get_metrics_namespace(self) -> str:
        return "assign_sids"


def assign_disambiguation(existing: Sequence[Tuple[str, int]], new_video_ids: Sequence[str],
                          max_codes: int) -> Tuple[List[Tuple[str, int]], List[str]]:
    """Disambiguation codes for the videos of one full SID.

    ``existing`` are (video_id, code) pairs already assigned; they never change. New videos take the lowest free
    codes in video-id order. Returns the new (video_id, code) pairs and the video ids for which no code below
    ``max_codes`` was free (the vocabulary reserves only that many).
    """
    used = {code for _, code in existing}
    assigned, overflow = [], []
    free = (code for code in range(max_codes) if code not in used)
    for video_id in sorted(new_video_ids):
        code = next(free, None)
        if code is None:
            overflow.append(video_id)
        else:
            assigned.append((video_id, code))
    return assigned, overflow


class EncodeVideos(beam.PTransform):
    """Validated video rows -> (video_id, scenario, sid) with RunInference, keyed by video id."""

    def __init__(self, model_dir: str, batch_size: int = 1024):
        super().__init__()
        self._handler = KeyedModelHandler(JaxSIDModelHandler(model_dir, batch_size))

    def expand(self, videos):
        return (videos
                | "KeyEmbedding" >> beam.Map(
                    lambda row: ((row["video_id"], row["scenario"]), np.asarray(row["content_embedding"],
                                                                               dtype=np.float32)))
                | "RunInference" >> RunInference(self._handler)
                | "ToAssignment" >> beam.MapTuple(
                    lambda key, result: {"video_id": key[0], "scenario": key[1],
                                         "sid": [int(c) for c in result.inference]}))


class _Disambiguate(beam.DoFn):
    DEAD = "dead"

    def __init__(self, version: str, date: str, max_codes: int):
        super().__init__()
        self._version, self._date, self._max_codes = version, date, max_codes
        self._overflow = Metrics.counter("assign_sids", SID_COLLISION_OVERFLOW)

    def process(self, grouped):
        _, groups = grouped
        existing = list(groups["existing"])
        new = {row["video_id"]: row for row in groups["new"]}
        for row in existing:
            yield row
        assigned, overflow = assign_disambiguation([(r["video_id"], r["disambiguation"]) for r in existing],
                                                   list(new), self._max_codes)
        for video_id, code in assigned:
            yield {**new[video_id], "disambiguation": code, "sid_model_version": self._version,
                   "assigned_date": self._date}
        for video_id in overflow:
            self._overflow.inc()
            from transforms.validation import row_to_json

            yield beam.pvalue.TaggedOutput(self.DEAD, {
                "table": "videos", "reason": SID_COLLISION_OVERFLOW,
                "detail": f"more than {self._max_codes} videos share SID {new[video_id]['sid']}",
                "raw_row": row_to_json(new[video_id]), "partition_date": self._date})


class MergeAssignments(beam.PTransform):
    """Earlier assignments (kept as they are) + newly encoded videos -> the full table, with disambiguation codes.

    Input: (existing assignment rows, new rows with video_id/scenario/sid). Output: {"sids": rows, "dead": rows}.
    """

    def __init__(self, version: str, date: str, max_codes: int):
        super().__init__()
        self._version, self._date, self._max_codes = version, date, max_codes

    def expand(self, inputs):
        existing, new = inputs
        by_sid = {"existing": existing | "KeyExistingBySid" >> beam.Map(lambda r: (tuple(r["sid"]), r)),
                  "new": new | "KeyNewBySid" >> beam.Map(lambda r: (tuple(r["sid"]), r))}
        merged = (by_sid | "GroupBySid" >> beam.CoGroupByKey()
                  | "Disambiguate" >> beam.ParDo(_Disambiguate(self._version, self._date, self._max_codes))
                  .with_outputs(_Disambiguate.DEAD, main="sids"))
        return {"sids": merged.sids, "dead": merged[_Disambiguate.DEAD]}
