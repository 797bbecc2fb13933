"""The one way tp_plugin changes another library's attribute, and puts it back.

A replacement carries what it replaced (`_tp_plugin_replaced`, on the new value itself), so installing twice
does nothing, undoing restores exactly what was there (deleting an attribute the owner only inherited), and
both survive a re-import of tp_plugin's own modules. `active()` lists what is replaced now; the table of every
patch and why is in `integrations/__init__.py`.
"""

from __future__ import annotations

_MARK = "_tp_plugin_replaced"
_ABSENT = object()  # the owner had no attribute of its own by that name (it inherited one, or none)
_ACTIVE: list[tuple[object, str]] = []  # (owner, name), in the order they were replaced


def is_replaced(owner, name: str) -> bool:
    """Whether `owner.name` (a class's or a module's own attribute) is tp_plugin's replacement."""
    return hasattr(vars(owner).get(name), _MARK)


def replace(owner, name: str, value) -> bool:
    """Put `value` at `owner.name`, remembering what was there. False (and nothing done) when it is replaced
    already."""
    if is_replaced(owner, name):
        return False
    setattr(value, _MARK, vars(owner).get(name, _ABSENT))
    setattr(owner, name, value)
    _ACTIVE.append((owner, name))
    return True


def wrap(owner, name: str, wrapper, *, raw: bool = False) -> bool:
    """`replace(owner, name, wrapper(current))`, where `current` is `getattr(owner, name)` (`raw`: the owner's own
    entry as stored, e.g. a classmethod object). False when it is replaced already (the wrapper is not called)."""
    if is_replaced(owner, name):
        return False
    return replace(owner, name, wrapper(vars(owner)[name] if raw else getattr(owner, name)))


def restore(owner, name: str) -> None:
    """Put back what `replace` found at `owner.name` (nothing to do when it is not replaced)."""
    current = vars(owner).get(name)
    if not hasattr(current, _MARK):
        return
    original = getattr(current, _MARK)
    if original is _ABSENT:
        delattr(owner, name)
    else:
        setattr(owner, name, original)
    if (owner, name) in _ACTIVE:
        _ACTIVE.remove((owner, name))


def wrap_in_module(module_name: str, wrappers: dict) -> None:
    """`wrap` each named function of module `module_name` (imported now if it is not) with its wrapper."""
    import importlib

    module = importlib.import_module(module_name)
    for name, wrapper in wrappers.items():
        wrap(module, name, wrapper)


def restore_in_module(module_name: str, names) -> None:
    """`restore` each of `names` in module `module_name`, if that module was ever imported."""
    import sys

    module = sys.modules.get(module_name)
    for name in names if module is not None else ():
        restore(module, name)


def active() -> list[str]:
    """What is replaced now, as `module.Owner.name`."""
    return [f"{getattr(o, '__module__', '')}.{getattr(o, '__qualname__', getattr(o, '__name__', o))}.{n}".lstrip(".")
            for o, n in _ACTIVE if is_replaced(o, n)]
