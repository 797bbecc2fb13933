"""Sequence parallelism and tensor parallelism with dropout: the per-rank random streams (`rng.RankStreams`).

Masks are checked directly on GPT-2's dropout modules; with dropout no split run can draw the unsplit model's masks
inside the regions, so the loss is checked statistically (explained at the test), and replay under gradient
checkpointing is checked exactly (same seed, checkpointed vs plain: 1e-6 on losses, 1e-5 on gradients, the
recompute's summation order).
"""

from __future__ import annotations

import pytest
import torch

import tp_plugin
from tests.dist import run_ranks
from tests.models import batch, build

def _dropout_masks(rank, world, sequence_parallel):
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=101, n_embd=64, n_head=4, n_layer=2, n_positions=64,
                                     resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    tp_plugin.parallelize(model, tp_size=2, sequence_parallel=sequence_parallel)
    model.train()
    masks = {}

    def record(name):
        def hook(module, args, out):
            masks.setdefault(name, out == 0)
        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout):
            module.register_forward_hook(record(name))
    ids = batch(seq=16)
    torch.manual_seed(5)
    model(ids, labels=ids).loss.backward()
    return masks


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_dropout_masks_differ_inside_regions_and_agree_outside(sequence_parallel):
    a, b = run_ranks(2, _dropout_masks, sequence_parallel)
    for name in a:
        same = torch.equal(a[name], b[name])
        if name.endswith("attn.attn_dropout"):  # the attention probabilities of this rank's heads
            assert not same, name
        elif name.endswith(("resid_dropout", "mlp.dropout")):  # after a row-parallel layer: replicated, or
            assert same != sequence_parallel, name  # under SP this rank's tokens
        else:  # the embeddings' dropout: replicated
            assert same, name
        assert 0.2 < a[name].float().mean().item() < 0.4, name  # p = 0.3, not a broken mask


def _dropout_losses(rank, world, arch, sequence_parallel, checkpointing, seed, split, steps=4):
    model = build(arch, 2) if arch != "gpt2" else _gpt2_dropout()
    if arch != "gpt2":
        model.config.attention_dropout = 0.1
        for module in model.modules():
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = 0.1
    if split:
        tp_plugin.parallelize(model, tp_size=2, sequence_parallel=sequence_parallel)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, grads = [], []
    ids = batch(seq=13)
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).clone())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, grads


def _gpt2_dropout():
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=101, n_embd=72, n_head=9, n_layer=2, n_positions=64, n_inner=98,
                                     resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_checkpointing_replays_the_same_masks(arch):
    # same seed, dropout 0.1: gradient checkpointing recomputes each layer with the random state it first ran
    # with (the per-rank streams are drawn from the replicated one at each entry), so losses and gradients of
    # a checkpointed run equal the plain run's (up to the recompute's summation order), and a seeded run repeats
    for sequence_parallel in (False, True):
        plain = run_ranks(2, _dropout_losses, arch, sequence_parallel, False, 3, True)
        ckpt = run_ranks(2, _dropout_losses, arch, sequence_parallel, True, 3, True)
        for (losses, grads), (losses_c, grads_c) in zip(plain, ckpt):
            assert losses == pytest.approx(losses_c, abs=1e-6)
            assert max((g - gc).abs().max().item() for g, gc in zip(grads, grads_c)) <= 1e-5
        again = run_ranks(2, _dropout_losses, arch, sequence_parallel, False, 3, True)
        assert [r[0] for r in again] == [r[0] for r in plain]


def test_dropout_loss_within_the_spread_of_unsplit_seeds():
    # With dropout the split model cannot draw the unsplit model's masks (each rank draws its own inside the
    # regions), so the check is statistical: over 8 seeds, the mean training loss of the unsplit model varies
    # by its standard deviation; a split run (plain TP and SP) must land within 4 of them of the unsplit mean.
    # Wrong masks fail it: identical masks on every rank's heads or tokens halve the effective randomness, and
    # masks that differ on replicated activations make the ranks' replicas drift apart (both shift the loss by
    # several standard deviations within 4 steps at p = 0.1... or break the parity of replicas, checked above).
    import statistics

    ref = [statistics.mean(run_ranks(1, _dropout_losses, "llama", False, False, seed, False)[0][0])
           for seed in range(8)]
    mean, spread = statistics.mean(ref), statistics.stdev(ref)
    for sequence_parallel in (False, True):
        for seed in (100, 101):
            split = statistics.mean(run_ranks(2, _dropout_losses, "llama", sequence_parallel, False, seed, True)[0][0])
            assert abs(split - mean) <= 4 * spread + 1e-6, (split, mean, spread)
