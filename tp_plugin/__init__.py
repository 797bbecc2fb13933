"""tp_plugin: Megatron-style tensor parallelism for Hugging Face transformers models.

    model = AutoModelForCausalLM.from_pretrained(path)   # or tp_plugin.from_pretrained(path, tp_size=2)
    model = tp_plugin.parallelize(model, tp_size=2)      # policy picked from model.config.model_type
    print(tp_plugin.inspect(model))
    tp_plugin.save_pretrained(model_or_engine, out_dir)  # an ordinary HF checkpoint
    tp_plugin.fully_shard(model)                         # FSDP2 over the data-parallel dim
    pipe = tp_plugin.pipeline(model, mesh=mesh)          # pipeline stages x TP x DP, on ("pp", "dp", "tp")
"""

from .checkpoint import save_pretrained, save_sharded
from .loading import from_pretrained
from .grad_norm import clip_grad_norm_
from .integrations.deepspeed import mpu
from .parallel.fsdp import fully_shard
from .parallelize import inspect, parallelize
from .parallel.pipeline import Pipeline, pipeline
from .policy import AttentionSpec, Colwise, Policy, Rowwise, register_policy
from .sharding import TPSplitError
from .state import tp_state

__all__ = ["parallelize", "inspect", "tp_state", "from_pretrained", "save_pretrained", "save_sharded", "fully_shard",
           "clip_grad_norm_", "mpu", "pipeline", "Pipeline", "Policy", "AttentionSpec", "Colwise", "Rowwise", "register_policy",
           "TPSplitError", "TPTrainer", "TPTrainerMixin"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("TPTrainer", "TPTrainerMixin"):  # imported on use: transformers.Trainer is a heavy import
        from .integrations import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'tp_plugin' has no attribute {name!r}")
