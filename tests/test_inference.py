"""Distributed inference on a split model: inputs are divided over data-parallel replicas, never between the ranks
of a TP group; ranks of a TP group that get different inputs fail on every rank before any token; replicas may
do different amounts of work.

Generation is greedy, so the split model's tokens must equal the unsplit model's exactly (its logits differ from
the unsplit ones only in the order of fp32 sums, ~1e-6, far below the gaps between the top two logits here).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import tp_plugin
from tests.dist import run_ranks
from tests.models import batch, build

PROMPTS = batch(seed=4, batch_size=5, seq=6)  # 5 prompts over 2 replicas: 3 and 2


def _generate(model, prompt: torch.Tensor) -> list[int]:
    with torch.no_grad():
        return model.generate(prompt[None], max_new_tokens=4, do_sample=False)[0].tolist()


def _split_between_processes(rank, world, how):
    from accelerate import Accelerator, PartialState

    model = build("llama", 2).eval()
    ref = copy.deepcopy(model)
    tp_plugin.parallelize(model, tp_size=2)
    if how == "accelerator":  # the Accelerator made after the split, the model prepared
        accelerator = Accelerator(cpu=True)
        model = accelerator.prepare(model)
        state = accelerator
    else:  # Accelerate's distributed-inference recipe: a PartialState, the model never prepared
        state = PartialState(cpu=True)
    unwrapped = getattr(model, "module", model)
    with state.split_between_processes(list(range(len(PROMPTS)))) as mine:
        tokens = [_generate(unwrapped, PROMPTS[i]) for i in mine]  # replica 0: 3 calls, replica 1: 2
    expected = [_generate(ref, PROMPTS[i]) for i in mine]
    return {"mine": list(mine), "tokens": tokens, "expected": expected}


@pytest.mark.parametrize("how", ["accelerator", "partial_state"])
def test_split_between_processes_divides_over_replicas_and_generates_the_unsplit_tokens(how):
    results = run_ranks(4, _split_between_processes, how)
    assert [r["mine"] for r in results] == [[0, 1, 2], [0, 1, 2], [3, 4], [3, 4]], results
    for r in results:
        assert r["tokens"] == r["expected"], r


def _different_inputs(rank, world, where):
    model = tp_plugin.parallelize(build("llama", 2), tp_size=2).eval()
    prompt = PROMPTS[rank:rank + 1]  # a different prompt on every rank: what a world-wide split gives
    try:
        with torch.no_grad():
            if where == "generate":
                model.generate(prompt, max_new_tokens=4, do_sample=False)
            else:
                model(prompt)
    except RuntimeError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("where", ["generate", "eval_forward"])
def test_different_inputs_in_a_tp_group_fail_on_every_rank(where):
    messages = run_ranks(4, _different_inputs, where)
    assert all(m and "got different batches" in m for m in messages), messages
    assert "tensor-parallel group [0, 1]" in messages[0] and "tensor-parallel group [2, 3]" in messages[2]
    assert ("generate()" if where == "generate" else "evaluation forward") in messages[0]


def _later_eval_after_training(rank, world):
    """An evaluation after training is checked again (its first forward), not only the first one ever."""
    model = tp_plugin.parallelize(build("llama", 2), tp_size=2)
    same = PROMPTS[:2]
    model.eval()
    with torch.no_grad():
        model(same)  # equal on both ranks: passes
    model.train()
    model(same, labels=same).loss.backward()
    model.eval()
    try:
        with torch.no_grad():
            model(PROMPTS[rank:rank + 1])
    except RuntimeError as exc:
        return str(exc)
    return None


def test_every_evaluation_is_checked():
    messages = run_ranks(2, _later_eval_after_training)
    assert all(m and "got different batches in an evaluation forward" in m for m in messages), messages


def _one_rank_of_a_group_generates(rank, world):
    os.environ["TP_PLUGIN_ARRIVAL_TIMEOUT"] = "3"
    model = tp_plugin.parallelize(build("llama", 2), tp_size=2).eval()
    if rank == 1:  # TP group [0, 1]: only rank 0 generates; group [2, 3]: both do
        return None
    try:
        _generate(model, PROMPTS[0])
    except tp_plugin.TPSplitError as exc:
        return str(exc)
    return "generated"


def test_the_arrival_check_waits_for_the_tp_group_only():
    results = run_ranks(4, _one_rank_of_a_group_generates)
    assert results[2] == results[3] == "generated", results  # the other group is not held up
    message = results[0]
    assert "1 of 2 ranks of tensor-parallel group [0, 1]" in message and "generate" in message, message


def _generate_clients(rank, world):
    """What calls `generate` around a split model, each against the same call on the unsplit model."""
    from transformers import pipeline
    from transformers.generation.streamers import BaseStreamer

    from tests.test_trl import _tokenizer

    class Collect(BaseStreamer):
        def __init__(self):
            self.tokens = []

        def put(self, value):
            self.tokens.append(value.tolist())

        def end(self):
            pass

    tokenizer = _tokenizer()
    tokenizer.padding_side = "left"
    ref = build("llama", 2).eval()
    model = tp_plugin.parallelize(copy.deepcopy(ref), tp_size=2).eval()
    padded = tokenizer(["t5 t6 t7 t8", "t9 t10"], return_tensors="pt", padding=True)
    calls = {"beams": dict(input_ids=PROMPTS[:2], num_beams=3, max_new_tokens=4, do_sample=False),
             "left_padding": dict(**padded, max_new_tokens=4, do_sample=False),
             "static_cache": dict(input_ids=PROMPTS[:2], max_new_tokens=4, do_sample=False,
                                  cache_implementation="static"),
             "sampling": dict(input_ids=PROMPTS[:2], max_new_tokens=4, do_sample=True, top_k=5)}
    results = {}
    for name, kwargs in calls.items():
        outs = []
        for m in (model, ref):
            torch.manual_seed(7)
            with torch.no_grad():
                outs.append(m.generate(**kwargs).tolist())
        results[name] = outs
    streamed = []
    for m in (model, ref):
        streamer = Collect()
        with torch.no_grad():
            m.generate(PROMPTS[:1], max_new_tokens=4, do_sample=False, streamer=streamer)
        streamed.append(streamer.tokens)
    results["streamer"] = streamed
    with torch.no_grad():  # assisted decoding: the unsplit model drafts, the split one verifies
        results["assisted"] = [m.generate(PROMPTS[:1], assistant_model=copy.deepcopy(ref), max_new_tokens=5,
                                          do_sample=False).tolist() for m in (model, ref)]
    results["pipeline"] = [pipeline("text-generation", model=m, tokenizer=tokenizer)(
        "t5 t6 t7", max_new_tokens=4, do_sample=False)[0]["generated_text"] for m in (model, ref)]
    return results


def test_generate_clients_give_the_unsplit_tokens():
    """Beams, left padding, a static cache, seeded sampling, streamers, assisted decoding and HF's pipeline."""
    for results in run_ranks(2, _generate_clients):
        for name, (split, unsplit) in results.items():
            assert split == unsplit, (name, split, unsplit)
