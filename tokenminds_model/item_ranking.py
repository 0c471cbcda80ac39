"""TokenMinds as an item ranker, for the standard full-ranking metrics of sequential recommendation.

The model generates Semantic IDs, not item ids. To rank the whole catalogue for a user:

1. beam search decodes the ``top_sids`` most likely full-depth SIDs of the target's scenario, constrained to the SIDs
   of real catalogue items (``decoding.PrefixConstraint``), best first;
2. each SID expands to the items that carry it. Items sharing a full SID (an RQ-VAE collision) cannot be told apart
   by the model, so they are ordered by their training popularity (most frequent training target first, then video
   id): a deterministic, documented tie-break that uses training data only;
3. items the user has already interacted with are skipped when ``exclude`` gives them (the full-ranking protocol
   with seen items masked, as for the ID-based baselines: ``ranking.exclude_seen``);
4. the first ``top_k`` items are the ranking. An item outside them has rank ``>= top_k``: with ``top_k`` = the
   largest cut-off reported (20), Recall@k and NDCG@k for every k <= top_k are exact for full ranking.

The beam keeps ``beam_size`` (>= ``top_k``) SIDs, all of which are expanded, so that masking seen items still
leaves ``top_k`` candidates for nearly every user.

Pure JAX/NumPy (no Beam): ``pipelines.benchmark`` calls it for validation during training and for the test split.
"""
from __future__ import annotations

import collections
from typing import Collection, Dict, List, Mapping, Optional, Sequence

import jax
import numpy as np

from tokenminds_model import decoding
from tokenminds_model.inference import DecodeSettings, UserInference
from tokenminds_model.model import ModelConfig, Params
from tokenminds_model.vocabulary import CONDITION_TOKEN_IDS, VocabularyLayout

SCENARIO_OF_TOKEN = {token: scenario for scenario, token in CONDITION_TOKEN_IDS.items()}
DEFAULT_TOP_K = 20


def items_by_sid(catalogue: Mapping[str, np.ndarray], popularity: Mapping[str, int]) -> Dict[tuple, List[str]]:
    """Full SID -> its videos, the most popular (training targets) first, then by video id."""
    out: Dict[tuple, List[str]] = collections.defaultdict(list)
    for sid, video in zip(np.asarray(catalogue["sid"]).tolist(), catalogue["video_id"]):
        out[tuple(sid)].append(str(video))
    for videos in out.values():
        videos.sort(key=lambda v: (-popularity.get(v, 0), v))
    return dict(out)


def ranks_in_lists(rankings: Sequence[Sequence[str]], targets: Sequence[str], miss_rank: int) -> np.ndarray:
    """0-based rank of each target in its ranking, ``miss_rank`` where it is absent."""
    ranks = np.full(len(targets), miss_rank, np.int64)
    for row, (ranking, target) in enumerate(zip(rankings, targets)):
        for rank, item in enumerate(ranking[:miss_rank]):
            if item == target:
                ranks[row] = rank
                break
    return ranks


class ItemRanker:
    """Top-``top_k`` items per user from a model decoding full-depth SIDs (see the module docstring).

    ``catalogue``: scenario -> {"sid" int [M, levels], "video_id" [M]} (``evaluate.read_catalogue``). Build once;
    ``set_params`` swaps in new parameters without recompiling (validation during training)."""

    def __init__(self, config: ModelConfig, params: Params, layout: VocabularyLayout,
                 catalogue: Mapping[str, Mapping[str, np.ndarray]], popularity: Mapping[str, int], *,
                 top_k: int = DEFAULT_TOP_K, beam_size: Optional[int] = None, batch_size: int = 64):
        if config.sid_length != layout.sid_levels:
            raise ValueError(f"item ranking needs a full-depth SID model (sid_length {config.sid_length} != "
                             f"{layout.sid_levels} levels): build the examples with --full_depth_sids")
        self.top_k = top_k
        scenarios = tuple(s for s, c in catalogue.items() if len(c["sid"]))
        self.items = {s: items_by_sid(catalogue[s], popularity) for s in scenarios}
        constraints = {s: decoding.PrefixConstraint.from_codes(catalogue[s]["sid"], layout.sid_levels,
                                                               layout.codebook_size) for s in scenarios}
        # top_k SIDs always hold at least top_k items (each SID has one or more); more leave room for masking.
        beam = max(beam_size or top_k, top_k)
        settings = DecodeSettings(scenarios=scenarios, top_n=beam, beam_size=beam, prefix_len=layout.sid_levels)
        self.inference = UserInference(config, params, layout, settings=settings, batch_size=batch_size,
                                       constraints=constraints)

    def set_params(self, params: Params) -> None:
        self.inference.params = jax.device_put(params)

    def top_items(self, tokens: np.ndarray, lengths: np.ndarray, scenarios: Sequence[str],
                  soft_features: Optional[np.ndarray] = None,
                  exclude: Optional[Sequence[Collection[str]]] = None) -> List[List[str]]:
        """The ranked items (at most ``top_k``) of each user, for the scenario of its target, without the items of
        ``exclude[u]``."""
        outputs = self.inference(tokens, lengths, soft_features)
        rankings = []
        for row, scenario in enumerate(scenarios):
            seen = exclude[row] if exclude is not None else ()
            items: List[str] = []
            for sid in np.asarray(outputs.codes[scenario][row]).tolist():
                if sid[0] < 0:  # sentinel: fewer valid SIDs than the beam
                    break
                items.extend(v for v in self.items[scenario].get(tuple(sid), ()) if v not in seen)
                if len(items) >= self.top_k:
                    break
            rankings.append(items[:self.top_k])
        return rankings

    def ranks(self, records: Mapping[str, np.ndarray],
              exclude: Optional[Sequence[Collection[str]]] = None) -> np.ndarray:
        """Ranks of ``records``' targets (benchmark examples: ``tokens``, ``length``, ``targets``,
        ``target_video_id``[, ``soft_features``]) with ``exclude[u]`` masked; ``top_k`` for a target outside the
        top ``top_k``."""
        scenarios = [SCENARIO_OF_TOKEN[int(t)] for t in np.asarray(records["targets"])[:, 0, 0]]
        rankings = self.top_items(records["tokens"], np.asarray(records["length"]).reshape(-1), scenarios,
                                  records.get("soft_features"), exclude)
        targets = [v.decode() if isinstance(v, bytes) else str(v)
                   for v in np.asarray(records["target_video_id"]).reshape(-1)]
        return ranks_in_lists(rankings, targets, self.top_k)
