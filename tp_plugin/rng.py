"""The random-number state a TP group must share, per device type (CPU, and the current CUDA device).

Every rank of a TP group computes one model: dropout on replicated activations and `generate(do_sample=True)`
must draw the same numbers on every rank, or the replicas drift apart without any error. Synchronising only
`torch.get_rng_state()` would leave the CUDA generators of a GPU run unsynchronised, so both are handled.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist


def get_states() -> dict[str, torch.Tensor]:
    """The generator states this process draws from: CPU, plus the current CUDA device's once CUDA is up."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_states(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def digest() -> int:
    """A signed 64-bit digest of this process's generator states (for a cheap cross-rank comparison)."""
    h = hashlib.blake2b(digest_size=8)
    for name, state in sorted(get_states().items()):
        h.update(name.encode())
        h.update(state.numpy().tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


def sync_from_tp_rank0(group: dist.ProcessGroup) -> None:
    """Give every rank of `group` the generator states of its rank 0 (one small object broadcast)."""
    payload = [get_states()]
    dist.broadcast_object_list(payload, group=group, group_src=0)
    set_states(payload[0])
