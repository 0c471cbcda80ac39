"""A deterministic, bounded sample of search queries, for training the query tokenizer.

The sample must be identical across runs and runners (the tokenizer's version is a hash of the model trained on
it), so it is chosen by a keyed hash of each row, never by arrival order, bundle boundaries or Python's salted
``hash()``: a row is in the sample iff its ``sample_key`` is among the ``max_queries`` smallest.

The key covers (seed, user_id, query) and not the timestamp, so a user's repeats of one query are all in or all out:
the sample is effectively one of (user, query) pairs, with their search counts kept as weights.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable, List, Mapping, Optional, Tuple

import apache_beam as beam

# 63 bits, not 64: keys travel through Beam's int coders, which are signed 64-bit.
SAMPLE_KEY_BITS = 63


def _length_prefixed(text: str) -> bytes:
    # A length prefix keeps field boundaries unambiguous: ("ab", "c") and ("a", "bc") hash differently.
    data = text.encode("utf-8")
    return len(data).to_bytes(8, "big") + data


def sample_key(seed: int, user_id: str, query: str) -> int:
    """A uniform integer in ``[0, 2**63)`` that depends only on its arguments (same on every machine and process)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(_length_prefixed(str(int(seed))))
    digest.update(_length_prefixed(user_id))
    digest.update(_length_prefixed(query))
    return int.from_bytes(digest.digest(), "big") >> (64 - SAMPLE_KEY_BITS)


def keyed_query(row: Mapping[str, Any], seed: int) -> Optional[Tuple[int, str]]:
    """``(sample_key, query)`` for a search-event row, or None for a row without a usable user_id and query."""
    user_id, query = row.get("user_id"), row.get("query")
    if not isinstance(user_id, str) or not isinstance(query, str) or not query.strip():
        return None
    return sample_key(seed, user_id, query), query


def sample_queries_locally(rows: Iterable[Mapping[str, Any]], max_queries: int, seed: int = 0) -> List[str]:
    """What ``SampleQueries`` computes, in plain Python (for tests and small local runs), ordered by sample key."""
    keyed = sorted(kq for kq in (keyed_query(row, seed) for row in rows) if kq is not None)
    return [query for _, query in keyed[:max_queries]]


class _KeyBySampleHash(beam.DoFn):
    def __init__(self, seed: int):
        self._seed = seed
        self._rows_without_query = beam.metrics.Metrics.counter("SampleQueries", "rows_without_query")

    def process(self, row: Mapping[str, Any]) -> Iterable[Tuple[int, str]]:
        keyed = keyed_query(row, self._seed)
        if keyed is None:
            # Validation upstream should have dead-lettered these; count rather than fail the sample.
            self._rows_without_query.inc()
            return
        yield keyed


class SampleQueries(beam.PTransform):
    """Search-event dicts (``user_id``, ``event_ts``, ``query``) -> at most ``max_queries`` query strings.

    Keeps the rows with the ``max_queries`` smallest ``(sample_key, query)`` (ties between different queries
    under one key, a hash collision, are broken by the query itself, so the choice is a pure function of the input
    multiset). The output PCollection holds one element per sampled row; collect it with
    ``beam.combiners.ToList()`` to train on one worker. Its size is bounded by ``max_queries``, which is also what
    the combine holds in memory per worker.

    Expects the global window (a batch pipeline), where the sample of an empty input is empty.
    """

    def __init__(self, max_queries: int, seed: int = 0, label: Optional[str] = None):
        super().__init__(label)
        if isinstance(max_queries, bool) or not isinstance(max_queries, int) or max_queries < 1:
            raise ValueError(f"max_queries must be a positive int, got {max_queries!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.max_queries = max_queries
        self.seed = seed

    def expand(self, search_events):
        return (
            search_events
            | "KeyBySampleHash" >> beam.ParDo(_KeyBySampleHash(self.seed)).with_output_types(Tuple[int, str])
            | "SmallestKeys" >> beam.combiners.Top.Smallest(self.max_queries)
            | "Queries" >> beam.FlatMap(lambda smallest: [query for _, query in smallest]).with_output_types(str)
        )
