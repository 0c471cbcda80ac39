"""Downstream adaptation: turning SIDs and a user's decoded SID prefixes into inputs for other ranking models.

Pure NumPy / SentencePiece, no Beam or TensorFlow imports, so serving code can load the artifacts that
``pipelines/build_adaptation.py`` writes and use them directly:

Prefix embeddings
    For each scenario and each SID prefix of length 1..L, the mean content embedding of the catalog's videos with
    that prefix (``prefix_means``; the pipeline computes the same with Beam). ``PrefixEmbeddingTable`` loads the
    Parquet output; ``pool_prefix_embeddings`` turns a user's decoded prefixes (``tokenminds_model.decoding``
    output: codes ``int[N, L']`` with sentinel rows of -1, scores ``float[N]`` with -inf) into one vector.

n-gram vocabulary
    Ids for SID n-grams counted over the catalog: the anchored prefixes ``p:c0``, ``p:c0.c1``, ... of every SID and,
    optionally, its contiguous n-grams starting at level s >= 1, ``c<s>:c_s.c_s+1...`` (those starting at level 0
    are the prefixes). Ids are assigned by count (descending), then key, starting at 1; 0 is the OOV id.

SentencePiece over SIDs
    Each (level, code) is one Unicode private-use character (``SidSymbols``), so a SID is a short string and
    SentencePiece can learn pieces that merge codes which often occur together. Training is deterministic like the
    query tokenizer's (``tokenminds_model.query_tokenizer``): sorted input, one thread, a fixed seed, no sampling.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections import Counter
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import sentencepiece as spm

SENTINEL_CODE = -1  # tokenminds_model.decoding.SENTINEL_CODE, not imported: that module pulls in JAX
POOLING_METHODS = ("mean", "max", "score_weighted", "topk_concat")
OOV_ID = 0

NGRAM_VOCAB_FILENAME = "sid_ngram_vocab.json"
NGRAM_VOCAB_FORMAT = "tokenminds.sid_ngram_vocab/1"
SPM_MODEL_FILENAME = "sid_spm.model"
SPM_METADATA_FILENAME = "sid_spm.json"
SPM_METADATA_FORMAT = "tokenminds.sid_spm/1"
SPM_MODEL_TYPES = ("bpe", "unigram")

PrefixKey = Tuple[str, Tuple[int, ...]]  # (scenario, SID prefix)


def _read_bytes(path: str) -> bytes:
    """A local file or any URI pyarrow's filesystems understand (gs://...), without importing Beam."""
    if "://" not in path:
        with open(path, "rb") as handle:
            return handle.read()
    import pyarrow.fs

    filesystem, inner = pyarrow.fs.FileSystem.from_uri(path)
    with filesystem.open_input_stream(inner) as handle:
        return handle.read()


def _join_path(directory: str, name: str) -> str:
    return f"{str(directory).rstrip('/')}/{name}"


# ---------------------------------------------------------------------------------------------------------------
# Prefix embeddings.
# ---------------------------------------------------------------------------------------------------------------
def prefix_means(scenarios: Sequence[str], sids: Any, embeddings: Any) -> Dict[PrefixKey, Tuple[np.ndarray, int]]:
    """(scenario, prefix) -> (mean embedding float32[D], number of videos), for every prefix length 1..L.

    ``sids`` int[N, L], ``embeddings`` float[N, D]. Sums are taken in float64 and the mean rounded to float32 once,
    as the pipeline does, so the two agree exactly whenever the sums are exact.
    """
    sids = np.asarray(sids, np.int64)
    embeddings = np.asarray(embeddings, np.float64)
    scenarios = np.asarray(scenarios)
    if sids.ndim != 2 or embeddings.ndim != 2 or not len(scenarios) == len(sids) == len(embeddings):
        raise ValueError(f"expected sids [N, L], embeddings [N, D] and N scenarios, got {sids.shape}, "
                         f"{embeddings.shape}, {scenarios.shape}")
    table = {}
    for scenario in sorted(set(scenarios.tolist())):
        rows = scenarios == scenario
        for length in range(1, sids.shape[1] + 1):
            prefixes, inverse, counts = np.unique(sids[rows, :length], axis=0, return_inverse=True,
                                                  return_counts=True)
            sums = np.zeros((len(prefixes), embeddings.shape[1]))
            np.add.at(sums, inverse.reshape(-1), embeddings[rows])
            for prefix, total, count in zip(prefixes, sums, counts):
                table[(scenario, tuple(int(c) for c in prefix))] = ((total / count).astype(np.float32), int(count))
    return table


class PrefixEmbeddingTable:
    """The prefix-embedding table: (scenario, prefix) -> mean embedding and video count."""

    def __init__(self, entries: Mapping[PrefixKey, Tuple[Any, int]], dim: Optional[int] = None):
        self._entries = {(s, tuple(int(c) for c in p)): (np.asarray(v, np.float32), int(n))
                         for (s, p), (v, n) in entries.items()}
        dims = {v.shape for v, _ in self._entries.values()}
        if len(dims) > 1:
            raise ValueError(f"prefix embeddings of different shapes: {sorted(dims)}")
        self.dim = dims.pop()[0] if dims else dim
        if self.dim is None:
            raise ValueError("an empty table needs an explicit dim")

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]], dim: Optional[int] = None) -> "PrefixEmbeddingTable":
        """Rows shaped like the pipeline's Parquet output (scenario, prefix, num_videos, embedding)."""
        return cls({(r["scenario"], tuple(r["prefix"])): (r["embedding"], r["num_videos"]) for r in rows}, dim)

    @classmethod
    def from_parquet(cls, path: str, dim: Optional[int] = None) -> "PrefixEmbeddingTable":
        """Load ``<adaptation>/date=D/prefix_embeddings/`` (every shard in it) or one Parquet file."""
        import pyarrow.parquet as pq

        return cls.from_rows(pq.read_table(path).to_pylist(), dim)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: PrefixKey) -> bool:
        return key in self._entries

    def embedding(self, scenario: str, prefix: Sequence[int]) -> Optional[np.ndarray]:
        found = self._entries.get((scenario, tuple(int(c) for c in prefix)))
        return None if found is None else found[0]

    def count(self, scenario: str, prefix: Sequence[int]) -> int:
        return self._entries.get((scenario, tuple(int(c) for c in prefix)), (None, 0))[1]

    def for_scenario(self, scenario: str) -> Dict[Tuple[int, ...], np.ndarray]:
        """One scenario's prefix -> embedding dict, the lookup ``pool_prefix_embeddings`` takes."""
        return {p: v for (s, p), (v, _) in self._entries.items() if s == scenario}


def pool_prefix_embeddings(codes: Any, scores: Any, lookup: Mapping[Tuple[int, ...], Any], method: str = "mean",
                           *, k: Optional[int] = None, dim: Optional[int] = None) -> np.ndarray:
    """One float32 vector from a user's decoded prefixes of one scenario.

    ``codes`` int[N, L'] and ``scores`` float[N] (log-probabilities) as beam search returns them; ``lookup`` maps a
    prefix tuple to its embedding (``PrefixEmbeddingTable.for_scenario``). Rows with a negative code (the decoder's
    sentinel slots) or a score of -inf/NaN are ignored, and so are prefixes missing from ``lookup`` (a prefix of a
    video no longer in the catalog): pooling runs over the rows left. With none left the result is zeros.

    - ``mean`` / ``max``: elementwise over the rows left.
    - ``score_weighted``: weights are the softmax of the rows' scores (renormalised over the rows left).
    - ``topk_concat``: the ``k`` best rows by score (ties: earlier row first) concatenated, zero-padded to k*D.

    ``dim`` is needed only when it cannot be read off ``lookup`` (an empty lookup).
    """
    if method not in POOLING_METHODS:
        raise ValueError(f"unknown pooling method {method!r}; expected one of {POOLING_METHODS}")
    if method == "topk_concat" and (not isinstance(k, int) or k < 1):
        raise ValueError(f"topk_concat needs k >= 1, got {k!r}")
    codes = np.asarray(codes)
    scores = np.asarray(scores, np.float64)
    if codes.ndim != 2 or scores.shape != (codes.shape[0],):
        raise ValueError(f"expected codes [N, L'] and scores [N], got {codes.shape} and {scores.shape}")
    if dim is None:
        dim = next((np.asarray(v).shape[0] for v in lookup.values()), None)
        if dim is None:
            raise ValueError("dim is required with an empty lookup")

    valid = (codes >= 0).all(axis=1) & (scores > -np.inf)  # NaN compares False: ignored too
    found = [(i, lookup.get(tuple(int(c) for c in codes[i]))) for i in np.flatnonzero(valid)]
    rows = [i for i, vector in found if vector is not None]
    width = dim * k if method == "topk_concat" else dim
    if not rows:
        return np.zeros(width, np.float32)
    vectors = np.stack([np.asarray(vector, np.float64) for _, vector in found if vector is not None])
    row_scores = scores[rows]
    if method == "mean":
        pooled = vectors.mean(axis=0)
    elif method == "max":
        pooled = vectors.max(axis=0)
    elif method == "score_weighted":
        weights = np.exp(row_scores - row_scores.max())  # shift by the max: a stable softmax
        pooled = (weights / weights.sum()) @ vectors
    else:
        order = sorted(range(len(rows)), key=lambda j: (-row_scores[j], j))[:k]
        pooled = np.zeros(width)
        pooled[:len(order) * dim] = vectors[order].reshape(-1)
    return pooled.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# n-gram vocabulary.
# ---------------------------------------------------------------------------------------------------------------
def _codes_key(codes: Sequence[int]) -> str:
    return ".".join(str(int(c)) for c in codes)


def sid_ngram_keys(sid: Sequence[int], contiguous: bool = False) -> List[str]:
    """The SID's n-gram keys in a fixed order: prefixes by length, then contiguous n-grams by start level, length."""
    codes = [int(c) for c in sid]
    keys = [f"p:{_codes_key(codes[:n])}" for n in range(1, len(codes) + 1)]
    if contiguous:
        keys += [f"c{start}:{_codes_key(codes[start:start + n])}"
                 for start in range(1, len(codes)) for n in range(1, len(codes) - start + 1)]
    return keys


def count_ngrams(sids: Iterable[Sequence[int]], contiguous: bool = False) -> Dict[str, int]:
    return dict(Counter(key for sid in sids for key in sid_ngram_keys(sid, contiguous)))


def assign_ngram_ids(counts: Mapping[str, int], min_count: int = 1,
                     max_ngrams: Optional[int] = None) -> Dict[str, int]:
    """Ids 1.. for the n-grams seen at least ``min_count`` times, most frequent first (ties by key), keeping at most
    ``max_ngrams`` of them; id 0 (OOV) is left for everything else."""
    if min_count < 1 or (max_ngrams is not None and max_ngrams < 0):
        raise ValueError(f"need min_count >= 1 and max_ngrams >= 0, got {min_count}, {max_ngrams}")
    kept = sorted((key for key, n in counts.items() if n >= min_count), key=lambda key: (-counts[key], key))
    return {key: i + 1 for i, key in enumerate(kept[:max_ngrams])}


@dataclasses.dataclass(frozen=True)
class SidNgramVocab:
    ids: Mapping[str, int]
    counts: Mapping[str, int]
    contiguous: bool
    min_count: int
    max_ngrams: Optional[int]
    num_sids: int

    @classmethod
    def build(cls, counts: Mapping[str, int], num_sids: int, contiguous: bool = False, min_count: int = 1,
              max_ngrams: Optional[int] = None) -> "SidNgramVocab":
        ids = assign_ngram_ids(counts, min_count, max_ngrams)
        return cls(ids, {key: int(counts[key]) for key in ids}, contiguous, min_count, max_ngrams, num_sids)

    @property
    def size(self) -> int:
        """Ids in use, OOV included."""
        return len(self.ids) + 1

    def encode(self, sid: Sequence[int]) -> List[int]:
        """The ids of ``sid_ngram_keys(sid)``, OOV_ID for n-grams outside the vocabulary (one id per key)."""
        return [self.ids.get(key, OOV_ID) for key in sid_ngram_keys(sid, self.contiguous)]

    def to_json(self) -> str:
        ngrams = [{"key": key, "id": i, "count": self.counts[key]} for key, i in sorted(self.ids.items(),
                                                                                     key=lambda item: item[1])]
        return json.dumps({"format": NGRAM_VOCAB_FORMAT, "oov_id": OOV_ID, "size": self.size,
                           "contiguous": self.contiguous, "min_count": self.min_count,
                           "max_ngram_vocab": self.max_ngrams, "num_sids": self.num_sids, "ngrams": ngrams},
                          indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "SidNgramVocab":
        document = json.loads(text)
        if document.get("format") != NGRAM_VOCAB_FORMAT:
            raise ValueError(f"not a SID n-gram vocabulary: format {document.get('format')!r}")
        return cls({n["key"]: n["id"] for n in document["ngrams"]}, {n["key"]: n["count"] for n in document["ngrams"]},
                   document["contiguous"], document["min_count"], document["max_ngram_vocab"], document["num_sids"])

    @classmethod
    def load(cls, path: str) -> "SidNgramVocab":
        return cls.from_json(_read_bytes(path).decode("utf-8"))


# ---------------------------------------------------------------------------------------------------------------
# SentencePiece over SIDs.
# ---------------------------------------------------------------------------------------------------------------
# Unicode private-use ranges: characters no normalizer touches and no real text contains.
_PRIVATE_USE = ((0xE000, 0xF8FF), (0xF0000, 0xFFFFD), (0x100000, 0x10FFFD))


@dataclasses.dataclass(frozen=True)
class SidSymbols:
    """(level, code) <-> one private-use character: symbol index ``level * codebook_size + code``, laid out over
    the private-use ranges in order (the BMP's 6,400 first, then planes 15 and 16)."""
    levels: int
    codebook_size: int

    def __post_init__(self):
        capacity = sum(hi - lo + 1 for lo, hi in _PRIVATE_USE)
        if self.levels < 1 or self.codebook_size < 1 or self.levels * self.codebook_size > capacity:
            raise ValueError(f"cannot map {self.levels} levels x {self.codebook_size} codes to at most {capacity} "
                             "private-use characters")

    def symbol(self, level: int, code: int) -> str:
        if not (0 <= level < self.levels and 0 <= code < self.codebook_size):
            raise ValueError(f"(level {level}, code {code}) outside {self.levels} levels x {self.codebook_size}")
        index = level * self.codebook_size + code
        for lo, hi in _PRIVATE_USE:
            if index <= hi - lo:
                return chr(lo + index)
            index -= hi - lo + 1
        raise AssertionError("unreachable: capacity checked in __post_init__")

    def to_text(self, sid: Sequence[int]) -> str:
        if len(sid) > self.levels:
            raise ValueError(f"SID {list(sid)} is deeper than {self.levels} levels")
        return "".join(self.symbol(level, int(code)) for level, code in enumerate(sid))

    def to_sid(self, text: str) -> List[int]:
        """The inverse of ``to_text``; raises on characters that are not this map's symbols or out of level order."""
        codes = []
        for position, char in enumerate(text):
            index, offset = None, 0
            for lo, hi in _PRIVATE_USE:
                if lo <= ord(char) <= hi:
                    index = offset + ord(char) - lo
                offset += hi - lo + 1
            if index is None or index >= self.levels * self.codebook_size:
                raise ValueError(f"{char!r} at position {position} is not a SID symbol")
            level, code = divmod(index, self.codebook_size)
            if level != position:
                raise ValueError(f"symbol of level {level} at position {position}: not a SID prefix")
            codes.append(code)
        return codes

    def metadata(self) -> Dict[str, Any]:
        return {"levels": self.levels, "codebook_size": self.codebook_size,
                "symbol_index": "level * codebook_size + code",
                "private_use_ranges": [[f"U+{lo:04X}", f"U+{hi:04X}"] for lo, hi in _PRIVATE_USE]}


@dataclasses.dataclass(frozen=True)
class SidPieceModel:
    """A SentencePiece model over SID symbol strings. Piece ids are dense ``0 .. vocab_size-1``, 0 = ``<unk>``."""
    serialized_model: bytes = dataclasses.field(repr=False)
    symbols: SidSymbols
    model_type: str
    requested_vocab_size: int
    num_training_sids: int
    seed: int
    version: str = dataclasses.field(init=False)
    vocab_size: int = dataclasses.field(init=False)
    _processor: spm.SentencePieceProcessor = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(self.serialized_model)
        except RuntimeError as error:
            raise ValueError(f"not a valid SentencePiece model: {error}") from None
        object.__setattr__(self, "_processor", processor)  # frozen: derived once from the bytes
        object.__setattr__(self, "version", hashlib.sha256(self.serialized_model).hexdigest()[:16])
        object.__setattr__(self, "vocab_size", processor.GetPieceSize())

    def __reduce__(self):  # the processor is a C++ object: rebuild it from the bytes
        return (SidPieceModel, (self.serialized_model, self.symbols, self.model_type, self.requested_vocab_size,
                                self.num_training_sids, self.seed))

    def encode(self, sid: Sequence[int]) -> List[int]:
        """Piece ids of a SID (or SID prefix). Symbols never seen in training become <unk> (0)."""
        return self._processor.EncodeAsIds(self.symbols.to_text(sid))

    def decode(self, ids: Iterable[int]) -> List[int]:
        """The SID codes of piece ids; raises on <unk> or ids out of range."""
        ids = [int(i) for i in ids]
        if any(not 0 < i < self.vocab_size for i in ids):
            raise ValueError(f"piece ids must be in [1, {self.vocab_size}) (0 is <unk>): {ids}")
        return self.symbols.to_sid("".join(self._processor.IdToPiece(i) for i in ids))

    def metadata(self) -> Dict[str, Any]:
        return {"format": SPM_METADATA_FORMAT, "version": self.version, "vocab_size": self.vocab_size,
                "requested_vocab_size": self.requested_vocab_size, "model_type": self.model_type,
                "num_training_sids": self.num_training_sids, "seed": self.seed, "model_file": SPM_MODEL_FILENAME,
                "symbols": self.symbols.metadata()}

    def metadata_json(self) -> str:
        return json.dumps(self.metadata(), indent=2) + "\n"

    @classmethod
    def from_bytes(cls, serialized_model: bytes, metadata_json: str) -> "SidPieceModel":
        meta = json.loads(metadata_json)
        if meta.get("format") != SPM_METADATA_FORMAT:
            raise ValueError(f"not SID SentencePiece metadata: format {meta.get('format')!r}")
        model = cls(serialized_model, SidSymbols(meta["symbols"]["levels"], meta["symbols"]["codebook_size"]),
                    meta["model_type"], meta["requested_vocab_size"], meta["num_training_sids"], meta["seed"])
        if model.version != meta["version"]:
            raise ValueError(f"{SPM_MODEL_FILENAME} (version {model.version}) does not match its metadata "
                             f"({meta['version']})")
        return model

    @classmethod
    def load(cls, directory: str) -> "SidPieceModel":
        return cls.from_bytes(_read_bytes(_join_path(directory, SPM_MODEL_FILENAME)),
                              _read_bytes(_join_path(directory, SPM_METADATA_FILENAME)).decode("utf-8"))


def train_sid_piece_model(sids: Iterable[Sequence[int]], symbols: SidSymbols, vocab_size: int,
                          model_type: str = "bpe", *, seed: int = 0) -> SidPieceModel:
    """Train SentencePiece in memory on one symbol string per SID (deterministic; see the module docstring).

    ``vocab_size`` is an upper bound: a catalog with fewer useful pieces gives a smaller model (SentencePiece's
    ``hard_vocab_limit=False``), recorded as ``vocab_size``. It must cover every distinct (level, code) symbol plus
    <unk>, else ValueError says how many are needed. BPE is the default: on strings this short, unigram training
    tends to keep single symbols only.
    """
    if model_type not in SPM_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} not in {SPM_MODEL_TYPES}")
    texts = sorted(symbols.to_text(sid) for sid in sids)  # sorted: independent of the order a runner delivers
    if not texts:
        raise ValueError("no SIDs to train the SID SentencePiece model on")
    needed = len(set("".join(texts))) + 1
    if vocab_size < needed:
        raise ValueError(f"--sid_spm_vocab_size={vocab_size} is too small for this catalog: its SIDs use "
                         f"{needed - 1} distinct (level, code) symbols, so at least {needed} pieces are needed")
    spm.set_random_generator_seed(seed)  # process-global, read only while training, which runs synchronously
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=writer, model_type=model_type, vocab_size=vocab_size,
        hard_vocab_limit=False, character_coverage=1.0,  # every symbol stays a piece: any seen SID round-trips
        normalization_rule_name="identity", add_dummy_prefix=False, split_by_unicode_script=False,
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=1, minloglevel=2)
    return SidPieceModel(writer.getvalue(), symbols, model_type, vocab_size, len(texts), seed)
