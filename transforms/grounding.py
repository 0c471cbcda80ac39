"""SID grounding in item text: one training example per catalogue item, its title's pieces -> its SID.

The paper initialises the user model from a checkpoint whose SID tokens were grounded in language by continued
pre-training. This project's decoder emits SIDs, not text, so the grounding it can learn is text -> SID: the
encoder reads ``<Search>`` followed by the title's SentencePiece pieces (the query tokenizer and token range that
searches use, so what a title teaches carries over to a user's searches) and the target is the item's scenario
condition token and prefix-L SID. The example has exactly the layout of a behaviour example
(``transforms.examples.feature_spec``: one target row, no watches), so ``tokenminds_model.train`` trains on
grounding examples alone or mixed with behaviour examples, and its checkpoint is what ``train --init_from``
fine-tunes.

``grounding_examples`` is the plain logic over the joined rows of a batch; ``BuildGroundingExamples`` the Beam step
around it. Every input row ends in an example or a dead letter (reasons below).
"""
from __future__ import annotations

import datetime as dt
from typing import Any, Dict, Iterable, List, Tuple

import apache_beam as beam
import numpy as np

from tokenminds_model import vocabulary
from tokenminds_model.vocabulary import PAD_ID, SEARCH_ID, VocabularyLayout
from transforms import examples as examples_lib
from transforms import features, outputs, schemas
from transforms.validation import Rejection, dead_letter_row

GROUNDING_EXAMPLES = "grounding_examples"
CATALOG = "catalog"  # the dead-letter "table" of catalogue (title) rows
# Dead-letter reasons.
NO_SID = "no_sid"  # a catalogue item without a SID as of D (not assigned yet, or not in the validated catalog)
NO_TITLE = "no_title"  # a SID without a catalogue row, or with an empty title
TITLE_WITHOUT_PIECES = "title_without_pieces"  # the tokenizer found nothing to encode
DUPLICATE = "duplicate"  # a second row for the same video id (the first in sort order is used)
SCENARIO_NOT_KEPT = "scenario_not_kept"  # the sequence config's scenarios (an ablation) exclude the item's
TOKEN_DTYPE = np.int64


def _dead(table: str, reason: str, detail: str, row: Dict[str, Any], date: str) -> Dict[str, Any]:
    return dead_letter_row(table, dt.date.fromisoformat(date), row, Rejection(reason, detail))


def grounding_examples(items: Iterable[Tuple[str, List[Dict[str, Any]], List[Dict[str, Any]]]], tokenizer,
                       layout: VocabularyLayout, config, date: str) -> Tuple[List[Dict[str, Any]], List[Dict]]:
    """``(video_id, its video_sids rows, its catalogue rows)`` -> (example dicts, dead-letter rows).

    An item with one SID row and one catalogue row with a title that encodes to at least one piece becomes one
    example: tokens ``<Search> piece..`` (at most ``config.max_pieces_per_query`` pieces, as for searches), one
    target ``[condition(scenario), sid_0 .. sid_{L-1}]``. Every other row is dead-lettered with its reason. The
    titles of a batch go through SentencePiece in one call.
    """
    kept, dead = [], []
    for video_id, sid_rows, catalog_rows in items:
        sid_rows = sorted(sid_rows, key=lambda r: (r["scenario"] or "", list(r["sid"] or [])))
        catalog_rows = sorted(catalog_rows, key=lambda r: (r["title"] or "", r.get("item_id") or ""))
        dead += [_dead(schemas.VIDEO_SIDS, DUPLICATE, f"another SID row of {video_id}", r, date) for r in sid_rows[1:]]
        dead += [_dead(CATALOG, DUPLICATE, f"another catalogue row of {video_id}", r, date)
                 for r in catalog_rows[1:]]
        if not sid_rows:
            dead += [_dead(CATALOG, NO_SID, f"{video_id} has no SID as of {date}", catalog_rows[0], date)]
            continue
        if not catalog_rows or not (catalog_rows[0]["title"] or "").strip():
            reason_rows = [(schemas.VIDEO_SIDS, sid_rows[0])] + [(CATALOG, r) for r in catalog_rows[:1]]
            dead += [_dead(t, NO_TITLE, f"{video_id} has no title", r, date) for t, r in reason_rows]
            continue
        if sid_rows[0]["scenario"] not in config.scenarios:
            dead += [_dead(t, SCENARIO_NOT_KEPT, f"scenario {sid_rows[0]['scenario']} not in {config.scenarios}", r,
                           date) for t, r in ((schemas.VIDEO_SIDS, sid_rows[0]), (CATALOG, catalog_rows[0]))]
            continue
        kept.append((video_id, sid_rows[0], catalog_rows[0]))

    pieces = tokenizer.encode_batch([c["title"] for _, _, c in kept], config.max_pieces_per_query)
    sid_len = config.sid_length(layout)
    examples = []
    for (video_id, sid_row, catalog_row), ids in zip(kept, pieces):
        if not ids:
            dead += [_dead(t, TITLE_WITHOUT_PIECES, f"title {catalog_row['title']!r} encodes to no piece", r, date)
                     for t, r in ((schemas.VIDEO_SIDS, sid_row), (CATALOG, catalog_row))]
            continue
        text = np.concatenate([[SEARCH_ID], layout.query_piece_token(np.asarray(ids, TOKEN_DTYPE))])
        tokens = np.full(config.max_tokens, PAD_ID, TOKEN_DTYPE)
        tokens[:len(text)] = text[:config.max_tokens]
        targets = np.full((config.max_targets, 1 + sid_len), PAD_ID, TOKEN_DTYPE)
        targets[0, 0] = vocabulary.condition_token(sid_row["scenario"])
        targets[0, 1:] = layout.sid_tokens(np.asarray(sid_row["sid"], np.int64), sid_len)
        example = {"user_id": f"item:{video_id}", "cutoff_ts_us": 0, "tokens": tokens,
                   "length": min(len(text), config.max_tokens), "num_watches": 0, "num_searches": 1,
                   "targets": targets, "num_targets": 1, "scenario": sid_row["scenario"]}
        if config.feature_mode == "soft":  # no watch, so no watch features: zeros, as for a search position
            example["soft_features"] = np.zeros((config.max_tokens, features.SOFT_FEATURE_DIM), np.float32)
        examples.append(example)
    return examples, dead


class BuildGroundingExamples(beam.PTransform):
    """(video_sids rows, catalogue rows) -> {"examples": serialized tf.Examples, "dead": dead-letter rows,
    "counts": ((table, day, kind, reason), 1) pairs for ``outputs.SummarizeCounts``}.

    A catalogue has one row per item (thousands to millions, not events), so the join is a keyed ``CoGroupByKey``
    of row dicts; the titles are then tokenized and serialized in batches (``BatchElements``).
    """

    def __init__(self, tokenizer_dir: str, layout: VocabularyLayout, config, spec: Dict[str, Any], date: str):
        super().__init__()
        self._tokenizer_dir, self._layout, self._config, self._spec, self._date = (tokenizer_dir, layout, config,
                                                                                     spec, date)

    def expand(self, inputs):
        sids, catalog = inputs
        joined = ({"sids": sids | "KeySids" >> beam.Map(lambda r: (r["video_id"], r)),
                   "catalog": catalog | "KeyCatalog" >> beam.Map(lambda r: (r["video_id"], r))}
                  | "JoinByVideo" >> beam.CoGroupByKey()
                  | "Items" >> beam.Map(lambda kv: (kv[0], list(kv[1]["sids"]), list(kv[1]["catalog"])))
                  | "Batch" >> beam.BatchElements(min_batch_size=256, max_batch_size=4096))
        built = joined | "Build" >> beam.ParDo(_BuildBatch(self._tokenizer_dir, self._layout, self._config,
                                                           self._spec, self._date)).with_outputs("dead", "counts",
                                                                                                 main="examples")
        return {"examples": built.examples, "dead": built.dead, "counts": built.counts}


class _BuildBatch(beam.DoFn):
    def __init__(self, tokenizer_dir, layout, config, spec, date):
        self._tokenizer_dir, self._layout, self._config, self._spec, self._date = (tokenizer_dir, layout, config,
                                                                                     spec, date)
        self._tokenizer = None

    def setup(self):
        from tokenminds_model.query_tokenizer import QueryTokenizer

        self._tokenizer = QueryTokenizer.load(self._tokenizer_dir)

    def process(self, items):
        built, dead = grounding_examples(items, self._tokenizer, self._layout, self._config, self._date)
        for example in built:
            yield examples_lib.serialize_example(example, self._spec)
            for table in (schemas.VIDEO_SIDS, CATALOG):
                yield beam.pvalue.TaggedOutput("counts", ((table, self._date, outputs.OUT, ""), 1))
            yield beam.pvalue.TaggedOutput("counts", ((GROUNDING_EXAMPLES, self._date, outputs.STAT,
                                                       example["scenario"]), 1))
        for row in dead:
            yield beam.pvalue.TaggedOutput("dead", row)
            yield beam.pvalue.TaggedOutput("counts", ((row["table"], self._date, outputs.DEAD, row["reason"]), 1))
