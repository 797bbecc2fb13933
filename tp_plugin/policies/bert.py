"""BERT and RoBERTa encoders (bidirectional attention; sequence classification, masked or causal LM).

The attention's out-projection lives in a sibling module (`attention.output.dense`), so is the MLP's
(`output.dense`); the pooler and classifier stay replicated."""

from ..policy import AttentionSpec, Colwise, Policy, Rowwise, register_policy

BERT = Policy(
    name="bert",
    layers={
        "encoder.layer.*.attention.self.query": Colwise("q"),
        "encoder.layer.*.attention.self.key": Colwise("q"),  # multi-head attention
        "encoder.layer.*.attention.self.value": Colwise("q"),
        "encoder.layer.*.attention.output.dense": Rowwise("q"),
        "encoder.layer.*.intermediate.dense": Colwise(),
        "encoder.layer.*.output.dense": Rowwise(),
    },
    attention=AttentionSpec("encoder.layer.*.attention.self", num_kv_heads=None, head_dim=None,
                            local_dims=("all_head_size",)),
    regions=("encoder.layer.*.attention.self", "encoder.layer.*.intermediate"),
    replicate=("pooler.dense",),
)

for model_type in ("bert", "roberta"):
    register_policy(model_type, BERT)
