"""The input-gradient reductions overlapped with weight gradients (`tp_plugin.runtime.overlap`): the same numbers and
the same collectives as without, each region's reduction started asynchronously with a weight-gradient matmul
between its start and its wait; synchronous where it must be (LoRA reading the face)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import tp_plugin
from tests.collective_counter import CollectiveCounter
from tests.dist import run_ranks
from tests.models import batch, build, full_grad, full_param, max_errors


class _Timeline(TorchDispatchMode):
    """Records, in order, matmuls and the start / wait of every all-reduce or reduce-scatter (async or not)."""

    def __init__(self):
        super().__init__()
        self.events, self._saved = [], {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.events.append("mm")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in ("all_reduce", "reduce_scatter"):
            original = self._saved[name] = getattr(dist, name)

            def logged(*args, _original=original, **kwargs):
                work = _original(*args, **kwargs)
                if not kwargs.get("async_op"):
                    self.events.append("sync")
                    return work
                self.events.append("start")
                events = self.events

                class _Work:  # the handle, noting when it is waited on
                    def wait(self, *a):
                        events.append("wait")
                        return work.wait(*a)
                return _Work()
            setattr(dist, name, logged)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)
        return super().__exit__(*exc)


def _backward(rank, world, arch, overlap, sequence_parallel, lora):
    model = build(arch, world)
    ref = copy.deepcopy(model)
    tp_plugin.parallelize(model, tp_size=world, overlap_comm=overlap, sequence_parallel=sequence_parallel)
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
        ref = peft.get_peft_model(ref, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
        ref.load_state_dict(_full_state(model, ref))
    ids = batch(seq=12)
    loss = model(ids, labels=ids).loss
    with CollectiveCounter() as counter, _Timeline() as timeline:
        loss.backward()
    ref(ids, labels=ids).loss.backward()
    events = timeline.events
    overlapped = sum(1 for i, e in enumerate(events) if e == "start" and "mm" in events[i:events.index("wait", i)])
    return {"grads": max_errors(model, ref, model.tp_plugin_state.mesh.tp_group) if not lora else
            _lora_errors(model, ref), "counts": dict(counter.counts), "starts": events.count("start"),
            "overlapped": overlapped}


def _full_state(model, ref):
    """The split model's LoRA weights in the unsplit model's state dict (B of a column layer is split by rows)."""
    state = ref.state_dict()
    group = model.base_model.model.tp_plugin_state.mesh.tp_group
    for name, param in model.named_parameters():
        if "lora_" in name:
            state[name] = full_param(param, group)
    return state


def _lora_errors(model, ref):
    group = model.base_model.model.tp_plugin_state.mesh.tp_group
    ref_params = dict(ref.named_parameters())
    return {name: (full_grad(model, name, p, group) - ref_params[name].grad).abs().max().item()
            for name, p in model.named_parameters() if p.requires_grad}


BLOCKS = 2  # tiny models have 2 decoder layers: one attention and one MLP region each


@pytest.mark.parametrize("arch,sequence_parallel", [("llama", False), ("gpt2", False), ("llama", True)])
def test_overlap_same_numbers_and_collectives(arch, sequence_parallel):
    on = run_ranks(2, _backward, arch, True, sequence_parallel, False)
    off = run_ranks(2, _backward, arch, False, sequence_parallel, False)
    for r_on, r_off in zip(on, off):
        for r in (r_on, r_off):
            name, worst = max(r["grads"].items(), key=lambda kv: kv[1])
            assert worst <= 2e-5, f"gradient of {name} differs by {worst:.2e}"  # fp32, as test_parity
        assert r_on["counts"] == r_off["counts"]
        # every region's input-gradient reduction started asynchronously, a weight-gradient matmul in flight
        assert r_on["starts"] == r_on["overlapped"] == 2 * BLOCKS, r_on
        assert r_off["overlapped"] == 0, r_off


def test_overlap_with_lora_is_correct_with_the_same_collectives():
    # LoRA on q and v reads the attention's face itself: those regions reduce synchronously (`mixed`)
    on, off = run_ranks(2, _backward, "llama", True, False, True), run_ranks(2, _backward, "llama", False, False, True)
    for r_on, r_off in zip(on, off):
        name, worst = max(r_on["grads"].items(), key=lambda kv: kv[1])
        assert worst <= 2e-5, f"gradient of {name} differs by {worst:.2e}"
        assert r_on["counts"] == r_off["counts"]


def _autocast(rank, world, overlap):
    model = build("llama", world)
    tp_plugin.parallelize(model, tp_size=world, overlap_comm=overlap)
    ids = batch(seq=12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    return {n: p.grad.float() for n, p in model.named_parameters()}


def test_overlap_under_autocast_matches_the_synchronous_path():
    for on, off in zip(run_ranks(2, _autocast, True), run_ranks(2, _autocast, False)):
        for name in on:  # the same bf16 matmuls in the same order: equal up to bf16 rounding of sums
            assert on[name].dtype == off[name].dtype
            torch.testing.assert_close(on[name], off[name], atol=1e-2, rtol=1e-2, msg=name)
