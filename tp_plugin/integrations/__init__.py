"""Bridges between split models and the engines that train them (DeepSpeed, Accelerate, Trainer, PEFT, TRL)."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable


def when_imported(name: str, callback: Callable[[], None]) -> None:
    """Run `callback` now if module `name` is imported, else right after its first import (scripts that never
    use the library never pay for importing it)."""
    if name in sys.modules:
        callback()
    elif importlib.util.find_spec(name.partition(".")[0]) is not None and not any(
            isinstance(f, RunAfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, RunAfterImport(name, callback))


class RunAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when module `name` is being imported, runs `callback` right after it executes."""

    def __init__(self, name: str, callback) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # one shot; let the normal finders locate the module
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module, callback = spec.loader.exec_module, self.callback

        def exec_then_callback(module):
            exec_module(module)
            callback()

        spec.loader.exec_module = exec_then_callback
        return spec
