import json
import pickle
import random

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tokenminds_model.query_tokenizer import (METADATA_FILENAME, MODEL_FILENAME, QueryTokenizer,
                                              clean_training_queries, train_query_tokenizer)
from tokenminds_model.vocabulary import VocabularyLayout
from transforms.query_sampling import SampleQueries, sample_key, sample_queries_locally

TOPICS = {
    "music": ["guitar", "piano", "lessons", "live", "concert", "cover", "song", "lyrics", "drum", "jazz"],
    "cooking": ["pasta", "recipe", "easy", "pizza", "dough", "vegan", "curry", "bread", "dinner", "quick"],
    "sports": ["football", "highlights", "goals", "tennis", "match", "training", "workout", "running", "best",
               "skills"],
    "travel": ["paris", "tokyo", "vlog", "guide", "cheap", "flights", "hotel", "street", "food", "tour"],
}


def synthetic_queries(count: int, seed: int = 7) -> list[str]:
    """Queries of 1-4 words from one topic each, with some case and width variation for the normalizer."""
    rng = random.Random(seed)
    queries = []
    for _ in range(count):
        words = rng.choice(list(TOPICS.values()))
        query = " ".join(rng.choice(words) for _ in range(rng.randint(1, 4)))
        if rng.random() < 0.1:
            query = query.upper()
        queries.append(query)
    return queries


def search_events(count: int, seed: int = 11) -> list[dict]:
    rng = random.Random(seed)
    queries = synthetic_queries(count, seed)
    return [{"user_id": f"user_{rng.randrange(40)}", "event_ts": 1_700_000_000 + i, "query": q}
            for i, q in enumerate(queries)]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return synthetic_queries(600)


@pytest.fixture(scope="module")
def tokenizer(corpus) -> QueryTokenizer:
    return train_query_tokenizer(corpus, vocab_size=120)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizing.
# ---------------------------------------------------------------------------------------------------------------
def test_query_round_trips_through_sentencepiece(tokenizer):
    for query in ["guitar lessons", "Easy  PASTA recipe ", "ｐｉｚｚａ dough", "tokyo street food vlog"]:
        ids = tokenizer.encode(query)
        assert ids and all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == tokenizer.normalize(query)
    assert tokenizer.normalize("Easy  PASTA recipe ") == "easy pasta recipe"
    assert tokenizer.normalize("ｐｉｚｚａ") == "pizza"  # NFKC folds full-width letters


def test_unknown_characters_map_to_unk(tokenizer):
    assert 0 in tokenizer.encode("guitar ☃")
    assert tokenizer.id_to_piece(0) == "<unk>"


def test_max_pieces_caps_each_query(tokenizer):
    query = "football highlights goals tennis match training workout"
    full = tokenizer.encode(query)
    assert len(full) > 3
    assert tokenizer.encode(query, max_pieces=3) == full[:3]
    assert tokenizer.encode(query, max_pieces=0) == []
    assert tokenizer.encode_batch([query, "jazz"], max_pieces=3) == [full[:3], tokenizer.encode("jazz")[:3]]
    with pytest.raises(ValueError, match="max_pieces"):
        tokenizer.encode(query, max_pieces=-1)


def test_vocab_size_is_an_upper_bound_and_ids_are_dense(tokenizer):
    assert 2 <= tokenizer.vocab_size <= 120
    assert tokenizer.requested_vocab_size == 120
    big = train_query_tokenizer(["guitar lessons", "pasta recipe"], vocab_size=8000)
    assert big.vocab_size < 8000  # a tiny corpus must not crash on a production vocab size
    pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    assert pieces[0] == "<unk>" and "<s>" not in pieces and "</s>" not in pieces


def test_decode_rejects_out_of_range_ids(tokenizer):
    with pytest.raises(ValueError, match="out of range"):
        tokenizer.decode([tokenizer.vocab_size])


def test_pieces_fit_the_shared_vocabulary(tokenizer):
    layout = VocabularyLayout(sid_levels=3, codebook_size=256, query_vocab_size=tokenizer.vocab_size,
                              sid_model_version="rqvae-test", query_tokenizer_version=tokenizer.version)
    tokens = layout.query_piece_token(tokenizer.encode("live jazz concert"))
    assert [layout.describe(t).piece for t in tokens] == tokenizer.encode("live jazz concert")
    assert layout.query_piece_token(tokenizer.vocab_size - 1) == layout.vocab_size - 1


# ---------------------------------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------------------------------
def test_training_is_deterministic_and_order_independent(corpus, tokenizer):
    again = train_query_tokenizer(corpus, vocab_size=120)
    shuffled = list(corpus)
    random.Random(1).shuffle(shuffled)
    reordered = train_query_tokenizer(shuffled, vocab_size=120)
    assert again.serialized_model == tokenizer.serialized_model
    assert again.version == reordered.version == tokenizer.version
    assert len(tokenizer.version) == 16
    assert train_query_tokenizer(corpus[:300], vocab_size=120).version != tokenizer.version


def test_training_skips_blank_queries_and_counts_the_rest():
    queries = ["guitar lessons", "", "   ", None, "pasta recipe"]
    assert clean_training_queries(queries) == ["guitar lessons", "pasta recipe"]
    assert train_query_tokenizer(queries, vocab_size=50).num_training_queries == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(queries=[], vocab_size=50), "no non-empty queries"),
    (dict(queries=["guitar lessons"], vocab_size=5), "Vocabulary size is smaller than required_chars"),
    (dict(queries=["guitar"], vocab_size=50, model_type="wordpiece"), "model_type"),
    (dict(queries=["guitar"], vocab_size=1), "vocab_size"),
])
def test_training_errors_are_clear(kwargs, message):
    with pytest.raises(ValueError, match=message):
        train_query_tokenizer(**kwargs)


@pytest.mark.parametrize("model_type", ["bpe", "char", "word"])
def test_other_model_types_train(corpus, model_type):
    trained = train_query_tokenizer(corpus, vocab_size=120, model_type=model_type)
    assert trained.model_type == model_type
    assert trained.decode(trained.encode("guitar lessons")) == "guitar lessons"


# ---------------------------------------------------------------------------------------------------------------
# Persistence.
# ---------------------------------------------------------------------------------------------------------------
def test_save_load_gives_the_same_ids(tokenizer, tmp_path):
    directory = str(tmp_path / "query_tokenizer")
    tokenizer.save(directory)
    model_bytes = (tmp_path / "query_tokenizer" / MODEL_FILENAME).read_bytes()
    assert model_bytes == tokenizer.serialized_model  # the SentencePiece proto itself, readable by any SP client
    metadata = json.loads((tmp_path / "query_tokenizer" / METADATA_FILENAME).read_text())
    assert metadata["vocab_size"] == tokenizer.vocab_size
    assert metadata["version"] == tokenizer.version
    assert metadata["model_type"] == "unigram"
    assert metadata["num_training_queries"] == 600
    loaded = QueryTokenizer.load(directory)
    assert loaded == tokenizer
    for query in synthetic_queries(50, seed=99):
        assert loaded.encode(query, max_pieces=8) == tokenizer.encode(query, max_pieces=8)


def test_load_rejects_a_model_that_does_not_match_its_metadata(corpus, tokenizer, tmp_path):
    tokenizer.save(str(tmp_path))
    other = train_query_tokenizer(corpus[:100], vocab_size=60)
    (tmp_path / MODEL_FILENAME).write_bytes(other.serialized_model)
    with pytest.raises(ValueError, match="does not match"):
        QueryTokenizer.load(str(tmp_path))
    (tmp_path / MODEL_FILENAME).write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        QueryTokenizer.load(str(tmp_path))


def test_tokenizer_survives_beam_style_serialization(tokenizer):
    # Beam ships DoFns that hold a tokenizer by pickling them; the model travels as its bytes.
    copy = pickle.loads(pickle.dumps(tokenizer))
    assert copy == tokenizer and copy.encode("jazz piano") == tokenizer.encode("jazz piano")


# ---------------------------------------------------------------------------------------------------------------
# Query sampling.
# ---------------------------------------------------------------------------------------------------------------
def test_sample_key_is_a_stable_hash():
    key = sample_key(0, "user_1", "guitar lessons")
    assert key == sample_key(0, "user_1", "guitar lessons")
    assert 0 <= key < 2**63
    assert key != sample_key(1, "user_1", "guitar lessons")
    assert key != sample_key(0, "user_2", "guitar lessons")
    # Field boundaries matter: no collision by moving characters between user_id and query.
    assert sample_key(0, "ab", "c") != sample_key(0, "a", "bc")
    # Pinned value: a change in the hash would silently change every sample (and tokenizer version).
    assert sample_key(0, "user_1", "guitar lessons") == 760665166879186177


def run_sample(events, max_queries, seed=0):
    """SampleQueries on FnApiRunner, asserting the result equals the plain-Python reference."""
    expected = sample_queries_locally(events, max_queries, seed)
    with TestPipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as pipeline:
        sample = pipeline | beam.Create(events) | SampleQueries(max_queries=max_queries, seed=seed)
        assert_that(sample, equal_to(expected))
    return expected


def test_sample_queries_is_deterministic_and_bounded():
    events = search_events(300) + [{"user_id": "user_1", "event_ts": 0, "query": None},
                                   {"user_id": None, "event_ts": 0, "query": "jazz"},
                                   {"user_id": "user_2", "event_ts": 0, "query": "  "}]
    first = run_sample(events, max_queries=50)
    assert len(first) == 50
    shuffled = list(events)
    random.Random(3).shuffle(shuffled)
    assert run_sample(shuffled, max_queries=50) == first
    assert sorted(sample_queries_locally(events, 50, seed=1)) != sorted(first)


def test_sample_queries_keeps_everything_when_the_input_is_small():
    events = search_events(20)
    assert sorted(run_sample(events, max_queries=1000)) == sorted(e["query"] for e in events)
    assert run_sample([], max_queries=10) == []


def test_sample_queries_rejects_a_non_positive_bound():
    with pytest.raises(ValueError, match="max_queries"):
        SampleQueries(max_queries=0)
