"""tp_plugin: Megatron-style tensor parallelism for Hugging Face transformers models.

    model = AutoModelForCausalLM.from_pretrained(path)
    model = tp_plugin.parallelize(model, tp_size=2)   # policy picked from model.config.model_type
    print(tp_plugin.inspect(model))
"""

from .parallelize import inspect, parallelize
from .policy import AttentionSpec, Colwise, Policy, Rowwise, register_policy
from .sharding import TPSplitError
from .checkpoint import from_pretrained, save_pretrained, save_sharded

__all__ = ["parallelize", "inspect", "Policy", "AttentionSpec", "Colwise", "Rowwise", "register_policy",
           "TPSplitError"]
__all__ += ["from_pretrained", "save_pretrained", "save_sharded"]
from .grad_norm import clip_grad_norm_  # noqa: E402  (the unsplit model's norm, for plain torch loops)
__all__ += ["clip_grad_norm_"]
__version__ = "0.1.0"

# `accelerate launch` support, at the earliest point tp_plugin code runs in a user's script: the TP degree from
# the yaml, gloo when there is no GPU, DDP and data sharding over the data-parallel group (integrations/accelerate.py).
from .integrations.accelerate import on_import as _accelerate_on_import  # noqa: E402

_accelerate_on_import()
