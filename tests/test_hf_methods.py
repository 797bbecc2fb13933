"""HF's own methods on a split model, called the way the HF docs write them: `save_pretrained` on every rank
writes the unsplit checkpoint, `resize_token_embeddings` matches transformers, and calling a collective method
on one rank only is a clear error within a bounded time that sends nothing and writes nothing.

Tolerances: split vs. unsplit logits differ only in the order of fp32 sums (row-parallel partial sums, the
vocab all-gather), ~1e-7 on logits of order 1; 1e-5 leaves room without hiding a wrong row (a wrong head or
a wrong vocabulary row moves logits by > 1e-2, see test_parity's planted-error test).
"""

from __future__ import annotations

import copy
import json
import os
import time

import pytest
import torch
import torch.distributed as dist

import tp_plugin
from tests.collective_counter import CollectiveCounter
from tests.dist import run_ranks
from tests.models import batch, build

ATOL = 1e-5


# ---- HF save_pretrained on a split model ----------------------------------------------------------------------

def _hf_save(rank, world, out):
    from transformers import AutoModelForCausalLM

    ref = build("llama", 2)
    model = tp_plugin.parallelize(copy.deepcopy(ref), tp_size=2)
    model.save_pretrained(out)  # on every rank, as the HF docs write it for multi-process runs
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = batch()
    with torch.no_grad():
        err = (plain(ids).logits - ref(ids).logits).abs().max().item()
    return err, json.load(open(os.path.join(out, "config.json")))["vocab_size"]


def test_hf_save_pretrained_on_every_rank_writes_the_unsplit_checkpoint(tmp_path):
    for err, vocab in run_ranks(2, _hf_save, str(tmp_path / "hf")):
        assert err <= ATOL and vocab == 101, (err, vocab)


def _save_on_rank0_only(rank, world, out, how):
    os.environ["TP_PLUGIN_ARRIVAL_TIMEOUT"] = "3"  # the ranks are forked from a server started earlier
    model = tp_plugin.parallelize(build("llama", 2), tp_size=2)
    if how == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    result = None
    if rank == 0:
        start = time.monotonic()
        with CollectiveCounter() as counter:
            try:
                if how == "tp_plugin":
                    tp_plugin.save_pretrained(model, out)
                elif how == "generate":
                    model.generate(batch(), max_new_tokens=2)
                else:  # HF's own method, or PEFT's
                    model.save_pretrained(out)
            except tp_plugin.TPSplitError as exc:
                result = (str(exc), time.monotonic() - start, sum(counter.counts.values()))
    dist.barrier()
    return result, sorted(os.listdir(os.path.dirname(out)))


@pytest.mark.parametrize("how", ["hf", "tp_plugin", "peft", "generate"])
def test_saving_or_generating_on_rank0_only_is_a_clear_error_and_writes_nothing(tmp_path, how):
    (message, waited, collectives), listing = run_ranks(2, _save_on_rank0_only, str(tmp_path / "out"), how)[0]
    assert "must be called on every rank" in message and "1 of 2 ranks" in message, message
    assert 3 <= waited < 20, waited  # bounded: the timeout, not the process group's 120 s
    assert collectives == 0 and listing == [], (collectives, listing)  # nothing sent, no file


# ---- resize_token_embeddings ----------------------------------------------------------------------------------

def _resize(rank, world, tied, new_vocab, pad_to):
    ref = build("llama", 2, tied=tied)
    model = tp_plugin.parallelize(copy.deepcopy(ref), tp_size=2)
    torch.manual_seed(3)
    ref.resize_token_embeddings(new_vocab, pad_to_multiple_of=pad_to)
    torch.manual_seed(3)
    model.resize_token_embeddings(new_vocab, pad_to_multiple_of=pad_to)
    ids = torch.randint(0, min(101, new_vocab), (2, 12), generator=torch.Generator().manual_seed(1))
    ids[0, -3:] = torch.arange(new_vocab - 3, new_vocab) if new_vocab > 101 else ids[0, -3:]  # new rows are read
    with torch.no_grad():
        logits, ref_logits = model(ids).logits, ref(ids).logits
    embed = model.get_input_embeddings()
    tied_now = model.get_output_embeddings().weight is embed.weight
    return ((logits - ref_logits).abs().max().item(), tuple(logits.shape), tuple(ref_logits.shape), tied_now,
            model.config.vocab_size, tp_plugin.tp_state(model).plan.num_parameters, ref.num_parameters())


@pytest.mark.parametrize("tied,new_vocab,pad_to", [(True, 120, None), (False, 131, 8), (True, 90, None)])
def test_resize_token_embeddings_matches_transformers(tied, new_vocab, pad_to):
    for err, shape, ref_shape, tied_now, vocab, count, ref_count in run_ranks(2, _resize, tied, new_vocab, pad_to):
        assert shape == ref_shape and err <= ATOL, (err, shape, ref_shape)
        assert tied_now == tied and vocab == ref_shape[-1] and count == ref_count
