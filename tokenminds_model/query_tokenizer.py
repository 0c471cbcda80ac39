"""The search-query tokenizer: a SentencePiece model trained in memory on a sample of queries.

Pure functions and a frozen value type, no Beam pipeline code, so that the Beam entry point
(``pipelines/train_query_tokenizer.py``) only has to sample queries, call ``train_query_tokenizer`` on one machine
and ``save`` the result::

    sample = search_events | SampleQueries(max_queries=..., seed=...) | beam.combiners.ToList()
    sample | beam.Map(lambda queries: train_query_tokenizer(queries, vocab_size=...).save(output_dir))

Determinism: training sorts its input (so the order in which a runner delivers the sample does not matter), uses
one thread, no input shuffling or sub-sampling, and a fixed random seed, so the same multiset of queries always
gives a byte-identical model and therefore the same ``version``.

Piece ids: the model has no bos/eos/pad pieces, so its ids are dense, ``0 .. vocab_size-1``, with 0 = SentencePiece's
``<unk>``; ``VocabularyLayout.query_piece_token`` maps them into the shared token space with
``query_vocab_size=tokenizer.vocab_size`` and ``query_tokenizer_version=tokenizer.version``.

On disk (a local directory or anything etils ``epath`` reads, such as gs://): ``query_tokenizer.model`` holds the
SentencePiece serialized ModelProto bytes exactly as trained, ``query_tokenizer.json`` the metadata,
``_MANIFEST.json`` both files' sizes and sha256 (``tokenminds_model.manifest``). ``save`` writes into a staging
directory and swaps it in, never replacing a directory that holds something else; ``load`` verifies the files against
the manifest before anything else (``verify=False``: a worker reloading what its driver verified).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from typing import Any, Dict, Iterable, List, Optional, Sequence

import sentencepiece as spm

from tokenminds_model import manifest as manifest_lib

MODEL_FILENAME = "query_tokenizer.model"
METADATA_FILENAME = "query_tokenizer.json"
METADATA_FORMAT = "tokenminds.query_tokenizer/1"
ARTIFACT_KIND = "query_tokenizer"

MODEL_TYPES = ("unigram", "bpe", "char", "word")
# SentencePiece's built-in rule: NFKC plus Unicode case folding, so "Ｃａｔ" and "CAT" both become "cat".
NORMALIZATION_RULE = "nmt_nfkc_cf"
DEFAULT_CHARACTER_COVERAGE = 0.9995
VERSION_HEX_CHARS = 16  # 64 bits of sha256: plenty to tell models apart, short enough to read in logs

# SentencePiece's whitespace marker; ``normalize`` turns it back into spaces.
_WHITESPACE_MARKER = "\u2581"


def model_version(serialized_model: bytes) -> str:
    """The version of a serialized SentencePiece model: a truncated sha256 of its bytes."""
    return hashlib.sha256(serialized_model).hexdigest()[:VERSION_HEX_CHARS]


def _check_max_pieces(max_pieces: Optional[int]) -> None:
    if max_pieces is not None and (isinstance(max_pieces, bool) or not isinstance(max_pieces, int)
                                   or max_pieces < 0):
        raise ValueError(f"max_pieces must be a non-negative int or None, got {max_pieces!r}")


@dataclasses.dataclass(frozen=True)
class QueryTokenizer:
    """A trained query tokenizer: the serialized model plus how it was trained.

    ``version`` and ``vocab_size`` are derived from ``serialized_model``. Pickling (e.g. Beam shipping a DoFn that
    holds one) transfers only the fields; the SentencePiece processor is rebuilt from the bytes on the other side.
    """
    serialized_model: bytes = dataclasses.field(repr=False)
    model_type: str
    requested_vocab_size: int
    num_training_queries: int
    seed: int
    version: str = dataclasses.field(init=False)
    vocab_size: int = dataclasses.field(init=False)
    _processor: spm.SentencePieceProcessor = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.serialized_model, bytes) or not self.serialized_model:
            raise ValueError("serialized_model must be the non-empty bytes of a SentencePiece model")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} not in {MODEL_TYPES}")
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(self.serialized_model)
        except RuntimeError as error:
            raise ValueError(f"serialized_model is not a valid SentencePiece model: {error}") from None
        # object.__setattr__: the dataclass is frozen; these are derived once from the model bytes.
        object.__setattr__(self, "_processor", processor)
        object.__setattr__(self, "version", model_version(self.serialized_model))
        object.__setattr__(self, "vocab_size", processor.GetPieceSize())

    def __reduce__(self):
        # The SentencePiece processor is a C++ object; rebuild it from the model bytes instead of serializing it.
        return (QueryTokenizer, (self.serialized_model, self.model_type, self.requested_vocab_size,
                                 self.num_training_queries, self.seed))

    # -----------------------------------------------------------------------------------------------------------
    # Tokenizing.
    # -----------------------------------------------------------------------------------------------------------
    def encode(self, query: str, max_pieces: Optional[int] = None) -> List[int]:
        """Piece ids of ``query`` (normalized by the model), keeping at most the first ``max_pieces``."""
        _check_max_pieces(max_pieces)
        ids = self._processor.EncodeAsIds(query)
        return ids if max_pieces is None else ids[:max_pieces]

    def encode_batch(self, queries: Sequence[str], max_pieces: Optional[int] = None) -> List[List[int]]:
        """``encode`` for many queries in one call into SentencePiece (cheaper per query inside a DoFn)."""
        _check_max_pieces(max_pieces)
        batch = self._processor.EncodeAsIds(list(queries))
        return batch if max_pieces is None else [ids[:max_pieces] for ids in batch]

    def pieces(self, query: str, max_pieces: Optional[int] = None) -> List[str]:
        """The pieces of ``query`` as strings, for inspection."""
        return [self._processor.IdToPiece(i) for i in self.encode(query, max_pieces)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of piece ids. Pieces outside the model's characters come back as " ⁇ " (SentencePiece's unk)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"piece ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return self._processor.DecodeIds(ids)

    def normalize(self, query: str) -> str:
        """``query`` as the model sees it: NFKC, case-folded, whitespace collapsed and stripped.

        For a query whose characters are all in the model, ``decode(encode(q)) == normalize(q)``.
        """
        return self._processor.Normalize(query).replace(_WHITESPACE_MARKER, " ").strip(" ")

    def id_to_piece(self, piece_id: int) -> str:
        if not 0 <= piece_id < self.vocab_size:
            raise ValueError(f"piece id {piece_id} out of range [0, {self.vocab_size})")
        return self._processor.IdToPiece(piece_id)

    # -----------------------------------------------------------------------------------------------------------
    # Persistence.
    # -----------------------------------------------------------------------------------------------------------
    def metadata(self) -> Dict[str, Any]:
        return {
            "format": METADATA_FORMAT,
            "version": self.version,
            "vocab_size": self.vocab_size,
            "requested_vocab_size": self.requested_vocab_size,
            "model_type": self.model_type,
            "normalization_rule": NORMALIZATION_RULE,
            "num_training_queries": self.num_training_queries,
            "seed": self.seed,
            "model_file": MODEL_FILENAME,
        }

    def write_files(self, directory: str) -> None:
        """Write ``query_tokenizer.model`` and ``query_tokenizer.json`` into ``directory`` as they are (no staging,
        no manifest): for a staging directory (see ``pipelines.train_query_tokenizer``). Use ``save`` otherwise."""
        path = manifest_lib.as_epath(directory)
        path.mkdir(parents=True, exist_ok=True)
        # The model first: a reader that finds the metadata can rely on the model being complete.
        (path / MODEL_FILENAME).write_bytes(self.serialized_model)
        (path / METADATA_FILENAME).write_text(json.dumps(self.metadata(), indent=2) + "\n")

    def save(self, directory: str) -> None:
        """Write the tokenizer to ``directory`` (local or gs://...): staged, then published with its manifest.
        Replaces an earlier query tokenizer there; refuses (FileExistsError) a directory holding anything else."""
        with manifest_lib.artifact_writer(directory, ARTIFACT_KIND, legacy_markers=(METADATA_FILENAME,)) as staged:
            self.write_files(staged.path)
            staged.extra["version"] = self.version

    @classmethod
    def load(cls, directory: str, *, verify: bool = True) -> "QueryTokenizer":
        """Read a tokenizer written by ``save``: its files must match its manifest (``verify``), the model bytes the
        recorded version and size."""
        path = manifest_lib.as_epath(directory)
        if not path.exists():
            raise FileNotFoundError(f"query tokenizer directory does not exist: {directory}")
        if not (path / METADATA_FILENAME).exists():
            raise FileNotFoundError(f"{directory} has no {METADATA_FILENAME}: not a query tokenizer, or an incomplete "
                                    "save; run pipelines.train_query_tokenizer first")
        try:
            metadata = json.loads((path / METADATA_FILENAME).read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{directory}/{METADATA_FILENAME} is not valid JSON: {error}") from None
        if not isinstance(metadata, dict) or metadata.get("format") != METADATA_FORMAT:
            raise ValueError(f"{directory}/{METADATA_FILENAME}: unsupported format "
                             f"{metadata.get('format') if isinstance(metadata, dict) else metadata!r}")
        if verify:
            cls._verify(directory, metadata)
        serialized_model = (path / MODEL_FILENAME).read_bytes()
        try:
            tokenizer = cls(serialized_model=serialized_model, model_type=metadata["model_type"],
                            requested_vocab_size=metadata["requested_vocab_size"],
                            num_training_queries=metadata["num_training_queries"], seed=metadata["seed"])
        except KeyError as error:
            raise ValueError(f"{directory}/{METADATA_FILENAME} lacks {error}") from None
        if tokenizer.metadata() != metadata:
            raise ValueError(f"{directory}: {MODEL_FILENAME} does not match {METADATA_FILENAME} (model version "
                             f"{tokenizer.version}, vocab size {tokenizer.vocab_size}; metadata says "
                             f"{metadata.get('version')}, {metadata.get('vocab_size')})")
        return tokenizer

    @staticmethod
    def _verify(directory: str, metadata: Dict[str, Any]) -> None:
        try:
            manifest_lib.verify_artifact(directory, ARTIFACT_KIND, version=metadata.get("version"),
                                         descriptor=METADATA_FILENAME)
        except manifest_lib.ArtifactIntegrityError as error:
            model_path = manifest_lib.as_epath(directory) / MODEL_FILENAME
            if error.file == MODEL_FILENAME and model_path.exists():
                try:  # say so when the damaged model does not even parse
                    spm.SentencePieceProcessor().LoadFromSerializedProto(model_path.read_bytes())
                except RuntimeError:
                    raise manifest_lib.ArtifactIntegrityError(
                        f"{error}; {MODEL_FILENAME} is not a valid SentencePiece model", directory=error.directory,
                        kind=error.kind, file=error.file) from None
            raise


def check_legacy_query_tokenizer(directory: str) -> str:
    """For ``python -m tokenminds_model.manifest adopt``: load a manifest-less tokenizer (its model bytes must hash
    to the recorded version) and return that version."""
    return QueryTokenizer.load(directory, verify=False).version


# ---------------------------------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------------------------------
def clean_training_queries(queries: Iterable[Optional[str]]) -> List[str]:
    """The queries training uses, in canonical order: None and blank queries dropped, the rest sorted.

    Sorting makes the trained model independent of the order a runner collected the sample in.
    """
    return sorted(q for q in queries if isinstance(q, str) and q.strip())


def train_query_tokenizer(queries: Iterable[Optional[str]], vocab_size: int, model_type: str = "unigram", *,
                          seed: int = 0,
                          character_coverage: float = DEFAULT_CHARACTER_COVERAGE) -> QueryTokenizer:
    """Train a SentencePiece model in memory on ``queries`` (deterministically; see the module docstring).

    ``vocab_size`` is an upper bound: on a small corpus SentencePiece stops early (``hard_vocab_limit=False``) and
    ``QueryTokenizer.vocab_size`` is what it reached. It must still cover the corpus's characters; if not, this
    raises ValueError saying how many are needed.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} not in {MODEL_TYPES}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    training_queries = clean_training_queries(queries)
    if not training_queries:
        raise ValueError("no non-empty queries to train the query tokenizer on")

    # Global to the process, but SentencePiece reads it only during training, which we run synchronously here.
    spm.set_random_generator_seed(seed)
    model_writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(training_queries),
            model_writer=model_writer,
            model_type=model_type,
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            character_coverage=character_coverage,
            normalization_rule_name=NORMALIZATION_RULE,
            # Dense piece ids with only <unk>=0: the shared vocabulary has its own pad/bos/eos.
            unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
            # Determinism: every query, in our order, one thread.
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=1,
            minloglevel=2,  # training progress goes to stderr otherwise, once per EM round
        )
    except RuntimeError as error:
        raise ValueError(f"SentencePiece training failed (vocab_size={vocab_size}, model_type={model_type!r}, "
                         f"{len(training_queries)} queries): {error}") from None
    return QueryTokenizer(serialized_model=model_writer.getvalue(), model_type=model_type,
                          requested_vocab_size=vocab_size, num_training_queries=len(training_queries), seed=seed)
