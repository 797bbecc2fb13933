"""The patches tp_plugin puts on other libraries (Accelerate, PEFT, TRL): every one is installed by the first
split, listed by the one patch helper (`tp_plugin.integrations.patching.active()`), and undone by
`tp_plugin.integrations.uninstall()`; `TP_PLUGIN_PATCHES=none` splits without installing any.
"""

from __future__ import annotations

import os

import tp_plugin
from tests.dist import run_ranks
from tests.models import build


def _patches(rank, world):
    import accelerate
    import peft
    import peft.utils.save_and_load
    import trl.trainer.utils

    def snapshot():
        return (accelerate.Accelerator.prepare, accelerate.Accelerator.clip_grad_norm_, peft.PeftModel.save_pretrained,
                peft.tuners.tuners_utils.BaseTuner.inject_adapter, peft.utils.save_and_load.get_peft_model_state_dict,
                trl.trainer.utils._ChunkedLogProbFunction)

    from tp_plugin.integrations import patching

    tp_plugin.integrations.uninstall()  # the harness's earlier tests may have split models in this process
    before = snapshot()
    tp_plugin.parallelize(build("llama", 2), tp_size=2)
    during, listed = snapshot(), patching.active()
    tp_plugin.integrations.uninstall()
    after, left = snapshot(), patching.active()
    os.environ["TP_PLUGIN_PATCHES"] = "none"
    try:
        tp_plugin.parallelize(build("llama", 2), tp_size=2)
        off = snapshot()
    finally:
        del os.environ["TP_PLUGIN_PATCHES"]
    return [a is b for a, b in zip(before, during)], after == before, off == before, listed, left


def test_every_patch_is_installed_by_the_split_and_undone_by_uninstall():
    for changed, restored, off, listed, left in run_ranks(2, _patches):
        assert not any(changed), changed  # all six replaced while a split model exists
        assert restored and off
        # the one patch helper lists them (Accelerate's five functions in `accelerate.accelerator` among them)
        assert {"accelerate.accelerator.Accelerator.prepare", "peft.peft_model.PeftModel.save_pretrained",
                "trl.trainer.utils._ChunkedLogProbFunction"} <= set(listed) and not left, (listed, left)
