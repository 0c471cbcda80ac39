"""Offline evaluation of a user model on the eval sets of one day (``pipelines.build_eval_sets``).

    python -m tokenminds_model.evaluate --model=CKPT --eval_sets=<root>/eval_sets/date=D \
        --train_examples=DIR[,DIR...] --video_sids=<root>/video_sids/date=D --output=REPORT_DIR

Per protocol (session, cold_start, leave_one_out, leave_one_out_validation) and per scenario of the target:

Recall@10 (prefix level)
    The model decodes the top 10 SID prefixes of length L (``--prefix_len``, default: the model's L, or 2 for a
    full-depth model) for the target's scenario with ``inference.UserInference``, constrained to the prefixes of that
    scenario's catalogue when ``--video_sids`` is given. A hit: the target's first L SID codes are among them.
    Baselines from the same data, scored the same way:
      most_popular  the 10 most frequent target prefixes (per scenario) of the ``--train_examples``;
      user_recent   the 10 most frequent prefixes among the user's last ``--recent_watches`` watches of the
                    scenario in the history tokens (ties: the more recent first). Fewer than 10 when the user has
                    fewer distinct prefixes: a user's own history is all this baseline knows.
Token diversity (decoded top-10 vs the ground-truth future watches: the positive-reward watches of the target's
scenario in the 24 h after the cutoff, target included)
    For one case, A = the decoded prefixes (valid rows), B = the future watches' prefixes (with repeats). With
    n = min(|A|, |B|) >= 2 (cases with n < 2 are skipped: leave-one-out has one future watch), the larger set is
    downsampled to n without replacement (the smaller is taken whole) 10 times with a seeded generator, and on each
    size-n pair we compute, per set:
      collision rate at position l   1 - (distinct codes at level l) / n
      prefix duplication rate        1 - (distinct length-L prefixes) / n
    averaged over the 10 draws, then over cases. The decoded set never repeats a prefix (beam search returns
    distinct prefixes), so its duplication rate is 0; the comparison of interest is the per-position collision
    rate: how concentrated the model's tokens are relative to what the user actually watched next.
Embedding stability
    Mean cosine similarity between a user's embedding and that of the same user's history with ~20% of the watches
    removed (whole events, keyed-hash choice, built by the pipeline with the training code), against the mean
    cosine with a random other user of the same protocol (a seeded derangement).
Leave-one-out at item granularity
    The model decodes its full depth (every SID level for a ``--full_depth_sids`` model), constrained to the SIDs of
    real items of the scenario; each decoded SID expands to its items ordered by (full SID, disambiguation code),
    and the list is cut at 5 / 10 items: Recall@k = target item in the list, NDCG@k = 1 / log2(rank + 2) on a hit.
    For a prefix-L model the decoded prefixes expand to every item under them (the report says so): with many
    items per prefix the order inside a prefix is arbitrary and the numbers are a lower bound.

Writes ``metrics.json``, ``report.md`` and PNG plots into ``--output``. Exit code 2 (one line on stderr) for a
missing or corrupt checkpoint, missing or incompatible eval sets, or missing training examples.

Every path (model, eval sets, training examples, video SIDs, output) may be local or ``gs://``: files are listed,
read and written through etils ``epath`` (what the checkpoints use) and TFRecords through ``tf.io.gfile``
(``tokenminds_model.data``), never through ``glob``, ``os.path`` or the builtin ``open``. No Beam or
TensorFlow-Transform imports.
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import math
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from etils import epath

from tokenminds_model import data as data_lib
from tokenminds_model import decoding
from tokenminds_model.inference import DecodeSettings, UserInference
from tokenminds_model.model_checkpoints import CheckpointError, load_model
from tokenminds_model.vocabulary import CONDITION_TOKEN_IDS, VocabularyLayout

# The protocol directories pipelines.build_eval_sets writes (transforms.eval_sets.PROTOCOLS; not imported: Beam).
PROTOCOLS = ("session", "cold_start", "leave_one_out", "leave_one_out_validation")
ITEM_PROTOCOLS = ("leave_one_out", "leave_one_out_validation")
SCENARIOS = tuple(CONDITION_TOKEN_IDS)
SCENARIO_OF_TOKEN = {token: scenario for scenario, token in CONDITION_TOKEN_IDS.items()}
METHODS = ("model", "most_popular", "user_recent")
TOP_N = 10
DIVERSITY_DRAWS = 10
DEFAULT_RECENT_WATCHES = 50
DEFAULT_PREFIX_LEN = 2  # SequenceConfig's default L: what a full-depth model is scored at

Prefix = Tuple[int, ...]


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated (missing, incomplete or incompatible); the CLI exits with status 2."""


# ---------------------------------------------------------------------------------------------------------------
# Ranking metrics (plain Python; exact on hand-made cases).
# ---------------------------------------------------------------------------------------------------------------
def hit_rank(ranked: Sequence[Any], target: Any, k: int) -> Optional[int]:
    """0-based rank of ``target`` among the first ``k`` of ``ranked``, or None."""
    for rank, item in enumerate(list(ranked)[:k]):
        if item == target:
            return rank
    return None


def recall_at_k(rankings: Sequence[Sequence[Any]], targets: Sequence[Any], k: int) -> float:
    """Share of cases whose target is among the first ``k`` of its ranking (one relevant item per case)."""
    if not rankings:
        return float("nan")
    return sum(hit_rank(r, t, k) is not None for r, t in zip(rankings, targets)) / len(rankings)


def ndcg_at_k(rankings: Sequence[Sequence[Any]], targets: Sequence[Any], k: int) -> float:
    """Mean NDCG@k with one relevant item: 1 / log2(rank + 2) on a hit (rank 0-based), else 0; the ideal DCG is 1."""
    if not rankings:
        return float("nan")
    total = 0.0
    for ranking, target in zip(rankings, targets):
        rank = hit_rank(ranking, target, k)
        if rank is not None:
            total += 1.0 / math.log2(rank + 2)
    return total / len(rankings)


# ---------------------------------------------------------------------------------------------------------------
# Baselines.
# ---------------------------------------------------------------------------------------------------------------
def most_popular_prefixes(target_rows: np.ndarray, layout: VocabularyLayout, prefix_len: int,
                          top_n: int = TOP_N) -> Dict[str, List[Prefix]]:
    """Per scenario, the ``top_n`` most frequent prefixes among training target rows ``[N, 1 + L_train]``
    (condition token + SID tokens; PAD rows ignored). Ties: the smaller prefix first."""
    counts: Dict[str, collections.Counter] = {s: collections.Counter() for s in SCENARIOS}
    rows = np.asarray(target_rows)
    for token, scenario in SCENARIO_OF_TOKEN.items():
        selected = rows[rows[:, 0] == token]
        if len(selected):
            codes = layout.sid_codes(selected[:, 1:1 + prefix_len].astype(np.int64))
            counts[scenario].update(map(tuple, codes.tolist()))
    return {s: [p for p, _ in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:top_n]]
            for s, c in counts.items()}


def history_watch_prefixes(tokens: np.ndarray, length: int, layout: VocabularyLayout, history_sid_len: int,
                           prefix_len: int) -> List[Tuple[str, Prefix]]:
    """(scenario, prefix) of every watch in a history, oldest first. A watch is a condition token (<LFV>/<SFV>,
    which only ever start a watch) followed by ``history_sid_len`` SID tokens."""
    tokens = np.asarray(tokens)[:int(length)]
    watches = []
    for position in np.flatnonzero(np.isin(tokens, list(SCENARIO_OF_TOKEN))):
        sid_tokens = tokens[position + 1:position + 1 + prefix_len].astype(np.int64)
        if len(sid_tokens) == prefix_len and prefix_len <= history_sid_len:
            watches.append((SCENARIO_OF_TOKEN[int(tokens[position])], tuple(layout.sid_codes(sid_tokens).tolist())))
    return watches


def user_recent_prefixes(watches: Sequence[Tuple[str, Prefix]], scenario: str,
                         recent_watches: int = DEFAULT_RECENT_WATCHES, top_n: int = TOP_N) -> List[Prefix]:
    """The ``top_n`` most frequent prefixes among the last ``recent_watches`` watches of ``scenario``; ties: the
    one watched more recently first."""
    recent = [p for s, p in watches if s == scenario][-recent_watches:] if recent_watches else []
    counts = collections.Counter(recent)
    last_seen = {p: i for i, p in enumerate(recent)}
    return sorted(counts, key=lambda p: (-counts[p], -last_seen[p]))[:top_n]


# ---------------------------------------------------------------------------------------------------------------
# Diversity and stability.
# ---------------------------------------------------------------------------------------------------------------
def collision_rates(codes: np.ndarray) -> Tuple[np.ndarray, float]:
    """For n prefixes ``[n, L]``: per position ``1 - distinct codes / n``, and ``1 - distinct prefixes / n``."""
    codes = np.asarray(codes)
    n = codes.shape[0]
    per_position = np.array([1.0 - len(np.unique(codes[:, l])) / n for l in range(codes.shape[1])])
    return per_position, 1.0 - len({tuple(row) for row in codes.tolist()}) / n


def diversity_case(decoded: np.ndarray, truth: np.ndarray, rng: np.random.Generator,
                   draws: int = DIVERSITY_DRAWS) -> Optional[Dict[str, Any]]:
    """Collision and duplication rates of ``decoded`` and ``truth`` (both ``[*, L]``) at the smaller set's size,
    the larger downsampled ``draws`` times (see the module docstring); None when that size is below 2."""
    decoded, truth = np.asarray(decoded), np.asarray(truth)
    n = min(len(decoded), len(truth))
    if n < 2:
        return None
    sums = {"decoded": [np.zeros(decoded.shape[1]), 0.0], "truth": [np.zeros(decoded.shape[1]), 0.0]}
    for _ in range(draws):
        for name, codes in (("decoded", decoded), ("truth", truth)):
            sample = codes if len(codes) == n else codes[rng.choice(len(codes), n, replace=False)]
            per_position, duplication = collision_rates(sample)
            sums[name][0] += per_position
            sums[name][1] += duplication
    return {name: {"collision_rate_per_position": (per_position / draws).tolist(),
                   "prefix_duplication_rate": duplication / draws}
            for name, (per_position, duplication) in sums.items()}


def mean_diversity(cases: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    if not cases:
        return {"cases": 0}
    out: Dict[str, Any] = {"cases": len(cases)}
    for name in ("decoded", "truth"):
        out[name] = {
            "collision_rate_per_position": np.mean([c[name]["collision_rate_per_position"] for c in cases],
                                                   axis=0).round(6).tolist(),
            "prefix_duplication_rate": round(float(np.mean([c[name]["prefix_duplication_rate"] for c in cases])), 6)}
    return out


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.maximum(norms, 1e-12)


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation with no fixed point (n >= 2): i -> the next row in a random cycle through all rows."""
    order = np.random.default_rng(seed).permutation(n)
    other = np.empty(n, np.int64)
    other[order] = np.roll(order, -1)
    return other


def stability(embeddings: np.ndarray, perturbed: np.ndarray, seed: int) -> Dict[str, Any]:
    """Cosines of each user with their perturbed self and with a random other user (``derangement``)."""
    self_cos = cosine_rows(embeddings, perturbed)
    other_cos = cosine_rows(embeddings, embeddings[derangement(len(embeddings), seed)]) if len(embeddings) > 1 \
        else np.array([])
    return {"users": int(len(embeddings)), "mean_cosine_perturbed": float(np.mean(self_cos)) if len(self_cos) else None,
            "mean_cosine_other": float(np.mean(other_cos)) if len(other_cos) else None,
            "cosines_perturbed": self_cos, "cosines_other": other_cos}


# ---------------------------------------------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------------------------------------------
def read_records(directory: str, names: Optional[Sequence[str]] = None, batch_size: int = 512
                 ) -> Dict[str, np.ndarray]:
    """Every record of a TFRecord directory (``_SUCCESS`` required), in file order, as arrays (only ``names``)."""
    spec = data_lib.load_feature_spec(directory)
    if names is not None:
        missing = [n for n in names if n not in spec]
        if missing:
            raise EvaluationError(f"{directory} has no feature(s) {missing}: not an eval set of build_eval_sets?")
        spec = {n: spec[n] for n in names}
    columns: Dict[str, List[np.ndarray]] = {n: [] for n in spec}
    for batch in data_lib.numpy_batches([directory], batch_size, seed=None, drop_remainder=False, feature_spec=spec):
        for name in spec:
            columns[name].append(batch[name])
    return {n: (np.concatenate(v) if v else np.zeros([0] + list(spec[n]["shape"]),
                                                       np.object_ if spec[n]["dtype"] == "string" else np.int64))
            for n, v in columns.items()}


def read_training_targets(example_dirs: Sequence[str]) -> np.ndarray:
    """All real target rows ``[N, 1 + L_train]`` of training example directories."""
    rows = []
    for directory in example_dirs:
        batch = read_records(directory, ["targets", "num_targets"])
        real = np.arange(batch["targets"].shape[1])[None, :] < batch["num_targets"].reshape(-1, 1)
        rows.append(batch["targets"][real])
    return np.concatenate(rows) if rows else np.zeros((0, 2), np.int64)


def read_catalogue(video_sids_dir: str) -> Dict[str, Dict[str, np.ndarray]]:
    """Per scenario: ``video_id`` (str), ``sid`` (int64 [M, levels]) and ``disambiguation`` of a video_sids
    partition, sorted by (sid, disambiguation)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = epath.Path(video_sids_dir)
    if not (directory / "_SUCCESS").exists():
        raise EvaluationError(f"video SIDs are incomplete or missing: {video_sids_dir}/_SUCCESS")
    tables = []
    for path in sorted(directory.glob("part-*.parquet"), key=str):
        with path.open("rb") as handle:
            tables.append(pq.read_table(handle, columns=["video_id", "scenario", "sid", "disambiguation"]))
    table = pa.concat_tables(tables).to_pydict()
    catalogue = {}
    for scenario in SCENARIOS:
        rows = sorted((tuple(s), d, v) for v, sc, s, d in zip(table["video_id"], table["scenario"], table["sid"],
                                                              table["disambiguation"]) if sc == scenario)
        levels = len(rows[0][0]) if rows else 0  # a scenario may have no videos at all (MovieLens: no SFV)
        catalogue[scenario] = {"sid": np.array([r[0] for r in rows], np.int64).reshape(len(rows), levels),
                               "disambiguation": np.array([r[1] for r in rows], np.int64),
                               "video_id": np.array([r[2] for r in rows], object)}
    return catalogue


def items_by_prefix(catalogue: Mapping[str, np.ndarray], depth: int) -> Dict[Prefix, List[str]]:
    """prefix (first ``depth`` codes) -> its videos in (full SID, disambiguation) order."""
    out: Dict[Prefix, List[str]] = collections.defaultdict(list)
    for sid, video in zip(catalogue["sid"].tolist(), catalogue["video_id"]):
        out[tuple(sid[:depth])].append(video)
    return out


def expand_to_items(prefixes: Sequence[Prefix], index: Mapping[Prefix, Sequence[str]], k: int) -> List[str]:
    """The first ``k`` videos of the decoded prefixes, in decoded order, each prefix's videos in index order."""
    items: List[str] = []
    for prefix in prefixes:
        items.extend(index.get(tuple(prefix), ()))
        if len(items) >= k:
            break
    return items[:k]


# ---------------------------------------------------------------------------------------------------------------
# Model.
# ---------------------------------------------------------------------------------------------------------------
def constraints_for(catalogue: Optional[Mapping[str, Mapping[str, np.ndarray]]], prefix_len: int,
                    layout: VocabularyLayout) -> Optional[Dict[str, decoding.PrefixConstraint]]:
    if catalogue is None:
        return None
    return {s: decoding.PrefixConstraint.from_codes(c["sid"], prefix_len, layout.codebook_size)
            for s, c in catalogue.items() if len(c["sid"])}


def rows_of(codes: np.ndarray) -> List[Prefix]:
    """Decoded ``[top_n, L]`` codes -> prefixes, sentinel rows (-1) dropped."""
    return [tuple(row) for row in np.asarray(codes).tolist() if row[0] >= 0]


# ---------------------------------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------------------------------
EVAL_NAMES = ["user_id", "tokens", "length", "targets", "target_video_id", "target_sid", "future_sids",
              "num_future", "perturbed_tokens", "perturbed_length"]


def evaluate_protocol(records: Mapping[str, np.ndarray], *, inference: UserInference,
                      layout: VocabularyLayout, prefix_len: int, history_sid_len: int,
                      popular: Mapping[str, List[Prefix]], recent_watches: int, seed: int,
                      item_inference: Optional[UserInference] = None,
                      item_index: Optional[Mapping[str, Mapping[Prefix, List[str]]]] = None,
                      item_depth: Optional[int] = None) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """One protocol's metrics (JSON-ready) and the raw stability cosines (for the plot)."""
    n = len(records["length"])
    soft = records.get("soft_features")
    lengths = records["length"].reshape(-1)
    outputs = inference(records["tokens"], lengths, soft)
    perturbed = inference.embed(records["perturbed_tokens"], records["perturbed_length"].reshape(-1),
                         records.get("perturbed_soft_features"))
    scenario_of_case = np.array([SCENARIO_OF_TOKEN.get(int(t), "?") for t in records["targets"][:, 0, 0]])
    rng = np.random.default_rng(seed)
    result: Dict[str, Any] = {"cases": int(n), "scenarios": {}}
    for scenario in SCENARIOS:
        cases = np.flatnonzero(scenario_of_case == scenario)
        targets = [tuple(records["target_sid"][i, :prefix_len].tolist()) for i in cases]
        rankings = {
            "model": [rows_of(outputs.codes[scenario][i]) for i in cases],
            "most_popular": [popular.get(scenario, [])] * len(cases),
            "user_recent": [user_recent_prefixes(history_watch_prefixes(
                records["tokens"][i], lengths[i], layout, history_sid_len, prefix_len), scenario, recent_watches)
                for i in cases],
        }
        diversity = []
        for i, decoded in zip(cases, rankings["model"]):
            truth = records["future_sids"][i, :int(records["num_future"][i, 0]), :prefix_len]
            case = diversity_case(np.array(decoded, np.int64).reshape(-1, prefix_len), truth, rng)
            if case is not None:
                diversity.append(case)
        result["scenarios"][scenario] = {
            "cases": int(len(cases)),
            "recall@10": {m: recall_at_k(r, targets, TOP_N) for m, r in rankings.items()},
            "diversity": mean_diversity(diversity),
        }
    stable = stability(outputs.embeddings, perturbed, seed)
    cosines = {"perturbed": stable.pop("cosines_perturbed"), "other": stable.pop("cosines_other")}
    result["stability"] = stable
    if item_index is not None and item_depth is not None:
        item_outputs = outputs if item_inference is None else item_inference(records["tokens"], lengths, soft)
        items: Dict[str, Any] = {"depth": item_depth, "scenarios": {}}
        for scenario in SCENARIOS:
            cases = np.flatnonzero(scenario_of_case == scenario)
            rankings = [expand_to_items(rows_of(item_outputs.codes[scenario][i]), item_index[scenario], TOP_N)
                        for i in cases]
            truth = [str(v, "utf-8") if isinstance(v, bytes) else str(v) for v in
                     records["target_video_id"][cases, 0]]
            items["scenarios"][scenario] = {"cases": int(len(cases)), **{
                f"{metric}@{k}": fn(rankings, truth, k) for k in (5, 10)
                for metric, fn in (("recall", recall_at_k), ("ndcg", ndcg_at_k))}}
        result["items"] = items
    return result, cosines


def evaluate(model_dir: str, eval_sets_dir: str, train_example_dirs: Sequence[str], output_dir: str, *,
             video_sids_dir: Optional[str] = None, prefix_len: Optional[int] = None, beam_size: int = 20,
             batch_size: int = 64, recent_watches: int = DEFAULT_RECENT_WATCHES, seed: int = 0,
             protocols: Sequence[str] = PROTOCOLS) -> Dict[str, Any]:
    """Evaluate and write metrics.json, report.md and plots into ``output_dir``; returns the metrics."""
    started = time.perf_counter()
    config, params, layout = load_model(model_dir)
    if not (epath.Path(eval_sets_dir) / "_SUCCESS").exists():
        raise EvaluationError(f"eval sets are incomplete or missing: {eval_sets_dir}/_SUCCESS")
    full_depth = config.sid_length == layout.sid_levels
    prefix_len = prefix_len or (min(DEFAULT_PREFIX_LEN, config.sid_length) if full_depth else config.sid_length)
    if not 1 <= prefix_len <= config.sid_length:
        raise EvaluationError(f"--prefix_len {prefix_len} out of range [1, {config.sid_length}] for this model")
    train_targets = read_training_targets(train_example_dirs)
    if train_targets.shape[1] - 1 < prefix_len:
        raise EvaluationError(f"training targets have {train_targets.shape[1] - 1} SID levels < prefix_len "
                              f"{prefix_len}")
    popular = most_popular_prefixes(train_targets, layout, prefix_len)
    catalogue = read_catalogue(video_sids_dir) if video_sids_dir else None
    settings = DecodeSettings(scenarios=SCENARIOS, top_n=TOP_N, beam_size=max(beam_size, TOP_N),
                              prefix_len=prefix_len)
    inference = UserInference(config, params, layout, settings=settings, batch_size=batch_size,
                              constraints=constraints_for(catalogue, prefix_len, layout))
    item_depth = config.sid_length
    item_inference = None
    if catalogue is not None and item_depth != prefix_len:
        item_inference = UserInference(
            config, params, layout, settings=DecodeSettings(scenarios=SCENARIOS, top_n=TOP_N,
                                                           beam_size=max(beam_size, TOP_N), prefix_len=item_depth),
            batch_size=batch_size, constraints=constraints_for(catalogue, item_depth, layout))
    item_index = None if catalogue is None else {s: items_by_prefix(c, item_depth) for s, c in catalogue.items()}

    metrics: Dict[str, Any] = {
        "model": {"checkpoint": model_dir, "sid_length": config.sid_length, "full_depth": full_depth,
                  "sid_levels": layout.sid_levels, "sid_model_version": layout.sid_model_version},
        "eval_sets": eval_sets_dir, "train_examples": list(train_example_dirs), "video_sids": video_sids_dir,
        "prefix_len": prefix_len, "top_n": TOP_N, "beam_size": settings.beam_size,
        "constrained": catalogue is not None, "recent_watches": recent_watches, "seed": seed,
        "training_target_rows": int(len(train_targets)), "protocols": {}}
    all_cosines: Dict[str, Dict[str, np.ndarray]] = {}
    for protocol in protocols:
        directory = _join(eval_sets_dir, protocol)
        if not (epath.Path(directory) / "_SUCCESS").exists():
            raise EvaluationError(f"eval set {protocol} is incomplete or missing: {directory}/_SUCCESS")
        names = EVAL_NAMES + (["soft_features", "perturbed_soft_features"] if config.soft else [])
        records = read_records(directory, names)
        if records["targets"].shape[2] != config.target_len:
            raise EvaluationError(f"{directory} has {records['targets'].shape[2] - 1}-level targets, the model "
                                  f"{config.sid_length}: build the eval sets with the model's sequence options")
        if not len(records["length"]):
            metrics["protocols"][protocol] = {"cases": 0, "scenarios": {}}
            continue
        with_items = protocol in ITEM_PROTOCOLS and catalogue is not None
        metrics["protocols"][protocol], all_cosines[protocol] = evaluate_protocol(
            records, inference=inference, layout=layout, prefix_len=prefix_len,
            history_sid_len=config.sid_length, popular=popular, recent_watches=recent_watches, seed=seed,
            item_inference=item_inference if with_items else None,
            item_index=item_index if with_items else None, item_depth=item_depth if with_items else None)
        if with_items:
            metrics["protocols"][protocol]["items"]["note"] = (
                "full SIDs with disambiguation order" if full_depth else
                f"the model decodes prefix-{item_depth} SIDs only (not a --full_depth_sids model): each decoded "
                f"prefix expands to all its items, ordered by (SID, disambiguation)")
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    write_report(metrics, all_cosines, output_dir)
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------------------------------
def _join(directory: str, name: str) -> str:
    """``directory/name`` for a local path or a URI (gs://...), as a string for ``tokenminds_model.data``."""
    return f"{str(directory).rstrip('/')}/{name}"


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def write_report(metrics: Mapping[str, Any], cosines: Mapping[str, Mapping[str, np.ndarray]],
                 output_dir: str) -> None:
    output = epath.Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True, default=float) + "\n")
    plots = write_plots(metrics, cosines, output_dir)
    L = metrics["prefix_len"]
    lines = [f"# Evaluation of {metrics['model']['checkpoint']}", "",
             f"Eval sets `{metrics['eval_sets']}`; prefixes of length L={L} "
             f"({'constrained to the catalogue' if metrics['constrained'] else 'unconstrained'}), top "
             f"{metrics['top_n']} of a beam of {metrics['beam_size']}; model SID length "
             f"{metrics['model']['sid_length']} of {metrics['model']['sid_levels']} levels. Definitions: "
             f"`tokenminds_model/evaluate.py`.", "",
             "## Recall@10 (target prefix among the top 10)", "",
             "| protocol | scenario | cases | model | most popular | user recent |", "|---|---|---|---|---|---|"]
    for protocol, result in metrics["protocols"].items():
        for scenario, cell in result.get("scenarios", {}).items():
            r = cell["recall@10"]
            lines.append(f"| {protocol} | {scenario} | {cell['cases']} | {_fmt(r['model'])} | "
                         f"{_fmt(r['most_popular'])} | {_fmt(r['user_recent'])} |")
    lines += ["", "## Token diversity (decoded top-10 vs ground-truth future watches, equal set sizes)", "",
              "Per case: the larger of {decoded prefixes, future watches' prefixes} is downsampled to the smaller "
              "one's size n (n >= 2; 10 seeded draws, averaged); collision rate at position l = 1 - distinct "
              "codes at l / n, prefix duplication = 1 - distinct prefixes / n; then averaged over cases.", "",
              "| protocol | scenario | cases | decoded collision per position | truth collision per position | "
              "decoded prefix dup. | truth prefix dup. |", "|---|---|---|---|---|---|---|"]
    for protocol, result in metrics["protocols"].items():
        for scenario, cell in result.get("scenarios", {}).items():
            d = cell["diversity"]
            if not d.get("cases"):
                continue
            lines.append(f"| {protocol} | {scenario} | {d['cases']} | "
                         f"{', '.join(f'{x:.3f}' for x in d['decoded']['collision_rate_per_position'])} | "
                         f"{', '.join(f'{x:.3f}' for x in d['truth']['collision_rate_per_position'])} | "
                         f"{d['decoded']['prefix_duplication_rate']:.3f} | {d['truth']['prefix_duplication_rate']:.3f} |")
    lines += ["", "## Embedding stability (cosine with ~20% of watches dropped vs with a random other user)", "",
              "| protocol | users | mean cos (perturbed self) | mean cos (other user) |", "|---|---|---|---|"]
    for protocol, result in metrics["protocols"].items():
        s = result.get("stability")
        if s:
            lines.append(f"| {protocol} | {s['users']} | {_fmt(s['mean_cosine_perturbed'])} | "
                         f"{_fmt(s['mean_cosine_other'])} |")
    item_rows = [(p, r["items"]) for p, r in metrics["protocols"].items() if "items" in r]
    if item_rows:
        lines += ["", "## Leave-one-out at item granularity", ""]
        for protocol, items in item_rows:
            lines.append(f"- {protocol}: SID depth {items['depth']}; {items['note']}.")
        lines += ["", "| protocol | scenario | cases | Recall@5 | Recall@10 | NDCG@5 | NDCG@10 |",
                  "|---|---|---|---|---|---|---|"]
        for protocol, items in item_rows:
            for scenario, cell in items["scenarios"].items():
                lines.append(f"| {protocol} | {scenario} | {cell['cases']} | {_fmt(cell['recall@5'])} | "
                             f"{_fmt(cell['recall@10'])} | {_fmt(cell['ndcg@5'])} | {_fmt(cell['ndcg@10'])} |")
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots] + [""]
    (output / "report.md").write_text("\n".join(lines))


def _save_figure(fig, output_dir: str, name: str) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    (epath.Path(output_dir) / name).write_bytes(buffer.getvalue())


def write_plots(metrics: Mapping[str, Any], cosines: Mapping[str, Mapping[str, np.ndarray]],
                output_dir: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    protocols = [p for p, r in metrics["protocols"].items() if r.get("scenarios")]
    if protocols:
        fig, axes = plt.subplots(1, len(protocols), figsize=(4 * len(protocols), 3.5), squeeze=False)
        for ax, protocol in zip(axes[0], protocols):
            scenarios = list(metrics["protocols"][protocol]["scenarios"])
            for j, method in enumerate(METHODS):
                values = [metrics["protocols"][protocol]["scenarios"][s]["recall@10"][method] for s in scenarios]
                ax.bar(np.arange(len(scenarios)) + (j - 1) * 0.27, np.nan_to_num(values), 0.27, label=method)
            ax.set_xticks(np.arange(len(scenarios)), scenarios)
            ax.set_title(protocol)
            ax.set_ylabel("Recall@10")
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        _save_figure(fig, output_dir, "recall_at_10.png")
        plt.close(fig)
        written.append("recall_at_10.png")
    if cosines:
        fig, axes = plt.subplots(1, len(cosines), figsize=(4 * len(cosines), 3.2), squeeze=False)
        for ax, (protocol, values) in zip(axes[0], cosines.items()):
            both = np.concatenate([values["perturbed"], values["other"]])
            low = float(np.min(both)) if len(both) else -1.0  # zoom in: the cosines are often all near 1
            bins = np.linspace(min(low, 0.999), 1.0, 41)
            ax.hist(values["perturbed"], bins=bins, alpha=0.6, label="20% watches dropped")
            ax.hist(values["other"], bins=bins, alpha=0.6, label="random other user")
            ax.set_title(protocol)
            ax.set_xlabel("cosine")
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        _save_figure(fig, output_dir, "stability_cosines.png")
        plt.close(fig)
        written.append("stability_cosines.png")
    return written


# ---------------------------------------------------------------------------------------------------------------
# CLI.
# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model checkpoint directory (tokenminds_model.train)")
    parser.add_argument("--eval_sets", required=True, help="<root>/eval_sets/date=D (pipelines.build_eval_sets)")
    parser.add_argument("--train_examples", required=True,
                        help="comma-separated training example directories (the most-popular baseline)")
    parser.add_argument("--output", required=True, help="report directory (metrics.json, report.md, PNGs)")
    parser.add_argument("--video_sids", default=None,
                        help="<root>/video_sids/date=D: constrain decoding to catalogue prefixes; item metrics")
    parser.add_argument("--prefix_len", type=int, default=None,
                        help="L scored (default: the model's L; 2 for a full-depth model)")
    parser.add_argument("--beam_size", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--recent_watches", type=int, default=DEFAULT_RECENT_WATCHES)
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    try:
        unknown = sorted(set(protocols) - set(PROTOCOLS))
        if unknown:
            raise EvaluationError(f"unknown protocol(s) {unknown}; known: {list(PROTOCOLS)}")
        metrics = evaluate(args.model, args.eval_sets, [d for d in args.train_examples.split(",") if d],
                           args.output, video_sids_dir=args.video_sids, prefix_len=args.prefix_len,
                           beam_size=args.beam_size, batch_size=args.batch_size, recent_watches=args.recent_watches,
                           seed=args.seed, protocols=protocols)
    except (FileNotFoundError, CheckpointError, data_lib.CorruptShardError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for protocol, result in metrics["protocols"].items():
        cells = ", ".join(f"{s} " + "/".join(_fmt(c["recall@10"][m]) for m in METHODS)
                          for s, c in result.get("scenarios", {}).items())
        print(f"{protocol}: {result['cases']} cases; Recall@10 model/most_popular/user_recent: {cells}")
    print(f"wrote {_join(args.output, 'metrics.json')} and report.md in {metrics['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
