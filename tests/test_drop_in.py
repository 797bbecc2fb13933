"""What users do in their first hour with a split model, through the real clients: either the unsplit model's
result or a clear error on every rank, never a silent wrong answer or a hang.

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


def test_top_level_exports():
    from tp_plugin.integrations import deepspeed, trainer

    assert tp_plugin.mpu is deepspeed.mpu
    assert tp_plugin.TPTrainerMixin is trainer.TPTrainerMixin and tp_plugin.TPTrainer is trainer.TPTrainer


# ---- a plain loop whose TP ranks get different batches --------------------------------------------------------

def _world_sharded_loop(rank, world):
    model = tp_plugin.parallelize(build("llama", 2), tp_size=2)
    model.train()
    data = torch.randint(3, 101, (8, 12), generator=torch.Generator().manual_seed(0))
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)  # DDP habit
    loader = torch.utils.data.DataLoader(data, batch_size=2, sampler=sampler)
    ids = next(iter(loader))
    with CollectiveCounter() as counter:
        try:
            model(ids, labels=ids)
        except RuntimeError as exc:
            return str(exc), dict(counter.counts)
    return None, dict(counter.counts)


def test_plain_loop_with_world_sharded_batches_fails_on_every_rank():
    for message, counts in run_ranks(2, _world_sharded_loop):
        assert message is not None and "got different batches" in message, message
        assert "TPTrainer" in message and "DistributedSampler" in message, message
        assert counts == {"all_gather": 1}, counts  # the check, then nothing: no forward collective ran


def _same_batch_once(rank, world):
    model = tp_plugin.parallelize(build("llama", 2), tp_size=2)
    model.train()
    ids = batch()
    with CollectiveCounter() as first:
        model(ids, labels=ids).loss.backward()
    with CollectiveCounter() as second:
        model(ids, labels=ids).loss.backward()
    return dict(first.counts), dict(second.counts)


def test_the_check_runs_once_and_costs_one_small_all_gather():
    for first, second in run_ranks(2, _same_batch_once):
        assert first["all_gather"] == second["all_gather"] + 1, (first, second)  # + the check's one all-gather
        assert {k: v for k, v in first.items() if k != "all_gather"} == \
            {k: v for k, v in second.items() if k != "all_gather"}, (first, second)


# ---- per-rank seeds -------------------------------------------------------------------------------------------

def _per_rank_seeds(rank, world):
    model = tp_plugin.parallelize(build("llama", 2), tp_size=2)
    model.eval()
    torch.manual_seed(1234 + rank)  # the DDP habit: seed + rank
    out = model.generate(batch(batch_size=2, seq=5), do_sample=True, max_new_tokens=8, top_k=0,
                         pad_token_id=0)
    # and dropout in training: the first training forward gives every rank TP rank 0's state again
    torch.manual_seed(99 + rank)
    model.train()
    model(batch(), labels=batch())
    return out, torch.rand(3)


def test_per_rank_seeds_cannot_make_sampling_or_dropout_diverge():
    (out0, r0), (out1, r1) = run_ranks(2, _per_rank_seeds)
    assert torch.equal(out0, out1), (out0, out1)
    assert torch.equal(r0, r1), (r0, r1)


def _sampling_matches_unsplit(rank, world):
    ref = build("llama", 2)
    model = tp_plugin.parallelize(copy.deepcopy(ref), tp_size=2)
    ref.eval(), model.eval()
    prompt = batch(batch_size=2, seq=5)
    torch.manual_seed(7)
    ref_out = ref.generate(prompt, do_sample=True, max_new_tokens=8, top_k=0, pad_token_id=0)
    torch.manual_seed(7)
    out = model.generate(prompt, do_sample=True, max_new_tokens=8, top_k=0, pad_token_id=0)
    return torch.equal(out, ref_out)


def test_same_seed_sampling_equals_the_unsplit_model():
    assert all(run_ranks(2, _sampling_matches_unsplit))


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


# ---- plain Trainer --------------------------------------------------------------------------------------------

def _plain_trainer(rank, world, out):
    from transformers import Trainer, TrainingArguments

    from tests.test_trainer import _Chunks

    model = tp_plugin.parallelize(build("llama", 2), tp_size=2)
    args = TrainingArguments(output_dir=out, max_steps=2, per_device_train_batch_size=2, report_to="none",
                             use_cpu=True, ddp_backend="gloo", disable_tqdm=True)
    try:
        Trainer(model=model, args=args, train_dataset=_Chunks(8, 1)).train()
    except RuntimeError as exc:
        return str(exc)
    return None


def test_plain_trainer_error_names_tptrainer(tmp_path):
    for message in run_ranks(2, _plain_trainer, str(tmp_path / "t")):
        assert message is not None and "tp_plugin.TPTrainer" in message and "TPTrainerMixin" in message, message


# ---- counting -------------------------------------------------------------------------------------------------

def _counts(rank, world):
    ref = build("llama", 2)
    model = tp_plugin.parallelize(copy.deepcopy(ref), tp_size=2)
    return model.num_parameters(), tp_plugin.inspect(model), ref.num_parameters()


def test_inspect_prints_the_unsplit_and_per_rank_parameter_counts():
    results = run_ranks(2, _counts)
    local = [r[0] for r in results]
    text, full = results[0][1], results[0][2]
    assert f"{full:,} unsplit" in text and str([f"{n:,}" for n in local]) in text, (text, local)
    assert sum(local) > full > max(local)  # each rank holds part; replicated norms count on both


# ---- torch.compile --------------------------------------------------------------------------------------------

def _tp_plugin_breaks(explained) -> list[str]:
    """Graph breaks raised in tp_plugin's own code (transformers' logger calls break graphs too; not ours)."""
    return [str(b.reason).splitlines()[0] for b in explained.break_reasons
            if any("tp_plugin" in frame.filename for frame in b.user_stack)]


def _compiled(rank, world, arch):
    import torch._dynamo

    ref = build(arch, 2)
    model = tp_plugin.parallelize(copy.deepcopy(ref), tp_size=2)
    ids = batch()
    model.train()
    eager_loss = model(ids, labels=ids).loss  # also the first training forward (the one-off batch check)
    eager_loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    breaks = {"train": _tp_plugin_breaks(torch._dynamo.explain(model)(ids, labels=ids))}
    model.eval()
    with torch.no_grad():
        breaks["no_grad"] = _tp_plugin_breaks(torch._dynamo.explain(model)(ids))
    torch._dynamo.reset()
    model.train()
    compiled = torch.compile(model)
    loss = compiled(ids, labels=ids).loss
    loss.backward()
    grad_err = max((p.grad - eager_grads[n]).abs().max().item() for n, p in model.named_parameters())
    return breaks, abs(loss.item() - eager_loss.item()), abs(loss.item() - ref(ids, labels=ids).loss.item()), grad_err


@pytest.mark.parametrize("arch", ["llama"])  # compiling costs ~45 s per architecture on 2 cores
def test_torch_compile_has_no_graph_break_in_tp_plugin_and_matches_eager(arch):
    """Compiled vs eager: inductor may fuse and reorder fp32 ops, ~1e-7 on losses of order 5; 1e-5 allowed."""
    for breaks, err_eager, err_unsplit, grad_err in run_ranks(2, _compiled, arch, timeout_s=300):
        assert breaks == {"train": [], "no_grad": []}, breaks
        assert err_eager <= ATOL and err_unsplit <= ATOL and grad_err <= ATOL, (err_eager, err_unsplit, grad_err)
