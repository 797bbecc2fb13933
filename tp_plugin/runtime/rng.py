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


class RankStreams:
    """Megatron's RNG tracker for one TP rank: dropout inside a tensor-parallel region (the attention
    probabilities of this rank's heads; under sequence parallelism, this rank's tokens) must draw masks
    independent of the other ranks', while dropout on replicated activations must draw the same mask everywhere.

    The replicated stream is the ordinary generators (CPU and the current CUDA device), identical over the TP
    group. `enter(tag)` draws one seed from it (the same on every rank), saves it, and reseeds the generators
    with that seed mixed with the TP rank; `leave(tag)` puts the replicated stream back. Because the per-rank
    seed is drawn from the replicated stream at the moment of entry, gradient checkpointing (which restores
    the generators at the checkpointed block's entry before recomputing it) replays the same masks, and a
    seeded run is reproducible. Only the `tag` that entered can leave: a row-parallel layer ending a region
    does not end the sequence-parallel span that contains it.
    """

    def __init__(self, tp_rank: int):
        self.tp_rank = tp_rank
        self._saved: dict[str, torch.Tensor] | None = None
        self._tag: str | None = None

    @property
    def inside(self) -> str | None:
        """The tag of the per-rank span this rank is in, or None on the replicated stream."""
        return self._tag

    @torch.compiler.disable
    def enter(self, tag: str) -> None:
        if self._tag is not None:
            return  # already on the per-rank stream (a region inside a sequence-parallel span)
        seed = int(torch.randint(0, 2**62, (1,)))
        self._saved, self._tag = get_states(), tag
        torch.manual_seed(_mix(seed, self.tp_rank))

    def reset(self) -> None:
        """Forget a span a checkpoint replay entered (its generators were restored by the checkpoint itself)."""
        self._saved = self._tag = None

    @torch.compiler.disable
    def leave(self, tag: str) -> None:
        if self._tag != tag:
            return
        set_states(self._saved)
        self._saved = self._tag = None


def _mix(seed: int, rank: int) -> int:
    h = hashlib.blake2b(f"{seed}/{rank}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


_DROPOUT_ATTRS = ("attention_dropout", "attn_dropout", "dropout", "dropout_p", "attn_pdrop", "hidden_dropout")


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether any module of `model` drops out (an `nn.Dropout` with p > 0, or a rate an HF attention passes to
    its kernel): without dropout the per-rank streams are never needed and cost nothing."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            return True
        if any(isinstance(v := getattr(module, a, None), float) and v > 0 for a in _DROPOUT_ATTRS):
            return True
    return False
