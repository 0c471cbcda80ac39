"""User representations: history snapshots -> model inputs -> RunInference -> published rows, and their lookup.

Pieces of ``pipelines.refresh_users``, in pipeline order:

- ``BuildServingInputs``: snapshot rows, an Arrow table at a time -> (user_id, history arrays) by
  ``serving.build_serving_inputs`` (many users per featurizer call), equal to ``examples.serving_history``, the code
  path of training examples (same vocabulary, transform_fn, truncation); users whose input cannot be built are
  dead-lettered. A Reshuffle after it spreads the users over the workers before inference.
- ``JaxUserModelHandler``: Beam ``ModelHandler`` over ``tokenminds_model.inference.UserInference``: the checkpoint is
  loaded once per worker process and shared by its threads (RunInference's shared handle), every batch is padded to
  one shape so jit compiles once, one encoder pass per user feeds the embedding and every scenario's beam search.
- ``representation_row``: a user's outputs -> a ``schemas.USER_REPRESENTATIONS_SCHEMA`` row.
- ``CarryOverFailed``: a user whose inference failed keeps the previous day's row (until it expires).

And the serving side, plain Python over the published Parquet: ``RepresentationStore.lookup``.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference

from tokenminds_model.vocabulary import VocabularyLayout
from transforms import features, outputs, schemas, sequences, serving
from transforms.validation import row_to_json

USERS = "users"
SERVING_INPUT_ERROR = "serving_input_error"
INFERENCE_ERROR = "inference_error"
CARRIED_OVER = "carried_over_from_previous_day"
SERVING_BATCH_SIZE = 512  # users per featurizer call when building serving inputs


# ---------------------------------------------------------------------------------------------------------------
# Plain functions.
# ---------------------------------------------------------------------------------------------------------------
def vocabulary_version(layout: VocabularyLayout) -> str:
    """A short content hash of the token space (ids, ranges and artifact versions)."""
    manifest = json.dumps(layout.to_manifest(), sort_keys=True).encode("utf-8")
    return "vocab-" + hashlib.sha256(manifest).hexdigest()[:16]


def user_token_records(layout: VocabularyLayout, decoded: Mapping[str, Tuple[np.ndarray, np.ndarray]],
                       token_text: Optional[Dict[Tuple[int, int], str]] = None) -> List[Dict[str, Any]]:
    """One user's decoded prefixes, ``{scenario: (codes int[top_n, L], scores float[top_n])}``, -> the
    ``user_tokens`` column: best first per scenario; empty slots (score -inf, codes -1) are left out.

    ``token_text``: a dict kept across calls (one per worker) of each (level, code)'s token string, worked out
    once instead of once per decoded token."""
    token_text = {} if token_text is None else token_text
    records = []
    for scenario, (codes, scores) in decoded.items():
        codes, scores = np.asarray(codes), np.asarray(scores)
        kept = np.isfinite(scores) & ~(codes < 0).any(axis=-1)
        for rank, (sid, score) in enumerate(zip(codes[kept].tolist(), scores[kept].tolist())):
            pieces = [token_text.get(level_code) for level_code in enumerate(sid)]
            if None in pieces:
                pieces = layout.format_tokens(layout.sid_tokens(sid, prefix_len=len(sid))).split(" ")
                token_text.update(zip(enumerate(sid), pieces))
            records.append({"scenario": scenario, "rank": rank, "sid": sid, "score": score,
                            "token": " ".join(pieces)})
    return records


def representation_row(user_id: str, snapshot_date: str, embedding: np.ndarray, user_tokens: List[Dict[str, Any]],
                       versions: Mapping[str, str], generated_at: dt.datetime, ttl: dt.timedelta
                       ) -> Dict[str, Any]:
    return {"user_id": user_id, "snapshot_date": snapshot_date,
            "embedding": np.asarray(embedding, np.float32).tolist(), "user_tokens": user_tokens,
            "model_version": versions["model"], "vocabulary_version": versions["vocabulary"],
            "sid_model_version": versions["sid_model"], "generated_at": generated_at,
            "expires_at": generated_at + ttl, "carried_over_from": None}


def storage_bytes(row: Mapping[str, Any]) -> Tuple[int, int]:
    """(token bytes, embedding bytes) of one row in its compact binary form: every decoded SID code as a 2-byte
    integer (codebooks up to 65,536) plus a 4-byte float score per token, and 4 bytes per embedding value. The
    paper's figures are 1,280 bytes of tokens vs 4,608 of embedding (1,152 float32)."""
    tokens = sum(2 * len(t["sid"]) + 4 for t in row["user_tokens"])
    return tokens, 4 * len(row["embedding"])


# ---------------------------------------------------------------------------------------------------------------
# Serving inputs.
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ServingContext:
    """What a worker needs to build serving inputs; small and picklable (artifacts load in setup)."""
    layout: VocabularyLayout
    config: sequences.SequenceConfig
    query_tokenizer_dir: str
    feature_transform_dir: str
    cutoff_ts_us: int  # the end of the snapshot's day: the history is every event before it
    date: str


class _BuildServingInputs(beam.DoFn):
    """Arrow tables of snapshot rows -> (user_id, serving input) per row, ``max_batch_size`` users per featurizer
    call (``serving.build_serving_inputs``); a row whose input cannot be built -> a dead letter (tag ``DEAD``)."""
    DEAD = "dead"

    def __init__(self, context: ServingContext, max_batch_size: int):
        super().__init__()
        self._context, self._max_batch_size = context, max_batch_size

    def setup(self):
        from tokenminds_model.query_tokenizer import QueryTokenizer

        self._tokenizer = QueryTokenizer.load(self._context.query_tokenizer_dir, verify=False)  # driver verified
        self._featurizer = features.WatchFeaturizer(self._context.feature_transform_dir)

    def process(self, table):
        ctx = self._context
        for start in range(0, table.num_rows, self._max_batch_size):
            chunk = table.slice(start, self._max_batch_size)
            user_ids = serving.user_ids_of(chunk)
            for row, built in serving.build_serving_inputs(chunk, ctx.cutoff_ts_us, ctx.layout, ctx.config,
                                                           self._tokenizer, self._featurizer):
                if isinstance(built, Exception):  # one user's bad history must not fail the night
                    raw = chunk.slice(row, 1).to_pylist()[0]
                    yield beam.pvalue.TaggedOutput(self.DEAD, dead_letter(
                        user_ids[row], SERVING_INPUT_ERROR, built, ctx.date, raw))
                    continue
                # Only the real tokens cross the shuffle (stack_histories pads them again, to one shape).
                n = built["length"]
                serving_input = {"tokens": built["tokens"][:n].astype(np.int32), "length": n}
                if "soft_features" in built:
                    serving_input["soft_features"] = built["soft_features"][:n]
                yield user_ids[row], serving_input


def dead_letter(user_id: Optional[str], reason: str, error: Any, date: str, raw: Any = None) -> Dict[str, Any]:
    detail = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return {"table": schemas.HISTORIES, "reason": reason, "detail": detail[:2000],
            "raw_row": row_to_json(raw if isinstance(raw, dict) else {"user_id": user_id}), "partition_date": date,
            "user_id": user_id}


class BuildServingInputs(beam.PTransform):
    """Snapshot tables (Arrow, ``ReadFromParquetBatched``) -> {"inputs": (user_id, {"tokens": the history's
    ``length`` tokens, "length"[, "soft_features"]}), "dead": dead-letter rows}, then a Reshuffle of the inputs: a
    fusion break, so that inference is spread over the workers by user rather than run where a snapshot file was
    read."""

    def __init__(self, context: ServingContext, max_batch_size: int = SERVING_BATCH_SIZE):
        super().__init__()
        self._context, self._max_batch_size = context, max_batch_size

    def expand(self, snapshot_tables):
        built = snapshot_tables | "BuildServingInputs" >> beam.ParDo(
            _BuildServingInputs(self._context, self._max_batch_size)).with_outputs(_BuildServingInputs.DEAD,
                                                                                   main="inputs")
        return {"inputs": built.inputs | "SpreadUsers" >> beam.Reshuffle(), "dead": built[_BuildServingInputs.DEAD]}


# ---------------------------------------------------------------------------------------------------------------
# RunInference.
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class InferenceSettings:
    model_dir: str
    scenarios: Tuple[str, ...]
    top_n: int = 20
    beam_size: int = 20
    batch_size: int = 32
    # {scenario: sorted unique prefix codes int[n, L]} to constrain decoding to the catalogue; None = unconstrained.
    catalogue_prefixes: Optional[Dict[str, np.ndarray]] = None


class JaxUserModelHandler(ModelHandler[Dict[str, np.ndarray], PredictionResult, Any]):
    """RunInference handler: a user's serving input -> (embedding, {scenario: (codes, scores)})."""

    def __init__(self, settings: InferenceSettings):
        self._settings = settings

    def load_model(self):
        # On the worker, once per process; RunInference shares the loaded model between the process's threads.
        from tokenminds_model import decoding, inference
        from tokenminds_model.model_checkpoints import load_model

        s = self._settings
        config, params, layout = load_model(s.model_dir, verify=False)  # the driver verified the checkpoint
        constraints = None
        if s.catalogue_prefixes:
            constraints = {scenario: decoding.PrefixConstraint(prefixes, layout.codebook_size)
                           for scenario, prefixes in s.catalogue_prefixes.items() if scenario in s.scenarios}
        return inference.UserInference(
            config, params, layout, batch_size=s.batch_size, constraints=constraints,
            settings=inference.DecodeSettings(scenarios=s.scenarios, top_n=s.top_n, beam_size=s.beam_size))

    def run_inference(self, batch: Sequence[Dict[str, np.ndarray]], model, inference_args=None
                      ) -> Iterable[PredictionResult]:
        from tokenminds_model.inference import stack_histories

        soft_dim = model.config.soft_feature_dim if model.config.soft else 0
        width = max(len(item["tokens"]) for item in batch)
        tokens, lengths, soft = stack_histories(batch, width, soft_dim)
        # UserInference pads every call to its fixed batch size: one compiled shape per worker.
        outputs_ = model(tokens, lengths, soft)
        return [PredictionResult(item, (outputs_.embeddings[i],
                                        {s: (outputs_.codes[s][i], outputs_.scores[s][i]) for s in outputs_.codes}),
                                 self._settings.model_dir)
                for i, item in enumerate(batch)]

    def batch_elements_kwargs(self):
        # Full batches from the start: every call is padded to batch_size rows anyway, so BatchElements' ramp-up
        # from 1 (its default) would only run padding. A bundle's last batch may be partial.
        size = self._settings.batch_size
        return {"min_batch_size": size, "max_batch_size": size}

    def get_metrics_namespace(self) -> str:
        return "refresh_users"


class _FailedBatchToDead(beam.DoFn):
    """RunInference's dead-letter output (a failed batch and its exception) -> one dead-letter row per user."""

    def __init__(self, date: str):
        super().__init__()
        self._date = date

    def process(self, failed):
        batch, error = failed
        logging.getLogger(__name__).warning("inference failed for a batch of %d users: %s", len(batch), error)
        for user_id, _ in batch:
            yield dead_letter(user_id, INFERENCE_ERROR, error, self._date)


class InferUsers(beam.PTransform):
    """(user_id, serving input) -> {"results": (user_id, (embedding, decoded)), "dead": dead-letter rows}."""

    def __init__(self, settings: InferenceSettings, date: str):
        super().__init__()
        self._settings, self._date = settings, date

    def expand(self, keyed_inputs):
        main, other = keyed_inputs | "RunInference" >> RunInference(
            KeyedModelHandler(JaxUserModelHandler(self._settings))).with_exception_handling()
        results = main | "Unwrap" >> beam.MapTuple(lambda user_id, result: (user_id, result.inference))
        dead = other.failed_inferences | "FailedBatches" >> beam.ParDo(_FailedBatchToDead(self._date))
        return {"results": results, "dead": dead}


# ---------------------------------------------------------------------------------------------------------------
# Rows, carry-over, storage.
# ---------------------------------------------------------------------------------------------------------------
class ToRepresentationRows(beam.PTransform):
    def __init__(self, layout: VocabularyLayout, snapshot_date: str, versions: Mapping[str, str],
                 generated_at: dt.datetime, ttl: dt.timedelta):
        super().__init__()
        self._args = (layout, snapshot_date, dict(versions), generated_at, ttl)

    def expand(self, results):
        return results | "ToRow" >> beam.ParDo(_ToRow(*self._args))


class _ToRow(beam.DoFn):
    def __init__(self, layout: VocabularyLayout, snapshot_date: str, versions: Mapping[str, str],
                 generated_at: dt.datetime, ttl: dt.timedelta):
        super().__init__()
        self._args = (layout, snapshot_date, versions, generated_at, ttl)

    def setup(self):
        self._token_text: Dict[Tuple[int, int], str] = {}

    def process(self, result):
        layout, snapshot_date, versions, generated_at, ttl = self._args
        user_id, (embedding, decoded) = result
        tokens = user_token_records(layout, decoded, self._token_text)
        yield representation_row(user_id, snapshot_date, embedding, tokens, versions, generated_at, ttl)


def carry_over(previous: Dict[str, Any], generated_at: dt.datetime) -> Optional[Dict[str, Any]]:
    """The previous row a failed user keeps, if it is still valid at ``generated_at``; marked as carried over."""
    expires_at = previous["expires_at"]
    if expires_at.tzinfo is None:
        expires_at = expires_at.replace(tzinfo=dt.timezone.utc)
    if expires_at <= generated_at:
        return None
    return {**previous, "carried_over_from": previous.get("carried_over_from") or previous["snapshot_date"]}


class CarryOverFailed(beam.PTransform):
    """Dead-lettered users whose previous representation is unexpired keep it (same generated_at / expires_at, so a
    lookup still sees when it runs out) with ``carried_over_from`` set. Input: (dead rows, previous day's rows as
    Arrow tables, ``ReadFromParquetBatched``). Only the failed users' previous rows become Python rows: the failed
    user ids (few) are a side input, so yesterday's table is filtered where it is read and never shuffled."""

    def __init__(self, generated_at: dt.datetime):
        super().__init__()
        self._generated_at = generated_at

    def expand(self, inputs):
        dead, previous_tables = inputs
        failed = (dead | "FailedUsers" >> beam.Filter(lambda row: row.get("user_id") is not None)
                  | "FailedIds" >> beam.Map(lambda row: row["user_id"]))
        return previous_tables | "KeepPrevious" >> beam.FlatMap(_carried_rows, beam.pvalue.AsList(failed),
                                                                self._generated_at)


def _carried_rows(previous: pa.Table, failed_ids: List[str], generated_at: dt.datetime):
    if not failed_ids or not previous.num_rows:
        return
    wanted = pc.is_in(previous.column("user_id"), value_set=pa.array(sorted(set(failed_ids)), pa.string()))
    for row in previous.filter(wanted).to_pylist():
        carried = carry_over(row, generated_at)
        if carried is not None:
            yield carried


class StorageFigures(beam.CombineFn):
    """Rows -> {users, token bytes/user, embedding bytes/user, tokens/user} (see ``storage_bytes``)."""

    def create_accumulator(self):
        return [0, 0, 0, 0]

    def add_input(self, acc, row):
        token_bytes, embedding_bytes = storage_bytes(row)
        return [acc[0] + 1, acc[1] + token_bytes, acc[2] + embedding_bytes, acc[3] + len(row["user_tokens"])]

    def merge_accumulators(self, accumulators):
        return [sum(values) for values in zip(*accumulators)]

    def extract_output(self, acc):
        users = max(acc[0], 1)
        return {"users": acc[0], "token_bytes_per_user": acc[1] / users, "embedding_bytes_per_user": acc[2] / users,
                "tokens_per_user": acc[3] / users}


# ---------------------------------------------------------------------------------------------------------------
# Serving-side lookup: the contract downstream reads representations by.
# ---------------------------------------------------------------------------------------------------------------
FRESH, STALE, MISSING = "fresh", "stale", "missing"


@dataclasses.dataclass(frozen=True)
class LookupResult:
    status: str  # FRESH (unexpired at the asked time), STALE (expired: trigger a refresh) or MISSING (never seen)
    row: Optional[Dict[str, Any]]  # the newest row found (also for STALE), None when MISSING


class RepresentationStore:
    """Reads published ``user_representations/date=D/`` partitions (local or gs://) for lookups by user id.

    ``lookup(user_ids, at)`` looks in the newest complete partition (``_SUCCESS``) whose day is not after ``at``,
    then in older ones for users absent there (``max_days_back``), and returns per user FRESH when the row newest
    in that search is unexpired at ``at`` (``generated_at <= at < expires_at``), STALE when it has expired, MISSING
    when no partition has the user. A row generated after ``at`` is never served for ``at``.
    """

    def __init__(self, root: str, max_days_back: int = 7):
        self._root, self._max_days_back = root, max_days_back
        self._cache: Dict[str, Dict[str, Dict[str, Any]]] = {}

    def _partition(self, day: dt.date) -> Dict[str, Dict[str, Any]]:
        key = day.isoformat()
        if key not in self._cache:
            import pyarrow.parquet as pq
            from apache_beam.io.filesystems import FileSystems

            directory = schemas.partition_dir(self._root, schemas.USER_REPRESENTATIONS, day)
            rows: Dict[str, Dict[str, Any]] = {}
            if outputs.success_marker_exists(directory):
                for match in FileSystems.match([outputs.join(directory, "*.parquet")])[0].metadata_list:
                    with FileSystems.open(match.path) as handle:
                        for row in pq.read_table(handle).to_pylist():
                            rows[row["user_id"]] = row
            self._cache[key] = rows
        return self._cache[key]

    def lookup(self, user_ids: Iterable[str], at: dt.datetime) -> Dict[str, LookupResult]:
        if at.tzinfo is None:
            raise ValueError("lookup time must be timezone-aware (UTC)")
        pending = set(user_ids)
        found: Dict[str, Dict[str, Any]] = {}
        for back in range(self._max_days_back + 1):
            if not pending:
                break
            partition = self._partition(at.date() - dt.timedelta(days=back))
            for user_id in list(pending):
                row = partition.get(user_id)
                if row is not None and row["generated_at"] <= at:
                    found[user_id] = row
                    pending.discard(user_id)
        results = {}
        for user_id in user_ids:
            row = found.get(user_id)
            if row is None:
                results[user_id] = LookupResult(MISSING, None)
            else:
                results[user_id] = LookupResult(FRESH if at < row["expires_at"] else STALE, row)
        return results
