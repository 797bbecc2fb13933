"""Mixture-of-experts decoders with fused 3-D experts (Mixtral, Qwen2-MoE, Qwen3-MoE).

Every expert's MLP is split along its intermediate dim, like a dense MLP (`Experts()`): all experts stay on
every rank, the router is replicated and routes identically everywhere, so there is no token exchange and no
load imbalance between ranks; the cost is one all-reduce of the experts' output (forward) and of their
inputs' gradients (backward). The MLP module is not a region: the router reads the same input and its
gradient is already complete on every rank.
"""

from dataclasses import replace

from ..policy import Colwise, Policy, Rowwise, register_policy
from ..styles import Experts
from .llama import LLAMA

_ATTENTION = {k: v for k, v in LLAMA.layers.items() if ".self_attn." in k}

MIXTRAL = Policy(name="mixtral", layers={**_ATTENTION, "layers.*.mlp.experts": Experts()},
                 attention=LLAMA.attention, regions=("layers.*.self_attn",))

# Qwen2-MoE adds a dense shared expert (split like a dense MLP) scaled by a replicated sigmoid gate.
QWEN2_MOE = replace(MIXTRAL, name="qwen2_moe", layers={
    **MIXTRAL.layers,
    "layers.*.mlp.shared_expert.gate_proj": Colwise(),
    "layers.*.mlp.shared_expert.up_proj": Colwise(),
    "layers.*.mlp.shared_expert.down_proj": Rowwise(),
}, replicate=("layers.*.mlp.shared_expert_gate",))

QWEN3_MOE = replace(MIXTRAL, name="qwen3_moe",
                    partial_grad=("layers.*.self_attn.q_norm", "layers.*.self_attn.k_norm"))

register_policy("mixtral", MIXTRAL)
register_policy("qwen2_moe", QWEN2_MOE)
register_policy("qwen3_moe", QWEN3_MOE)
