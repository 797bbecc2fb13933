"""How a module is split: one contract (`base.Style`: `plan_entry` then `build`), one file per topic.

    Colwise / Rowwise                 linear.py   plain Megatron split of a linear, by heads or evenly, fused parts
    VocabEmbedding / VocabLMHead      vocab.py    embedding and LM head by vocabulary (found by the plan itself)
    HeadColwise / HeadRowwise /       heads.py    head-boundary splits whatever the layout; head-count patching;
      GroupedQKV / HeadAttrs /                    per-head parameters of the attention module (sinks)
      HeadParams
    Experts                           experts.py  fused 3-D MoE experts along the intermediate dim
    ShardedNorm / AlibiHeads          norms.py    an RMSNorm over sharded heads; ALiBi slopes of local heads
    Mamba2Heads / MambaChannels /     mamba.py    a Mamba-2 mixer (and the hybrids' copies of it) split by heads;
      ZambaHeads                                  a Mamba (1) mixer by channels; Zamba's per-head mixer by heads
    ShortConvChannels                 conv.py     LFM's gated short convolution by channels
    ActivationSparsity                activations.py  Gemma 3n's top-k statistics over the split intermediate dim

May import: `runtime/` (the layers a style builds), `sharding`, plan time (tests/test_layering.py).
"""

from .activations import ActivationSparsity
from .base import ColumnStyle, RowStyle, Style
from .experts import Experts
from .heads import GroupedQKV, HeadAttrs, HeadColwise, HeadParams, HeadRowwise, patch_heads
from .linear import Colwise, Rowwise
from .conv import ShortConvChannels
from .mamba import Mamba2Heads, MambaChannels, ZambaHeads
from .norms import AlibiHeads, ShardedNorm
from .vocab import VocabEmbedding, VocabLMHead

__all__ = ["Style", "ColumnStyle", "RowStyle", "Colwise", "Rowwise", "VocabEmbedding", "VocabLMHead", "HeadColwise",
           "HeadRowwise", "GroupedQKV", "HeadAttrs", "HeadParams", "patch_heads", "Experts", "ShardedNorm", "AlibiHeads",
           "Mamba2Heads", "MambaChannels", "ZambaHeads", "ShortConvChannels", "ActivationSparsity"]
