"""Run by Python at the start of every process under `tp-plugin launch` (this directory is first on PYTHONPATH).

Standard library only: it also runs in the launchers (`torchrun`, `accelerate launch`, `deepspeed`) and in any
other Python process the command starts, which never import transformers. With `TP_PLUGIN_AUTO` set, it waits
for `transformers` or `accelerate` to be imported and then calls `tp_plugin.launch.activate()` (the zero-code
patches, `tp_plugin.integrations.auto`); without it, it does nothing. Then it runs the `sitecustomize` this one
shadows, if there is one further down the path.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_TRIGGERS = ("transformers", "accelerate")


class _ActivateAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; the first time a trigger module is imported, activates tp_plugin right after it."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _TRIGGERS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_activate(module):
            exec_module(module)
            if self in sys.meta_path:  # once per process (a mere find_spec, e.g. an availability probe, is not it)
                sys.meta_path.remove(self)
                import tp_plugin.launch

                tp_plugin.launch.activate()

        spec.loader.exec_module = exec_then_activate
        return spec


def _run_shadowed_sitecustomize():
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None and spec.origin != os.path.abspath(__file__):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


if os.environ.get("TP_PLUGIN_AUTO", "").strip().lower() in ("1", "true", "yes", "on") \
        and not any(name in sys.modules for name in _TRIGGERS):
    sys.meta_path.insert(0, _ActivateAfterImport())
_run_shadowed_sitecustomize()
