"""The tiny models `tests/test_plan.py` and `tests/test_plan_errors.py` resolve, and their expected plans
worked out by hand (see test_plan's docstring for how).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import pytest
from torch import nn

from tests.models import build
from tp_plugin.plan import resolve_plan
from tp_plugin.sharding import ShardSpec, TPSplitError
from tp_plugin.split import policy_for
from tp_plugin.styles import Colwise, Rowwise

# tests/models.py: hidden 72, MLP 98, vocabulary 101, 2 layers, GPT-2's 64 positions
HIDDEN, INTER, VOCAB, LAYERS, POSITIONS = 72, 98, 101, 2, 64


@dataclass(frozen=True)
class Case:
    heads: int
    kv_heads: int
    head_dim: int
    q_per_rank: tuple[int, ...]  # as documented (tests/models.py, sharding.head_shards)
    kv_owned: tuple[tuple[int, int], ...]  # the KV heads each rank holds, as documented


CASES = {
    # 3 KV groups of 3 query heads over 2 ranks: 2+1 groups, so 6+3 query heads
    ("llama", 2): Case(9, 3, 8, (6, 3), ((0, 2), (2, 3))),
    # 2 KV groups of 2 query heads over 4 ranks: 1 query head each, each KV head on the two ranks of its group
    ("llama", 4): Case(4, 2, 18, (1, 1, 1, 1), ((0, 1), (0, 1), (1, 2), (1, 2))),
    # multi-head (KV heads = heads): 9 heads -> 5+4, 6 heads -> 2+2+1+1; head_dim = hidden / heads
    ("gpt2", 2): Case(9, 9, 8, (5, 4), ((0, 5), (5, 9))),
    ("gpt2", 4): Case(6, 6, 12, (2, 2, 1, 1), ((0, 2), (2, 4), (4, 5), (5, 6))),
}
PARAMS = sorted(CASES)

# (path inside a decoder layer, the style the policy names) for each family
LLAMA_LAYER = {"self_attn.q_proj": Colwise("q"), "self_attn.k_proj": Colwise("kv"), "self_attn.v_proj": Colwise("kv"),
               "self_attn.o_proj": Rowwise("q"), "mlp.gate_proj": Colwise(), "mlp.up_proj": Colwise(),
               "mlp.down_proj": Rowwise()}
GPT2_LAYER = {"attn.c_attn": Colwise("q", "kv", "kv"), "attn.c_proj": Rowwise("q"), "mlp.c_fc": Colwise(),
              "mlp.c_proj": Rowwise()}
LAYOUT = {  # layer prefix, per-layer projections, embedding, LM head, attention module, MLP module
    "llama": ("model.layers", LLAMA_LAYER, "model.embed_tokens", "lm_head", "self_attn", "mlp"),
    "gpt2": ("transformer.h", GPT2_LAYER, "transformer.wte", "lm_head", "attn", "mlp"),
}


# ---- the expected numbers, worked out independently ----------------------------------------------------------

def deal(n: int, parts: int) -> list[int]:
    """Hand out n rows one at a time round the ranks: the first n % parts ranks end up with one more."""
    sizes = [0] * parts
    for i in range(n):
        sizes[i % parts] += 1
    return sizes


def spans(sizes: list[int], start: int = 0) -> list[tuple[int, int]]:
    out = []
    for size in sizes:
        out.append((start, start + size))
        start += size
    return out


def expected_heads(case: Case, tp: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(query head range, KV head range) of each rank: whole KV groups dealt over the ranks, or, with more ranks
    than KV heads, each group's query heads dealt over its tp / kv ranks, which all hold the group's KV head."""
    group = case.heads // case.kv_heads
    if tp <= case.kv_heads:
        return [((a * group, b * group), (a, b)) for a, b in spans(deal(case.kv_heads, tp))]
    return [(q, (kv, kv + 1)) for kv in range(case.kv_heads)
            for q in spans(deal(group, tp // case.kv_heads), kv * group)]


def head_rows(heads: tuple[int, int], head_dim: int, offset: int = 0) -> tuple[int, int]:
    return offset + heads[0] * head_dim, offset + heads[1] * head_dim


def vocab_spec(rank: int, tp: int) -> ShardSpec:
    per_rank = math.ceil(VOCAB / tp)
    start, stop = min(rank * per_rank, VOCAB), min((rank + 1) * per_rank, VOCAB)
    return ShardSpec(0, VOCAB, ((start, stop),), pad=per_rank - (stop - start))


def expected_specs(arch: str, case: Case, tp: int, rank: int) -> dict[str, tuple[dict, dict]]:
    """Per projection (layer-relative path): ({tensor: full shape}, {tensor: this rank's spec or None})."""
    (q, kv), hd = expected_heads(case, tp)[rank], case.head_dim
    q_width, kv_width = case.heads * hd, case.kv_heads * hd
    mlp = spans(deal(INTER, tp))[rank]
    if arch == "llama":  # nn.Linear [out, in], no biases
        return {
            "self_attn.q_proj": ({"weight": (q_width, HIDDEN)}, {"weight": ShardSpec(0, q_width, (head_rows(q, hd),))}),
            "self_attn.k_proj": ({"weight": (kv_width, HIDDEN)}, {"weight": ShardSpec(0, kv_width, (head_rows(kv, hd),))}),
            "self_attn.v_proj": ({"weight": (kv_width, HIDDEN)}, {"weight": ShardSpec(0, kv_width, (head_rows(kv, hd),))}),
            "self_attn.o_proj": ({"weight": (HIDDEN, q_width)}, {"weight": ShardSpec(1, q_width, (head_rows(q, hd),))}),
            "mlp.gate_proj": ({"weight": (INTER, HIDDEN)}, {"weight": ShardSpec(0, INTER, (mlp,))}),
            "mlp.up_proj": ({"weight": (INTER, HIDDEN)}, {"weight": ShardSpec(0, INTER, (mlp,))}),
            "mlp.down_proj": ({"weight": (HIDDEN, INTER)}, {"weight": ShardSpec(1, INTER, (mlp,))}),
        }
    # GPT-2's Conv1D: weight [in, out], output features on dim 1; c_attn is q | k | v, each part split by heads
    qkv = (head_rows(q, hd), head_rows(kv, hd, kv_width), head_rows(kv, hd, 2 * kv_width))
    fused = q_width + 2 * kv_width
    return {
        "attn.c_attn": ({"weight": (HIDDEN, fused), "bias": (fused,)},
                        {"weight": ShardSpec(1, fused, qkv), "bias": ShardSpec(0, fused, qkv)}),
        "attn.c_proj": ({"weight": (q_width, HIDDEN), "bias": (HIDDEN,)},
                        {"weight": ShardSpec(0, q_width, (head_rows(q, hd),)), "bias": None}),  # a row bias: whole
        "mlp.c_fc": ({"weight": (HIDDEN, INTER), "bias": (INTER,)},
                     {"weight": ShardSpec(1, INTER, (mlp,)), "bias": ShardSpec(0, INTER, (mlp,))}),
        "mlp.c_proj": ({"weight": (INTER, HIDDEN), "bias": (HIDDEN,)},
                       {"weight": ShardSpec(0, INTER, (mlp,)), "bias": None}),
    }


def expected_rank_parameters(arch: str, case: Case, tp: int, tied: bool) -> list[int]:
    """Each rank's parameters: replicated ones whole, sharded ones by their local size (vocab padding included)."""
    vocab_rows = math.ceil(VOCAB / tp) * HIDDEN * (1 if tied else 2)
    counts = []
    for (q, kv), mlp in zip(expected_heads(case, tp), deal(INTER, tp)):
        q_dim, kv_dim = (q[1] - q[0]) * case.head_dim, (kv[1] - kv[0]) * case.head_dim
        if arch == "llama":
            replicated = (2 * LAYERS + 1) * HIDDEN  # two RMSNorms per layer, the final norm
            layer = HIDDEN * (q_dim + 2 * kv_dim) + q_dim * HIDDEN + 3 * mlp * HIDDEN
        else:
            replicated = POSITIONS * HIDDEN + (4 * LAYERS + 2) * HIDDEN  # wpe; ln_1, ln_2 per layer, ln_f (w + b)
            layer = ((HIDDEN + 1) * (q_dim + 2 * kv_dim)  # c_attn weight and bias
                     + q_dim * HIDDEN + HIDDEN  # attn.c_proj, its bias whole
                     + (HIDDEN + 1) * mlp  # c_fc
                     + mlp * HIDDEN + HIDDEN)  # mlp.c_proj
        counts.append(replicated + vocab_rows + LAYERS * layer)
    return counts


def covers_once(ranges: list[tuple[int, int]], size: int) -> bool:
    hits = [0] * size
    for a, b in ranges:
        for i in range(a, b):
            hits[i] += 1
    return hits == [1] * size


@lru_cache(maxsize=None)
def resolved(arch: str, tp: int, tied: bool = True):
    """The unsplit model and its plan under the real policy (not mutated by any test)."""
    model = build(arch, tp, tied=tied)
    return model, resolve_plan(model, policy_for(model, tp), tp)


def plan_error(model: nn.Module, policy, tp: int) -> str:
    with pytest.raises(TPSplitError) as info:
        resolve_plan(model, policy, tp)
    return str(info.value)


def all_in(message: str, *parts: str) -> None:
    missing = [p for p in parts if p not in message]
    assert not missing, f"{missing} not in: {message}"
