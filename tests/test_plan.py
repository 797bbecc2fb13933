"""`tp_plugin.plan` on its own: a built-in policy resolved against the tiny models of `tests/models.py`, no ranks.

Resolving is pure, so everything a split will do can be checked here before any process group exists:
  - every projection of every decoder layer gets one entry with the style its policy names, the embedding
    and the LM head get vocabulary entries, and the column layers inside a region skip their own input sync;
  - every rank's head ranges and shard specs equal the ones this file works out by hand from the documented
    rules (KV groups split as evenly as possible, the first ranks taking the extra; KV heads replicated when
    tp > KV heads; the MLP's 98 rows split near-evenly; the vocabulary of 101 padded to equal shards);
  - the parameter counts: the unsplit total is `model.num_parameters()`, each rank's is the sum of the shard
    sizes written out here (a tied embedding counted once);
  - bad input raises TPSplitError through `resolve_plan`, naming the module, the numbers and the fix;
  - `str(plan)` (the `inspect` view), `plain_lookup`, embeddings kept whole, regions inferred when the
    policy declares none.

The expected numbers never come from the code under test: `deal` below hands out rows one at a time round the
ranks (a different algorithm from `sharding.even_ranges`' divmod), and the head splits it yields are
cross-checked against the counts the docstrings of `tests/models.py` and `sharding.head_shards` state.
"""

from __future__ import annotations

import math

import pytest

from tests.plan_cases import (CASES, HIDDEN, INTER, LAYERS, LAYOUT, PARAMS, VOCAB, all_in, covers_once, deal,
                              expected_rank_parameters, expected_specs, expected_heads, resolved, vocab_spec)
from tp_plugin.plan import format_plan
from tp_plugin.styles import Colwise, ColumnStyle, RowStyle, VocabEmbedding, VocabLMHead


# ---- the plan of each tiny model ---------------------------------------------------------------------------

def test_the_independent_head_arithmetic_gives_the_documented_splits():
    """Anchors `heads` to the stated numbers, so the tests below compare the plan with the docstrings."""
    for (arch, tp), case in CASES.items():
        heads = expected_heads(case, tp)
        assert tuple(q[1] - q[0] for q, _ in heads) == case.q_per_rank, (arch, tp)
        assert tuple(kv for _, kv in heads) == case.kv_owned, (arch, tp)
    assert deal(INTER, 2) == [49, 49] and deal(INTER, 4) == [25, 25, 24, 24]


@pytest.mark.parametrize("arch,tp", PARAMS)
def test_every_projection_of_every_layer_has_one_entry_with_its_style(arch, tp):
    model, plan = resolved(arch, tp)
    layers, per_layer, embed, head, attn, mlp = LAYOUT[arch]
    paths = [e.path for e in plan.entries]
    expected = {f"{layers}.{i}.{name}" for i in range(LAYERS) for name in per_layer} | {embed, head}
    assert len(paths) == len(set(paths)) and set(paths) == expected, paths
    assert (paths[0], paths[-1]) == (embed, head)  # embedding first, LM head last
    by_path = {e.path: e for e in plan.entries}
    assert isinstance(by_path[embed].style, VocabEmbedding) and isinstance(by_path[head].style, VocabLMHead)
    for i in range(LAYERS):
        for name, style in per_layer.items():
            entry = by_path[f"{layers}.{i}.{name}"]
            assert entry.style == style, (entry.path, entry.style)
            assert isinstance(entry.style, ColumnStyle if isinstance(style, Colwise) else RowStyle)
            # a column layer inside a region leaves its input gradient to the region's one reduction
            assert entry.sync_input_grad is not isinstance(style, Colwise), entry.path
    assert by_path[embed].sync_input_grad and by_path[head].sync_input_grad
    assert set(plan.regions) == {f"{layers}.{i}.{m}" for i in range(LAYERS) for m in (attn, mlp)}
    assert plan.inferred_regions == [] and plan.kept_whole == [] and plan.partial_grad == []
    assert plan.tied_embeddings and plan.policy_name == arch and plan.tp_size == tp


@pytest.mark.parametrize("arch,tp", PARAMS)
def test_head_ranges_match_the_independent_split(arch, tp):
    model, plan = resolved(arch, tp)
    case, a = CASES[arch, tp], plan.attention
    layers, _, _, _, attn, _ = LAYOUT[arch]
    assert (a.num_heads, a.num_kv_heads, a.head_dim) == (case.heads, case.kv_heads, case.head_dim)
    assert a.paths == [f"{layers}.{i}.{attn}" for i in range(LAYERS)]
    assert len(a.heads) == tp
    assert [(h.q_heads, h.kv_heads) for h in a.heads] == expected_heads(case, tp)
    assert sum(h.num_q for h in a.heads) == case.heads and covers_once([h.q_heads for h in a.heads], case.heads)
    assert [h.kv_shared for h in a.heads] == [tp > case.kv_heads] * tp
    if tp <= case.kv_heads:
        assert covers_once([h.kv_heads for h in a.heads], case.kv_heads)


@pytest.mark.parametrize("arch,tp", PARAMS)
def test_every_rank_shard_spec_matches_the_independent_arithmetic(arch, tp):
    model, plan = resolved(arch, tp)
    case = CASES[arch, tp]
    layers, per_layer, embed, head, _, _ = LAYOUT[arch]
    by_path = {e.path: e for e in plan.entries}
    for rank in range(tp):
        for name, (full, specs) in expected_specs(arch, case, tp, rank).items():
            for i in range(LAYERS):
                entry = by_path[f"{layers}.{i}.{name}"]
                assert entry.full_shapes == full, (entry.path, entry.full_shapes)
                assert entry.specs[rank] == specs, (entry.path, rank, entry.specs[rank])
                assert entry.transposed == (arch == "gpt2")
                assert entry.shared_rows == (tp > case.kv_heads and "kv" in per_layer[name].parts
                                             if isinstance(per_layer[name], Colwise) else False), entry.path
                for tensor, shape in full.items():  # the local shape: the spec's rows on its dim, the rest whole
                    spec = specs[tensor]
                    want = list(shape)
                    if spec is not None:
                        want[spec.dim] = sum(b - a for a, b in spec.ranges)
                    assert entry.local_shape(rank, tensor) == tuple(want)
        for path in (embed, head):
            assert by_path[path].full_shapes == {"weight": (VOCAB, HIDDEN)}
            assert by_path[path].specs[rank] == {"weight": vocab_spec(rank, tp)}


@pytest.mark.parametrize("arch,tp", PARAMS)
def test_the_mlp_rows_are_covered_exactly_once(arch, tp):
    """98 rows do not divide by 2 or 4: each row lands on exactly one rank, sizes differ by at most one."""
    model, plan = resolved(arch, tp)
    layers, per_layer, _, _, _, _ = LAYOUT[arch]
    for name, style in per_layer.items():
        if not name.startswith("mlp."):
            continue
        for i in range(LAYERS):
            entry = next(e for e in plan.entries if e.path == f"{layers}.{i}.{name}")
            ranges = [r for spec in entry.specs for r in spec["weight"].ranges]
            assert covers_once(ranges, INTER), (entry.path, ranges)
            sizes = [spec["weight"].local_size for spec in entry.specs]
            assert sum(sizes) == INTER and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("arch,tp", PARAMS)
def test_the_vocabulary_is_padded_so_every_rank_has_the_same_rows(arch, tp):
    model, plan = resolved(arch, tp)
    for entry in (plan.entries[0], plan.entries[-1]):
        specs = [s["weight"] for s in entry.specs]
        assert {s.local_size for s in specs} == {math.ceil(VOCAB / tp)}, entry.path
        assert covers_once([r for s in specs for r in s.ranges], VOCAB)
        assert sum(s.pad for s in specs) == tp * math.ceil(VOCAB / tp) - VOCAB
        assert all(s.pad == 0 or s.ranges[-1][1] == VOCAB for s in specs)  # only ranks past the real rows pad


@pytest.mark.parametrize("arch,tp", PARAMS)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_parameter_counts_of_the_unsplit_model_and_of_each_rank(arch, tp, tied):
    model, plan = resolved(arch, tp, tied)
    assert plan.tied_embeddings == tied
    assert plan.num_parameters == model.num_parameters()
    assert plan.rank_parameters == expected_rank_parameters(arch, CASES[arch, tp], tp, tied)
    plan.count_parameters(model)  # refilling gives the same numbers (nothing accumulates)
    assert plan.num_parameters == model.num_parameters()
    assert plan.rank_parameters == expected_rank_parameters(arch, CASES[arch, tp], tp, tied)


@pytest.mark.parametrize("arch,tp", PARAMS)
def test_replicated_parameters_are_exactly_the_unplanned_ones(arch, tp):
    model, plan = resolved(arch, tp)
    if arch == "llama":
        want = [n for n, _ in model.named_parameters() if n.endswith("norm.weight")]
        assert len(want) == 2 * LAYERS + 1
    else:
        want = [n for n, _ in model.named_parameters() if ".ln_" in n or n == "transformer.wpe.weight"]
        assert len(want) == 4 * LAYERS + 2 + 1
    assert plan.replicated == want


# ---- str(plan): the inspect view -----------------------------------------------------------------------------

@pytest.mark.parametrize("arch,tp", PARAMS)
def test_the_printed_plan_names_the_policy_the_degree_and_the_projections(arch, tp):
    model, plan = resolved(arch, tp)
    case = CASES[arch, tp]
    layers, per_layer, embed, head, _, _ = LAYOUT[arch]
    text = str(plan)
    assert text == format_plan(plan)
    all_in(text, f"policy {arch!r}", f"tp_size={tp}", f"{case.heads} heads / {case.kv_heads} KV heads",
            f"head_dim {case.head_dim}", f"q heads {list(case.q_per_rank)}", embed, head,
            f"parameter count: {model.num_parameters():,} unsplit")
    assert ("(KV heads replicated)" in text) == (tp > case.kv_heads)
    lines = text.splitlines()
    for name, style in per_layer.items():  # the layers fold into one row per projection, with its style
        row = next((line for line in lines if line.startswith(f"{layers}.*.{name} (x{LAYERS})")), None)
        assert row is not None, f"{layers}.*.{name} missing in:\n{text}"
        assert repr(style) in row
    q_name = "self_attn.q_proj" if arch == "llama" else "attn.c_attn"
    row = next(line for line in lines if line.startswith(f"{layers}.*.{q_name}"))
    for q in case.q_per_rank:  # each rank's local shape of the q projection
        local = (q * case.head_dim, HIDDEN) if arch == "llama" else (HIDDEN, 3 * q * case.head_dim)
        assert str(local) in row, (local, row)
