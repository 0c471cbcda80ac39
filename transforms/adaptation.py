"""Beam steps of ``pipelines.build_adaptation``: join the catalog with its SIDs, then build the adaptation artifacts.

``JoinCatalogSids`` pairs each video's content embedding with its SID, every row of both inputs ending joined,
dead-lettered (with a reason) or dropped (a republished video's later copies, as in assign_sids). The artifacts
are then built from the joined rows by the pure functions of ``tokenminds_model.adaptation``:
``PrefixEmbeddings`` (a sum/count combine per (scenario, prefix), lifted before the shuffle),
``BuildNgramVocab`` and ``TrainSidPieces`` (each counted or collected, then built once, on one worker).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from tokenminds_model import adaptation
from transforms import outputs, schemas
from transforms.validation import canonical_order_key, row_to_json

# The output tables are defined in the data contract; re-exported here for the pipeline and tests.
ADAPTATION, PREFIX_EMBEDDINGS = schemas.ADAPTATION, schemas.PREFIX_EMBEDDINGS
PREFIX_EMBEDDINGS_SCHEMA = schemas.PREFIX_EMBEDDINGS_SCHEMA

# Dead-letter reasons (a row of the table named in the dead-letter row's "table").
VIDEO_WITHOUT_SID = "video_without_sid"  # videos: a catalog video with no SID row
SID_WITHOUT_VIDEO = "sid_without_video"  # video_sids: a SID row whose video is not in the catalog
BAD_EMBEDDING = "bad_embedding"  # both rows: the video's embedding is missing, of the wrong width or not finite
BAD_SID = "bad_sid"  # both rows: the SID is not L codes in [0, codebook_size)
DUPLICATE_SID = "duplicate_sid"  # video_sids: a second SID row for one video
# Dropped by design: a video republished on a later day; its earliest row is the one used (as in assign_sids).
REPUBLISHED_VIDEO = "republished_video"


def embedding_problem(embedding: Any, dim: int) -> Optional[str]:
    if embedding is None:
        return "no content_embedding"
    if len(embedding) != dim:
        return f"content_embedding has {len(embedding)} values, expected {dim}"
    if not all(value is not None and math.isfinite(value) for value in embedding):
        return "content_embedding has a null or non-finite value"
    return None


def sid_problem(sid: Any, levels: int, codebook_size: int) -> Optional[str]:
    if sid is None or len(sid) != levels:
        return f"SID {sid} does not have {levels} levels"
    if not all(code is not None and 0 <= code < codebook_size for code in sid):
        return f"SID {list(sid)} has codes outside [0, {codebook_size})"
    return None


class _JoinCatalogSids(beam.DoFn):
    """(video_id, {"videos": [...], "sids": [...]}) -> joined rows; dead letters and drop counts as side outputs."""
    DEAD, COUNTS = "dead", "counts"

    def __init__(self, date: str, levels: int, codebook_size: int, embedding_dim: int):
        super().__init__()
        self._date, self._levels, self._codebook_size, self._dim = date, levels, codebook_size, embedding_dim

    def _dead(self, table, row, reason, detail):
        return beam.pvalue.TaggedOutput(self.DEAD, {"table": table, "reason": reason, "detail": detail,
                                                    "raw_row": row_to_json(row), "partition_date": self._date})

    def process(self, grouped):
        video_id, groups = grouped
        # Which copy is used never depends on arrival order.
        videos = sorted(groups["videos"], key=lambda r: (r["publish_ts"], r["scenario"], canonical_order_key(r)))
        sids = sorted(groups["sids"], key=canonical_order_key)
        for _ in videos[1:]:
            yield beam.pvalue.TaggedOutput(self.COUNTS, ((schemas.VIDEOS, self._date, outputs.DROPPED,
                                                          REPUBLISHED_VIDEO), 1))
        for row in sids[1:]:
            yield self._dead(schemas.VIDEO_SIDS, row, DUPLICATE_SID, f"video {video_id} has {len(sids)} SID rows")
        if not sids:
            yield self._dead(schemas.VIDEOS, videos[0], VIDEO_WITHOUT_SID, f"video {video_id} has no SID")
            return
        if not videos:
            yield self._dead(schemas.VIDEO_SIDS, sids[0], SID_WITHOUT_VIDEO, f"video {video_id} is not in the catalog")
            return
        video, sid = videos[0], sids[0]
        for reason, problem in ((BAD_SID, sid_problem(sid["sid"], self._levels, self._codebook_size)),
                                (BAD_EMBEDDING, embedding_problem(video["content_embedding"], self._dim))):
            if problem:
                yield self._dead(schemas.VIDEO_SIDS, sid, reason, problem)
                yield self._dead(schemas.VIDEOS, video, reason, problem)
                return
        yield {"video_id": video_id, "scenario": sid["scenario"], "sid": [int(c) for c in sid["sid"]],
               "embedding": np.asarray(video["content_embedding"], np.float32)}


class JoinCatalogSids(beam.PTransform):
    """(catalog video rows, video_sids rows) -> {"joined": rows with video_id/scenario/sid/embedding, "dead",
    "counts": (count key, n) for rows dropped by design}."""

    def __init__(self, date: str, levels: int, codebook_size: int, embedding_dim: int):
        super().__init__()
        self._fn = _JoinCatalogSids(date, levels, codebook_size, embedding_dim)

    def expand(self, inputs):
        videos, sids = inputs
        joined = ({"videos": videos | "KeyVideos" >> beam.Map(lambda r: (r["video_id"], r)),
                   "sids": sids | "KeySids" >> beam.Map(lambda r: (r["video_id"], r))}
                  | "JoinOnVideo" >> beam.CoGroupByKey()
                  | "Join" >> beam.ParDo(self._fn).with_outputs(_JoinCatalogSids.DEAD, _JoinCatalogSids.COUNTS,
                                                                main="joined"))
        return {"joined": joined.joined, "dead": joined[_JoinCatalogSids.DEAD],
                "counts": joined[_JoinCatalogSids.COUNTS]}


class MeanVectorFn(beam.CombineFn):
    """Mean of numpy vectors: a float64 (sum, count) accumulator, so combiner lifting keeps the data sent small."""

    def create_accumulator(self):
        return None, 0

    def add_input(self, accumulator, vector):
        total, count = accumulator
        vector = np.asarray(vector, np.float64)
        return (vector.copy() if total is None else total + vector), count + 1

    def merge_accumulators(self, accumulators):
        total, count = None, 0
        for other_total, other_count in accumulators:
            if other_total is not None:
                total = other_total.copy() if total is None else total + other_total
            count += other_count
        return total, count

    def extract_output(self, accumulator):
        total, count = accumulator
        return (total / count).astype(np.float32), count


def _prefix_row(key, mean_and_count):
    (scenario, prefix), (mean, count) = key, mean_and_count
    return {"scenario": scenario, "prefix_len": len(prefix), "prefix": list(prefix), "num_videos": count,
            "embedding": mean.tolist()}


class PrefixEmbeddings(beam.PTransform):
    """Joined rows -> one PREFIX_EMBEDDINGS_SCHEMA row per (scenario, prefix of length 1..L)."""

    def expand(self, joined):
        return (joined
                | "EmitPrefixes" >> beam.FlatMap(lambda r: [((r["scenario"], tuple(r["sid"][:n])), r["embedding"])
                                                           for n in range(1, len(r["sid"]) + 1)])
                | "MeanPerPrefix" >> beam.CombinePerKey(MeanVectorFn())
                | "ToRows" >> beam.MapTuple(_prefix_row))


def _write_bytes(path: str, data: bytes) -> None:
    with FileSystems.create(path) as handle:
        handle.write(data)


def _save_ngram_vocab(counts, path, num_sids, contiguous, min_count, max_ngrams):
    vocab = adaptation.SidNgramVocab.build(dict(counts), num_sids, contiguous, min_count, max_ngrams)
    outputs.write_text_file(path, vocab.to_json())
    return {"file": path, "size": vocab.size, "ngrams_seen": len(counts), "contiguous": contiguous,
            "min_count": min_count, "max_ngram_vocab": max_ngrams}


class BuildNgramVocab(beam.PTransform):
    """Joined rows -> n-gram counts (lifted) -> the vocabulary, built and written once to ``path``.

    Outputs one dict describing what was written (for the run summary)."""

    def __init__(self, path: str, contiguous: bool, min_count: int, max_ngrams: Optional[int]):
        super().__init__()
        self._path, self._contiguous, self._min_count, self._max = path, contiguous, min_count, max_ngrams

    def expand(self, joined):
        num_sids = beam.pvalue.AsSingleton(joined | "CountSids" >> beam.combiners.Count.Globally())
        return (joined
                | "EmitNgrams" >> beam.FlatMap(lambda r, c: adaptation.sid_ngram_keys(r["sid"], c),
                                               c=self._contiguous)
                | "CountPerNgram" >> beam.combiners.Count.PerElement()
                | "CollectCounts" >> beam.combiners.ToList()
                | "BuildAndWrite" >> beam.Map(_save_ngram_vocab, path=self._path, num_sids=num_sids,
                                              contiguous=self._contiguous, min_count=self._min_count,
                                              max_ngrams=self._max))


def _train_and_save_pieces(sids, directory, symbols, vocab_size, model_type, seed):
    model = adaptation.train_sid_piece_model(sids, symbols, vocab_size, model_type, seed=seed)
    # The model first: a reader that finds the metadata can rely on the model being complete.
    _write_bytes(outputs.join(directory, adaptation.SPM_MODEL_FILENAME), model.serialized_model)
    outputs.write_text_file(outputs.join(directory, adaptation.SPM_METADATA_FILENAME), model.metadata_json())
    return {k: v for k, v in model.metadata().items() if k != "symbols"}


class TrainSidPieces(beam.PTransform):
    """Joined rows -> every SID on one worker -> the SentencePiece model and its metadata JSON in ``directory``.

    SentencePiece trains in memory on the whole corpus, so this is one step on one worker, as for the query
    tokenizer; a catalog's SIDs are a few bytes each. Outputs the model's metadata (for the run summary)."""

    def __init__(self, directory: str, symbols: adaptation.SidSymbols, vocab_size: int, model_type: str, seed: int):
        super().__init__()
        self._args = dict(directory=directory, symbols=symbols, vocab_size=vocab_size, model_type=model_type,
                          seed=seed)

    def expand(self, joined):
        return (joined
                | "Sids" >> beam.Map(lambda r: r["sid"])
                | "CollectSids" >> beam.combiners.ToList()
                | "TrainAndSave" >> beam.Map(_train_and_save_pieces, **self._args))

