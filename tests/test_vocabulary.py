import json

import numpy as np
import pytest

from tokenminds_model import vocabulary as vocab
from tokenminds_model.vocabulary import TokenInfo, VocabularyLayout


def small_layout(**overrides) -> VocabularyLayout:
    parameters = dict(sid_levels=3, codebook_size=8, disambiguation_size=4,
                      feature_sizes={"surface": 3, "liked": 2}, query_vocab_size=5,
                      sid_model_version="rqvae-2024", query_tokenizer_version="0123456789abcdef")
    parameters.update(overrides)
    return VocabularyLayout(**parameters)


# ---------------------------------------------------------------------------------------------------------------
# Exact ids: these numbers are the contract.
# ---------------------------------------------------------------------------------------------------------------
def test_special_ids_are_fixed():
    assert (vocab.PAD_ID, vocab.BOS_ID, vocab.EOS_ID, vocab.UNK_ID) == (0, 1, 2, 3)
    assert (vocab.LFV_ID, vocab.SFV_ID, vocab.SEARCH_ID, vocab.SOFT_ID) == (4, 5, 6, 7)
    assert vocab.NUM_SPECIAL_IDS == 16
    assert vocab.condition_token("LFV") == 4 and vocab.condition_token("SFV") == 5
    with pytest.raises(ValueError, match="unknown scenario"):
        vocab.condition_token("MOVIE")


def test_condition_tokens_cover_the_schema_scenarios():
    from transforms import schemas
    assert set(vocab.CONDITION_TOKEN_IDS) == set(schemas.SCENARIOS)


def test_exact_ids_for_a_small_layout():
    layout = small_layout()
    # specials [0,16) | sid_0 [16,24) sid_1 [24,32) sid_2 [32,40) | dis [40,44) | surface [44,47) liked [47,49)
    # | query [49,54)
    assert layout.sid_token(0, 0) == 16
    assert layout.sid_token(1, 5) == 16 + 8 + 5 == 29
    assert layout.sid_token(2, 7) == 39
    assert layout.disambiguation_token(0) == 40
    assert layout.feature_token("surface", 2) == 46
    assert layout.feature_token("liked", 1) == 48
    assert layout.query_piece_token(0) == 49
    assert layout.query_piece_token(4) == 53
    assert layout.vocab_size == 54
    assert [(r.name, r.start, r.end) for r in layout.ranges] == [
        ("special", 0, 16), ("sid_0", 16, 24), ("sid_1", 24, 32), ("sid_2", 32, 40), ("disambiguation", 40, 44),
        ("feat_surface", 44, 47), ("feat_liked", 47, 49), ("query", 49, 54)]


def test_default_layout_size():
    layout = VocabularyLayout(sid_levels=3, codebook_size=256, query_vocab_size=8000)
    features = sum(n for _, n in vocab.DEFAULT_FEATURE_SIZES)
    assert layout.vocab_size == 16 + 3 * 256 + 64 + features + 8000
    assert layout.feature_names == ("watch_ratio", "watch_time", "surface", "device", "liked", "disliked",
                                    "time_gap")


def test_layout_is_a_hashable_value_that_beam_can_ship():
    import pickle
    layout = small_layout()
    assert layout == small_layout() and hash(layout) == hash(small_layout())
    copy = pickle.loads(pickle.dumps(layout))  # Beam pickles DoFns that hold a layout
    assert copy == layout and copy.sid_token(1, 5) == 29 and copy.ranges == layout.ranges
    with pytest.raises(TypeError):
        VocabularyLayout(3, 8, 5)  # keyword-only: same-typed ints must not be swapped by position


def test_same_code_at_another_level_is_another_token():
    layout = small_layout()
    assert len({layout.sid_token(level, 3) for level in range(3)}) == 3


def test_feature_order_decides_the_ids():
    a = small_layout(feature_sizes={"surface": 3, "liked": 2})
    b = small_layout(feature_sizes={"liked": 2, "surface": 3})
    assert a.vocab_size == b.vocab_size
    assert a.feature_token("surface", 0) != b.feature_token("surface", 0)
    assert a != b


# ---------------------------------------------------------------------------------------------------------------
# Vectorised SID encoding.
# ---------------------------------------------------------------------------------------------------------------
def test_sid_tokens_prefix_on_lists_and_arrays():
    layout = small_layout()
    assert layout.sid_tokens([1, 2, 3], prefix_len=2) == [17, 26]
    assert layout.sid_tokens((1, 2, 3)) == [17, 26, 35]
    codes = np.array([[1, 2, 3], [7, 0, 5]])
    tokens = layout.sid_tokens(codes, prefix_len=2)
    assert isinstance(tokens, np.ndarray) and tokens.dtype == np.int64
    np.testing.assert_array_equal(tokens, [[17, 26], [23, 24]])
    np.testing.assert_array_equal(layout.sid_codes(tokens), codes[:, :2])
    assert layout.sid_codes([17, 26]) == [1, 2]
    # Element-wise helpers agree with the batch helper.
    assert [layout.sid_token(level, int(c)) for level, c in enumerate(codes[1, :2])] == tokens[1].tolist()


def test_scalar_helpers_accept_arrays():
    layout = small_layout()
    np.testing.assert_array_equal(layout.feature_token("surface", np.array([0, 2])), [44, 46])
    np.testing.assert_array_equal(layout.query_piece_token(np.arange(5)), np.arange(49, 54))
    assert layout.query_piece_token([0, 1]) == [49, 50]
    assert layout.sid_token(1, np.int64(5)) == 29 and isinstance(layout.sid_token(1, np.int64(5)), int)


# ---------------------------------------------------------------------------------------------------------------
# Inverse: every id round-trips.
# ---------------------------------------------------------------------------------------------------------------
def test_every_id_round_trips_through_describe_and_token_string():
    layout = small_layout()
    strings = set()
    for token_id in range(layout.vocab_size):
        info = layout.describe(token_id)
        assert info.token_id == token_id
        assert layout.token_id(info) == token_id
        string = layout.token_string(token_id)
        assert layout.parse_token_string(string) == token_id
        strings.add(string)
    assert len(strings) == layout.vocab_size


def test_describe_and_token_string_examples():
    layout = small_layout(codebook_size=256, query_vocab_size=100)
    assert layout.describe(4) == TokenInfo(4, "special", name="<LFV>")
    assert layout.token_string(vocab.SEARCH_ID) == "<Search>"
    assert layout.token_string(vocab.SOFT_ID) == "<soft>"
    assert layout.describe(9) == TokenInfo(9, "reserved", name="<reserved_9>")
    sid = layout.sid_token(1, 203)
    assert layout.describe(sid) == TokenInfo(sid, "sid", level=1, code=203)
    assert layout.token_string(sid) == "sid_1_203"
    assert layout.token_string(layout.disambiguation_token(3)) == "dis_3"
    feature = layout.feature_token("surface", 2)
    assert layout.describe(feature) == TokenInfo(feature, "feature", feature="surface", bucket=2)
    assert layout.token_string(feature) == "feat_surface_2"
    assert layout.token_string(layout.query_piece_token(17)) == "q_17"
    assert layout.describe(layout.query_piece_token(17)).piece == 17
    assert layout.format_tokens([1, 4, sid, feature, 2]) == "<bos> <LFV> sid_1_203 feat_surface_2 <eos>"


def test_feature_names_with_underscores_parse():
    layout = small_layout(feature_sizes={"watch_ratio": 4, "watch": 2})
    assert layout.parse_token_string("feat_watch_ratio_3") == layout.feature_token("watch_ratio", 3)
    assert layout.parse_token_string("feat_watch_1") == layout.feature_token("watch", 1)


def test_ranges_tile_the_space_without_overlap():
    layout = VocabularyLayout(sid_levels=4, codebook_size=256, query_vocab_size=32000)
    assert layout.ranges[0].start == 0
    for before, after in zip(layout.ranges, layout.ranges[1:]):
        assert before.end == after.start and before.size > 0
    assert layout.ranges[-1].end == layout.vocab_size
    assert len({r.name for r in layout.ranges}) == len(layout.ranges)


# ---------------------------------------------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, message", [
    (lambda l: l.sid_token(0, 8), r"SID code 8 at level 0 out of range \[0, 8\)"),
    (lambda l: l.sid_token(0, -1), "out of range"),
    (lambda l: l.sid_token(3, 0), r"SID level 3 out of range \[0, 3\)"),
    (lambda l: l.sid_tokens([1, 9, 0]), r"SID code 9 at level 1 out of range \[0, 8\)"),
    (lambda l: l.sid_tokens(np.array([[1, 2, 3], [1, 2, 8]])), "SID code 8 at level 2"),
    (lambda l: l.sid_tokens([1, 2], prefix_len=3), "k >= prefix_len=3"),
    (lambda l: l.sid_tokens([1, 2, 3], prefix_len=4), r"prefix_len 4 out of range \[1, 3\]"),
    (lambda l: l.sid_codes([16, 16]), "not a level-1 SID token"),
    (lambda l: l.disambiguation_token(4), r"disambiguation code 4 out of range \[0, 4\)"),
    (lambda l: l.feature_token("surface", 3), r"bucket 3 of feature 'surface' out of range \[0, 3\)"),
    (lambda l: l.feature_token("colour", 0), "unknown feature 'colour'"),
    (lambda l: l.query_piece_token(np.array([0, 5])), r"query piece id out of range \[0, 5\): \[5\]"),
    (lambda l: l.describe(54), r"token id 54 outside the vocabulary \[0, 54\)"),
    (lambda l: l.describe(-1), "outside the vocabulary"),
    (lambda l: l.token_string(10**6), "outside the vocabulary"),
    (lambda l: l.parse_token_string("sid_3_0"), "SID level 3 out of range"),
    (lambda l: l.parse_token_string("sid_01_2"), "unrecognised token string"),
    (lambda l: l.parse_token_string("q_5"), "out of range"),
    (lambda l: l.parse_token_string("<reserved_4>"), "not a reserved special id"),
    (lambda l: l.parse_token_string("hello"), "unrecognised token string"),
])
def test_out_of_range_errors_are_clear(call, message):
    with pytest.raises(ValueError, match=message):
        call(small_layout())


def test_non_integer_inputs_are_rejected():
    layout = small_layout()
    with pytest.raises(TypeError):
        layout.sid_token(0, 1.5)
    with pytest.raises(TypeError):
        layout.describe(True)
    with pytest.raises(TypeError):
        layout.sid_tokens(np.array([0.0, 1.0, 2.0]))


@pytest.mark.parametrize("overrides, message", [
    (dict(sid_levels=0), "sid_levels must be >= 1"),
    (dict(codebook_size=-3), "codebook_size must be >= 1"),
    (dict(feature_sizes={"Surface": 3}), "feature name 'Surface'"),
    (dict(feature_sizes=[("surface", 3), ("surface", 2)]), "appears twice"),
    (dict(feature_sizes={"surface": 0}), "must be >= 1"),
    (dict(query_vocab_size=0), "query_vocab_size must be >= 1"),
    (dict(sid_model_version=""), "sid_model_version must be a non-empty string"),
])
def test_invalid_parameters_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_layout(**overrides)


# ---------------------------------------------------------------------------------------------------------------
# Manifest.
# ---------------------------------------------------------------------------------------------------------------
def test_manifest_records_ranges_sizes_and_versions():
    manifest = small_layout(transform_fn_version="tft-7").to_manifest()
    assert manifest["format"] == vocab.MANIFEST_FORMAT
    assert manifest["vocab_size"] == 54
    assert manifest["versions"] == {"sid_model_version": "rqvae-2024", "query_tokenizer_version": "0123456789abcdef",
                                    "transform_fn_version": "tft-7"}
    assert manifest["ranges"][1] == {"name": "sid_0", "start": 16, "end": 24}
    assert manifest["parameters"]["feature_sizes"] == [{"name": "surface", "num_buckets": 3},
                                                       {"name": "liked", "num_buckets": 2}]
    assert {"id": 6, "token": "<Search>"} in manifest["special_tokens"]


def test_manifest_json_round_trip_is_exact():
    layout = small_layout()
    manifest = json.loads(json.dumps(layout.to_manifest()))
    rebuilt = VocabularyLayout.from_manifest(manifest)
    assert rebuilt == layout
    assert rebuilt.to_manifest() == manifest
    assert rebuilt.ranges == layout.ranges


def test_manifest_file_round_trip(tmp_path):
    layout = small_layout(transform_fn_version="tft-7")
    path = str(tmp_path / "nested" / vocab.MANIFEST_FILENAME)
    layout.save_manifest(path)
    assert VocabularyLayout.load_manifest(path) == layout
    assert json.loads(open(path).read()) == layout.to_manifest()


def test_save_manifest_requires_versions(tmp_path):
    with pytest.raises(ValueError, match="query_tokenizer_version"):
        small_layout(query_tokenizer_version=None).save_manifest(str(tmp_path / "m.json"))


def _corrupt(manifest, edit):
    manifest = json.loads(json.dumps(manifest))
    edit(manifest)
    return manifest


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["ranges"][2].update(end=33), "differing keys: \\['ranges'\\]"),
    (lambda m: m["ranges"].pop(), "ranges"),
    (lambda m: m.update(vocab_size=55), "vocab_size"),
    (lambda m: m["parameters"].update(codebook_size=9), "ranges"),
    (lambda m: m["special_tokens"][4].update(token="<MOVIE>"), "special_tokens"),
    (lambda m: m.update(extra=1), "extra"),
    (lambda m: m.update(format="tokenminds.vocabulary/0"), "unsupported vocabulary manifest format"),
    (lambda m: m["parameters"].pop("sid_levels"), "malformed"),
    (lambda m: m["parameters"].update(sid_levels="3"), "malformed"),
])
def test_corrupted_manifest_is_rejected(edit, message):
    with pytest.raises(ValueError, match=message):
        VocabularyLayout.from_manifest(_corrupt(small_layout().to_manifest(), edit))


def test_corrupted_manifest_file_is_rejected(tmp_path):
    path = tmp_path / "vocabulary.json"
    small_layout().save_manifest(str(path))
    manifest = json.loads(path.read_text())
    manifest["ranges"][-1]["end"] += 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="inconsistent"):
        VocabularyLayout.load_manifest(str(path))
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON vocabulary manifest"):
        VocabularyLayout.load_manifest(str(path))
