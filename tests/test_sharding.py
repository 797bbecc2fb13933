"""The pure slicing rules, checked without any ranks."""

from __future__ import annotations

import pytest
import torch

from tp_plugin.sharding import (ShardSpec, TPSplitError, concat_specs, even_ranges, head_shards, head_specs,
                                shard_tensor, unshard_tensor, vocab_specs)


def test_gqa_split_on_kv_group_boundaries_uneven():
    shards = head_shards(9, 3, 2, what="attn")  # 3 groups of 3 query heads: 2 groups + 1 group
    assert [(s.q_heads, s.kv_heads) for s in shards] == [((0, 6), (0, 2)), ((6, 9), (2, 3))]
    assert not any(s.kv_shared for s in shards)


def test_kv_heads_replicated_when_tp_exceeds_them():
    shards = head_shards(4, 2, 4, what="attn")
    assert [s.q_heads for s in shards] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert [s.kv_heads for s in shards] == [(0, 1), (0, 1), (1, 2), (1, 2)]  # each KV head on the ranks using it
    assert all(s.kv_shared for s in shards)


def test_multi_query_attention_replicates_the_single_kv_head():
    shards = head_shards(8, 1, 4, what="attn")
    assert [s.num_q for s in shards] == [2, 2, 2, 2] and {s.kv_heads for s in shards} == {(0, 1)}


@pytest.mark.parametrize("heads,kv,tp", [(6, 3, 4), (4, 2, 8), (2, 2, 4)])
def test_no_valid_head_split_is_an_error(heads, kv, tp):
    with pytest.raises(TPSplitError, match=f"{heads} query heads / {kv} KV heads cannot be split over {tp} ranks"
                       if kv < tp else "cannot be split"):
        head_shards(heads, kv, tp, what="attn")


def test_even_ranges_are_near_even_and_cover():
    assert even_ranges(98, 4, what="mlp") == [(0, 25), (25, 50), (50, 74), (74, 98)]
    with pytest.raises(TPSplitError, match="size 3 cannot be split over 4 ranks"):
        even_ranges(3, 4, what="mlp")


def test_vocab_is_padded_to_equal_shards():
    specs = vocab_specs(101, 4)
    assert [s.ranges for s in specs] == [((0, 26),), ((26, 52),), ((52, 78),), ((78, 101),)]
    assert [s.local_size for s in specs] == [26] * 4 and specs[-1].pad == 3


def test_fused_qkv_spec_takes_each_part():
    # GPT-2 style q|k|v, 4 heads of dim 2, rank 1 of 2: heads 2-3 of q, of k and of v
    q = head_specs([(0, 2), (2, 4)], 4, 2, dim=1)
    fused = concat_specs([q[1], q[1], q[1]])
    assert fused.ranges == ((4, 8), (12, 16), (20, 24)) and fused.full_size == 24


def test_shard_and_unshard_round_trip_with_overlap_and_padding():
    full = torch.arange(20.0).reshape(10, 2)
    specs = [ShardSpec(0, 10, ((0, 4),)), ShardSpec(0, 10, ((2, 6), (6, 10)), pad=1)]  # rows 2-3 held twice
    shards = [shard_tensor(full, s) for s in specs]
    assert shards[1].shape == (9, 2) and torch.equal(shards[1][-1], torch.zeros(2))
    assert torch.equal(unshard_tensor(shards, specs), full)
