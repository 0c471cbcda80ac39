"""The token space: every id a TokenMinds sequence or model can contain, defined once.

A user's history is one interleaved sequence of ids from a single space, so the sequence builder, the model's
embedding table and every decoder must agree on which id means what. This module is that agreement; nothing else
computes a token id by hand.

Layout (contiguous, in this order; ``[start, end)``)::

    special          [0, 16)                      fixed ids below, 8..15 reserved for future specials
    sid_0 .. sid_{K-1}   one range per RQ level   id = sid_start + level * codebook_size + code
    disambiguation   disambiguation_size ids      the extra level that makes a full SID unique
    feat_<name>      one range per feature        id = feature_start + bucket, in ``feature_sizes`` order
    query            query_vocab_size ids         id = query_start + SentencePiece piece id

Every RQ level gets its own range even though sequences use only a prefix of L levels: the same code at another
level is another token, and the full-SID levels are needed for generation and disambiguation.

Feature bucket ids come later from tensorflow-transform; this module only reserves a fixed number of buckets per
feature, so the layout (and the model's embedding table) does not depend on the transform's fitted boundaries.

Pure Python/NumPy on purpose: the JAX trainer imports it without Beam or TensorFlow. Only ``save_manifest`` and
``load_manifest`` import Beam, lazily, so that manifests can live on GCS.
"""
from __future__ import annotations

import bisect
import dataclasses
import json
import operator
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# Special tokens. The ids are part of the contract (checkpoints and stored sequences depend on them): never renumber.
# ---------------------------------------------------------------------------------------------------------------
PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
UNK_ID = 3
LFV_ID = 4  # condition token before a long-form-video watch
SFV_ID = 5  # condition token before a short-form-video watch
SEARCH_ID = 6  # precedes the SentencePiece pieces of one search query
SOFT_ID = 7  # placeholder position whose embedding is replaced by a soft feature vector

# Ids 8..15 are kept free so new specials can be added without shifting every other range (and every checkpoint).
NUM_SPECIAL_IDS = 16

SPECIAL_TOKENS: Dict[int, str] = {
    PAD_ID: "<pad>",
    BOS_ID: "<bos>",
    EOS_ID: "<eos>",
    UNK_ID: "<unk>",
    LFV_ID: "<LFV>",
    SFV_ID: "<SFV>",
    SEARCH_ID: "<Search>",
    SOFT_ID: "<soft>",
}
_SPECIAL_IDS_BY_STRING = {string: token_id for token_id, string in SPECIAL_TOKENS.items()}

# Scenario value (as in transforms.schemas.SCENARIOS) -> condition token id.
CONDITION_TOKEN_IDS: Dict[str, int] = {"LFV": LFV_ID, "SFV": SFV_ID}


def condition_token(scenario: str) -> int:
    """The condition token id that precedes a watch of ``scenario`` ("LFV" or "SFV")."""
    try:
        return CONDITION_TOKEN_IDS[scenario]
    except (KeyError, TypeError):
        raise ValueError(f"unknown scenario {scenario!r}; expected one of {tuple(CONDITION_TOKEN_IDS)}") from None


# ---------------------------------------------------------------------------------------------------------------
# Defaults.
# ---------------------------------------------------------------------------------------------------------------
DEFAULT_DISAMBIGUATION_SIZE = 64
# Buckets reserved per feature. The transform may use fewer buckets, never more.
DEFAULT_FEATURE_SIZES: Tuple[Tuple[str, int], ...] = (
    ("watch_ratio", 16),
    ("watch_time", 16),
    ("surface", 16),
    ("device", 8),
    ("liked", 2),
    ("disliked", 2),
    ("time_gap", 16),
)

MANIFEST_FORMAT = "tokenminds.vocabulary/1"
MANIFEST_FILENAME = "vocabulary.json"

# Token kinds as reported by ``describe``.
KIND_SPECIAL = "special"
KIND_RESERVED = "reserved"  # an unassigned id in the special range; valid in the space, never emitted
KIND_SID = "sid"
KIND_DISAMBIGUATION = "disambiguation"
KIND_FEATURE = "feature"
KIND_QUERY = "query"

# Range names as they appear in the manifest; also the prefixes of token strings.
SPECIAL_RANGE = "special"
DISAMBIGUATION_RANGE = "disambiguation"
QUERY_RANGE = "query"


def sid_range_name(level: int) -> str:
    return f"sid_{level}"


def feature_range_name(feature: str) -> str:
    return f"feat_{feature}"


# Feature names become part of token strings (``feat_<name>_<bucket>``) and range names, so keep them simple.
_FEATURE_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# Canonical non-negative decimal (no sign, no leading zeros) so that token strings and ids are a bijection.
_NUM = r"(0|[1-9][0-9]*)"
_SID_STRING_RE = re.compile(rf"^sid_{_NUM}_{_NUM}$")
_DISAMBIGUATION_STRING_RE = re.compile(rf"^dis_{_NUM}$")
_FEATURE_STRING_RE = re.compile(rf"^feat_([a-z][a-z0-9_]*)_{_NUM}$")
_QUERY_STRING_RE = re.compile(rf"^q_{_NUM}$")
_RESERVED_STRING_RE = re.compile(rf"^<reserved_{_NUM}>$")

# Stored sequences are TF int64 features; the model casts to int32 on device.
TOKEN_DTYPE = np.int64

ArrayLike = Union[int, Sequence[int], np.ndarray]


@dataclasses.dataclass(frozen=True)
class TokenRange:
    """The ids ``[start, end)`` of one named range."""
    name: str
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start

    def __contains__(self, token_id: int) -> bool:
        return self.start <= token_id < self.end

    def to_json(self) -> Dict[str, Any]:
        return {"name": self.name, "start": self.start, "end": self.end}


@dataclasses.dataclass(frozen=True)
class TokenInfo:
    """What one token id means. Only the fields relevant to ``kind`` are set; the rest are None.

    - special / reserved: ``name`` (e.g. "<LFV>", "<reserved_9>")
    - sid: ``level`` and ``code``
    - disambiguation: ``code``
    - feature: ``feature`` and ``bucket``
    - query: ``piece`` (the SentencePiece id)
    """
    token_id: int
    kind: str
    name: Optional[str] = None
    level: Optional[int] = None
    code: Optional[int] = None
    feature: Optional[str] = None
    bucket: Optional[int] = None
    piece: Optional[int] = None


def _as_int(value: Any, what: str) -> int:
    """An exact integer (Python or NumPy); bools and floats are rejected rather than silently truncated."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what} must be an integer, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {type(value).__name__} {value!r}") from None


def _positive_int(value: Any, what: str) -> int:
    value = _as_int(value, what)
    if value < 1:
        raise ValueError(f"{what} must be >= 1, got {value}")
    return value


def _encode_in_range(values: ArrayLike, offset: int, size: int, what: str,
                     where: str = "") -> Union[int, List[int], np.ndarray]:
    """``offset + values`` after checking ``0 <= values < size``.

    A scalar gives an int, an ndarray an int64 ndarray, a list or tuple a list of ints.
    """
    if np.ndim(values) == 0 and not isinstance(values, np.ndarray):
        value = _as_int(values, what)
        if not 0 <= value < size:
            raise ValueError(f"{what} {value}{where} out of range [0, {size})")
        return offset + value
    array = np.asarray(values)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{what} must be integers, got dtype {array.dtype}")
    array = array.astype(TOKEN_DTYPE, copy=False)
    bad = (array < 0) | (array >= size)
    if bad.any():
        raise ValueError(f"{what}{where} out of range [0, {size}): {array[bad][:5].tolist()}"
                         f"{' ...' if bad.sum() > 5 else ''}")
    tokens = array + offset
    return tokens if isinstance(values, np.ndarray) else tokens.tolist()


@dataclasses.dataclass(frozen=True, kw_only=True)
class VocabularyLayout:
    """The token space, derived entirely from these parameters (keyword-only: several are same-typed ints).

    ``feature_sizes`` may be given as any ordered mapping or sequence of (name, num_buckets) pairs; it is stored as a
    tuple of pairs so the layout stays hashable and the order (which decides the ids) is explicit.
    """
    sid_levels: int
    codebook_size: int
    query_vocab_size: int
    disambiguation_size: int = DEFAULT_DISAMBIGUATION_SIZE
    feature_sizes: Union[Tuple[Tuple[str, int], ...], Mapping[str, int]] = DEFAULT_FEATURE_SIZES
    sid_model_version: Optional[str] = None
    query_tokenizer_version: Optional[str] = None
    transform_fn_version: Optional[str] = None

    _ranges: Tuple[TokenRange, ...] = dataclasses.field(init=False, repr=False, compare=False)
    _range_by_name: Dict[str, TokenRange] = dataclasses.field(init=False, repr=False, compare=False)
    _range_starts: Tuple[int, ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # object.__setattr__: the dataclass is frozen; these are normalisations and derived data, set once here.
        object.__setattr__(self, "sid_levels", _positive_int(self.sid_levels, "sid_levels"))
        object.__setattr__(self, "codebook_size", _positive_int(self.codebook_size, "codebook_size"))
        object.__setattr__(self, "query_vocab_size", _positive_int(self.query_vocab_size, "query_vocab_size"))
        object.__setattr__(self, "disambiguation_size",
                           _positive_int(self.disambiguation_size, "disambiguation_size"))
        object.__setattr__(self, "feature_sizes", self._normalized_feature_sizes(self.feature_sizes))
        for name in ("sid_model_version", "query_tokenizer_version", "transform_fn_version"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string or None, got {value!r}")

        ranges: List[TokenRange] = [TokenRange(SPECIAL_RANGE, 0, NUM_SPECIAL_IDS)]

        def add(name: str, size: int) -> None:
            start = ranges[-1].end
            ranges.append(TokenRange(name, start, start + size))

        for level in range(self.sid_levels):
            add(sid_range_name(level), self.codebook_size)
        add(DISAMBIGUATION_RANGE, self.disambiguation_size)
        for feature, num_buckets in self.feature_sizes:
            add(feature_range_name(feature), num_buckets)
        add(QUERY_RANGE, self.query_vocab_size)

        object.__setattr__(self, "_ranges", tuple(ranges))
        object.__setattr__(self, "_range_by_name", {r.name: r for r in ranges})
        object.__setattr__(self, "_range_starts", tuple(r.start for r in ranges))

    @staticmethod
    def _normalized_feature_sizes(feature_sizes: Any) -> Tuple[Tuple[str, int], ...]:
        pairs = feature_sizes.items() if isinstance(feature_sizes, Mapping) else feature_sizes
        normalized = []
        seen = set()
        for pair in pairs:
            try:
                feature, num_buckets = pair
            except (TypeError, ValueError):
                raise ValueError(f"feature_sizes entries must be (name, num_buckets) pairs, got {pair!r}") from None
            if not isinstance(feature, str) or not _FEATURE_NAME_RE.match(feature):
                raise ValueError(f"feature name {feature!r} must match {_FEATURE_NAME_RE.pattern}")
            if feature in seen:
                raise ValueError(f"feature {feature!r} appears twice in feature_sizes")
            seen.add(feature)
            normalized.append((feature, _positive_int(num_buckets, f"feature_sizes[{feature!r}]")))
        return tuple(normalized)

    # -----------------------------------------------------------------------------------------------------------
    # Ranges.
    # -----------------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._ranges[-1].end

    @property
    def ranges(self) -> Tuple[TokenRange, ...]:
        """All ranges in id order; together they tile ``[0, vocab_size)``."""
        return self._ranges

    def range_by_name(self, name: str) -> TokenRange:
        try:
            return self._range_by_name[name]
        except KeyError:
            raise ValueError(f"no range named {name!r}; ranges are {list(self._range_by_name)}") from None

    @property
    def feature_names(self) -> Tuple[str, ...]:
        return tuple(feature for feature, _ in self.feature_sizes)

    def feature_range(self, feature: str) -> TokenRange:
        if feature not in self.feature_names:
            raise ValueError(f"unknown feature {feature!r}; known features are {list(self.feature_names)}")
        return self._range_by_name[feature_range_name(feature)]

    @property
    def sid_start(self) -> int:
        return self._range_by_name[sid_range_name(0)].start

    @property
    def disambiguation_range(self) -> TokenRange:
        return self._range_by_name[DISAMBIGUATION_RANGE]

    @property
    def query_range(self) -> TokenRange:
        return self._range_by_name[QUERY_RANGE]

    # -----------------------------------------------------------------------------------------------------------
    # Encoding. Vectorised: a scalar gives an int, an ndarray an int64 ndarray of the same shape, a list a list.
    # -----------------------------------------------------------------------------------------------------------
    def _check_level(self, level: Any) -> int:
        level = _as_int(level, "SID level")
        if not 0 <= level < self.sid_levels:
            raise ValueError(f"SID level {level} out of range [0, {self.sid_levels})")
        return level

    def sid_token(self, level: int, code: ArrayLike) -> Union[int, np.ndarray]:
        """The token for ``code`` at RQ ``level``: ``sid_start + level * codebook_size + code``."""
        level = self._check_level(level)
        return _encode_in_range(code, self.sid_start + level * self.codebook_size, self.codebook_size,
                                "SID code", f" at level {level}")

    def sid_tokens(self, codes: ArrayLike, prefix_len: Optional[int] = None) -> Union[List[int], np.ndarray]:
        """Tokens for the first ``prefix_len`` levels of one SID or a batch of SIDs.

        ``codes`` has shape ``(..., k)`` with ``k >= prefix_len`` (one code per RQ level, level 0 first); the result
        has shape ``(..., prefix_len)``. A list/tuple gives a list of ints, an ndarray an int64 ndarray.
        ``prefix_len`` defaults to all ``sid_levels``.
        """
        prefix_len = self.sid_levels if prefix_len is None else _as_int(prefix_len, "prefix_len")
        if not 1 <= prefix_len <= self.sid_levels:
            raise ValueError(f"prefix_len {prefix_len} out of range [1, {self.sid_levels}]")
        array = np.asarray(codes)
        if array.ndim == 0 or array.shape[-1] < prefix_len:
            raise ValueError(f"codes must have shape (..., k) with k >= prefix_len={prefix_len}, "
                             f"got shape {array.shape}")
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"SID codes must be integers, got dtype {array.dtype}")
        prefix = array[..., :prefix_len].astype(TOKEN_DTYPE, copy=False)
        bad = (prefix < 0) | (prefix >= self.codebook_size)
        if bad.any():
            position = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"SID code {int(prefix[position])} at level {position[-1]} out of range "
                             f"[0, {self.codebook_size})")
        level_offsets = self.sid_start + np.arange(prefix_len, dtype=TOKEN_DTYPE) * self.codebook_size
        tokens = prefix + level_offsets
        return tokens if isinstance(codes, np.ndarray) else tokens.tolist()

    def sid_codes(self, tokens: ArrayLike) -> Union[List[int], np.ndarray]:
        """Inverse of ``sid_tokens``: tokens of shape ``(..., L)`` holding levels 0..L-1 back to codes."""
        array = np.asarray(tokens)
        if array.ndim == 0 or not 1 <= array.shape[-1] <= self.sid_levels:
            raise ValueError(f"SID tokens must have shape (..., L) with 1 <= L <= {self.sid_levels}, "
                             f"got shape {array.shape}")
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"SID tokens must be integers, got dtype {array.dtype}")
        level_offsets = self.sid_start + np.arange(array.shape[-1], dtype=TOKEN_DTYPE) * self.codebook_size
        codes = array.astype(TOKEN_DTYPE, copy=False) - level_offsets
        bad = (codes < 0) | (codes >= self.codebook_size)
        if bad.any():
            position = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"token {int(array[position])} at position {position} is not a level-{position[-1]} "
                             f"SID token (expected [{int(level_offsets[position[-1]])}, "
                             f"{int(level_offsets[position[-1]]) + self.codebook_size}))")
        return codes if isinstance(tokens, np.ndarray) else codes.tolist()

    def disambiguation_token(self, code: ArrayLike) -> Union[int, np.ndarray]:
        r = self.disambiguation_range
        return _encode_in_range(code, r.start, r.size, "disambiguation code")

    def feature_token(self, feature: str, bucket: ArrayLike) -> Union[int, np.ndarray]:
        r = self.feature_range(feature)
        return _encode_in_range(bucket, r.start, r.size, "bucket", f" of feature {feature!r}")

    def query_piece_token(self, piece_id: ArrayLike) -> Union[int, np.ndarray]:
        r = self.query_range
        return _encode_in_range(piece_id, r.start, r.size, "query piece id")

    # -----------------------------------------------------------------------------------------------------------
    # Decoding.
    # -----------------------------------------------------------------------------------------------------------
    def _range_of(self, token_id: Any) -> Tuple[int, TokenRange]:
        token_id = _as_int(token_id, "token id")
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} outside the vocabulary [0, {self.vocab_size})")
        return token_id, self._ranges[bisect.bisect_right(self._range_starts, token_id) - 1]

    def describe(self, token_id: int) -> TokenInfo:
        """What ``token_id`` means (kind, level, code / bucket / piece, feature)."""
        token_id, r = self._range_of(token_id)
        index = token_id - r.start
        if r.name == SPECIAL_RANGE:
            if token_id in SPECIAL_TOKENS:
                return TokenInfo(token_id, KIND_SPECIAL, name=SPECIAL_TOKENS[token_id])
            return TokenInfo(token_id, KIND_RESERVED, name=f"<reserved_{token_id}>")
        if r.name == DISAMBIGUATION_RANGE:
            return TokenInfo(token_id, KIND_DISAMBIGUATION, code=index)
        if r.name == QUERY_RANGE:
            return TokenInfo(token_id, KIND_QUERY, piece=index)
        if r.name.startswith("sid_"):
            return TokenInfo(token_id, KIND_SID, level=int(r.name[len("sid_"):]), code=index)
        return TokenInfo(token_id, KIND_FEATURE, feature=r.name[len("feat_"):], bucket=index)

    def token_id(self, info: TokenInfo) -> int:
        """Inverse of ``describe``: the id a TokenInfo stands for (its ``token_id`` field is cross-checked)."""
        if info.kind in (KIND_SPECIAL, KIND_RESERVED):
            token_id = self.parse_token_string(info.name)
        elif info.kind == KIND_SID:
            token_id = self.sid_token(info.level, info.code)
        elif info.kind == KIND_DISAMBIGUATION:
            token_id = self.disambiguation_token(info.code)
        elif info.kind == KIND_FEATURE:
            token_id = self.feature_token(info.feature, info.bucket)
        elif info.kind == KIND_QUERY:
            token_id = self.query_piece_token(info.piece)
        else:
            raise ValueError(f"unknown token kind {info.kind!r}")
        if info.token_id != token_id:
            raise ValueError(f"{info} names token {token_id}, not {info.token_id}")
        return token_id

    def token_string(self, token_id: int) -> str:
        """A readable, parseable name: "<LFV>", "sid_1_203", "dis_4", "feat_surface_3", "q_17", "<reserved_9>"."""
        info = self.describe(token_id)
        if info.kind in (KIND_SPECIAL, KIND_RESERVED):
            return info.name
        if info.kind == KIND_SID:
            return f"sid_{info.level}_{info.code}"
        if info.kind == KIND_DISAMBIGUATION:
            return f"dis_{info.code}"
        if info.kind == KIND_FEATURE:
            return f"feat_{info.feature}_{info.bucket}"
        return f"q_{info.piece}"

    def parse_token_string(self, token_string: str) -> int:
        """Inverse of ``token_string``. Rejects strings that are not the canonical name of an id in this layout."""
        if not isinstance(token_string, str):
            raise TypeError(f"token string must be a str, got {type(token_string).__name__}")
        if token_string in _SPECIAL_IDS_BY_STRING:
            return _SPECIAL_IDS_BY_STRING[token_string]
        if match := _RESERVED_STRING_RE.match(token_string):
            token_id = int(match.group(1))
            if token_id in SPECIAL_TOKENS or not 0 <= token_id < NUM_SPECIAL_IDS:
                raise ValueError(f"{token_string!r} is not a reserved special id")
            return token_id
        if match := _SID_STRING_RE.match(token_string):
            return self.sid_token(int(match.group(1)), int(match.group(2)))
        if match := _DISAMBIGUATION_STRING_RE.match(token_string):
            return self.disambiguation_token(int(match.group(1)))
        if match := _FEATURE_STRING_RE.match(token_string):
            return self.feature_token(match.group(1), int(match.group(2)))
        if match := _QUERY_STRING_RE.match(token_string):
            return self.query_piece_token(int(match.group(1)))
        raise ValueError(f"unrecognised token string {token_string!r}")

    def format_tokens(self, token_ids: Iterable[int]) -> str:
        """A sequence as space-separated token strings, for logs and debugging."""
        return " ".join(self.token_string(t) for t in np.asarray(token_ids).reshape(-1).tolist())

    # -----------------------------------------------------------------------------------------------------------
    # Manifest.
    # -----------------------------------------------------------------------------------------------------------
    def to_manifest(self) -> Dict[str, Any]:
        """A JSON-ready description: parameters, versions, and every range as derived from them."""
        return {
            "format": MANIFEST_FORMAT,
            "vocab_size": self.vocab_size,
            "parameters": {
                "sid_levels": self.sid_levels,
                "codebook_size": self.codebook_size,
                "disambiguation_size": self.disambiguation_size,
                # A list, not an object: the order decides the ids and JSON objects are unordered.
                "feature_sizes": [{"name": feature, "num_buckets": n} for feature, n in self.feature_sizes],
                "query_vocab_size": self.query_vocab_size,
            },
            "versions": {
                "sid_model_version": self.sid_model_version,
                "query_tokenizer_version": self.query_tokenizer_version,
                "transform_fn_version": self.transform_fn_version,
            },
            "special_tokens": [{"id": token_id, "token": token} for token_id, token in sorted(SPECIAL_TOKENS.items())],
            "ranges": [r.to_json() for r in self._ranges],
        }

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> "VocabularyLayout":
        """Rebuild a layout from ``to_manifest()`` output.

        The layout is recomputed from the parameters and the whole manifest must equal the recomputed one: a
        manifest whose ranges, vocab size or special ids disagree with its parameters (hand-edited, or written by
        an incompatible version of this module) is rejected rather than trusted.
        """
        if not isinstance(manifest, Mapping):
            raise ValueError(f"a vocabulary manifest must be a JSON object, got {type(manifest).__name__}")
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"unsupported vocabulary manifest format {manifest.get('format')!r}; "
                             f"expected {MANIFEST_FORMAT!r}")
        try:
            parameters = manifest["parameters"]
            versions = manifest["versions"]
            layout = cls(
                sid_levels=parameters["sid_levels"],
                codebook_size=parameters["codebook_size"],
                disambiguation_size=parameters["disambiguation_size"],
                feature_sizes=[(f["name"], f["num_buckets"]) for f in parameters["feature_sizes"]],
                query_vocab_size=parameters["query_vocab_size"],
                sid_model_version=versions["sid_model_version"],
                query_tokenizer_version=versions["query_tokenizer_version"],
                transform_fn_version=versions["transform_fn_version"],
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"malformed vocabulary manifest: {type(error).__name__}: {error}") from None
        expected = layout.to_manifest()
        if dict(manifest) != expected:
            differing = sorted(set(manifest) ^ set(expected)
                               | {k for k in set(manifest) & set(expected) if manifest[k] != expected[k]})
            raise ValueError(f"vocabulary manifest is inconsistent with its own parameters; differing keys: "
                             f"{differing}")
        return layout

    def save_manifest(self, path: str) -> None:
        """Write the manifest as JSON to a local or Beam FileSystems path (gs://...).

        A manifest on disk is what downstream pipelines and checkpoints trust, so it must name the SID model and
        query tokenizer it was built from.
        """
        missing = [name for name in ("sid_model_version", "query_tokenizer_version") if getattr(self, name) is None]
        if missing:
            raise ValueError(f"refusing to save a vocabulary manifest without {missing}")
        payload = (json.dumps(self.to_manifest(), indent=2) + "\n").encode("utf-8")
        from apache_beam.io.filesystems import FileSystems  # lazy: keep this module importable without Beam
        with FileSystems.create(path) as f:
            f.write(payload)

    @classmethod
    def load_manifest(cls, path: str) -> "VocabularyLayout":
        """Read and validate a manifest written by ``save_manifest`` (local or Beam FileSystems path)."""
        from apache_beam.io.filesystems import FileSystems  # lazy: keep this module importable without Beam
        with FileSystems.open(path) as f:
            payload = f.read()
        try:
            manifest = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a JSON vocabulary manifest: {error}") from None
        return cls.from_manifest(manifest)
