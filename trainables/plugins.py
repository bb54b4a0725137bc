"""Registrations from outside the package: plugins, loaded when a registry is first used.

A plugin is a module whose import calls the registries' ``register_*`` functions (a trigger, a
model, a penalty, a trial kind, a detector, a baseline). Two ways to name one, both read by
:func:`load_plugins`, which config validation, :func:`trainables.trial_kind`, the model and trigger
look-ups, detection (:func:`trainables.detection.statistics.planned`) and the CLI call before reading a registry:

* the environment variable ``SWEEPER_PLUGINS``: comma-separated importable module names
  (``SWEEPER_PLUGINS=mylab.triggers,mylab.nets``). The sweep driver forwards it, and
  ``PYTHONPATH``, to the Ray workers, so a sweep's trials see the same registrations.
* an entry point in the group ``sweeper.plugins`` of an installed distribution, naming a module
  (imported) or a function of no arguments (called once)::

      [project.entry-points."sweeper.plugins"]
      mylab = "mylab.sweeper_plugin"

A plugin that cannot be imported is a :class:`PluginError`: one line naming it, exit code 2.
Keep a plugin's top level light (import torch inside its builders, as ``trainables.attack.triggers``
does) so that ``sweeper --help`` stays fast.
"""

from __future__ import annotations

import os
import threading
from importlib import import_module

from trainables.errors import SweeperError

ENV = "SWEEPER_PLUGINS"
GROUP = "sweeper.plugins"


class PluginError(SweeperError):
    """A plugin named in ``SWEEPER_PLUGINS`` or by a ``sweeper.plugins`` entry point failed to load."""


_lock = threading.RLock()
_loading = False  # a plugin's own import may validate a config: that nested call returns at once
_loaded: list[str] = []  # what was imported (module names, entry points as NAME = VALUE), in order
_env_done: str | None = None  # the SWEEPER_PLUGINS value whose modules are all imported
_entry_points_done = False


def plugin_names(value: str | None = None) -> list[str]:
    """The module names of ``SWEEPER_PLUGINS`` (or of ``value``), in order, blanks dropped."""
    text = os.environ.get(ENV, "") if value is None else value
    return list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _import(name: str) -> None:
    try:
        import_module(name)
    except Exception as e:  # a missing module, a syntax error or a failing registration alike
        raise PluginError(
            f"plugin {name!r} from {ENV} cannot be imported: {_first_line(e)} ({ENV} is a "
            f"comma-separated list of importable module names; their folder must be on "
            f"PYTHONPATH)"
        ) from e


def _entry_points() -> list:
    from importlib.metadata import entry_points

    return list(entry_points(group=GROUP))


def _load_entry_point(ep) -> None:
    try:
        obj = ep.load()
        if callable(obj):
            obj()
    except Exception as e:
        dist = getattr(getattr(ep, "dist", None), "name", None)
        raise PluginError(
            f"plugin entry point {ep.name} = {ep.value!r} (group {GROUP}"
            + (f", distribution {dist}" if dist else "")
            + f") failed: {_first_line(e)}"
        ) from e


def load_plugins() -> list[str]:
    """Import every plugin not imported yet; the names imported so far, in order.

    Cheap after the first call (one environment look-up); a ``SWEEPER_PLUGINS`` that changed since
    (a test, a Python caller) loads its new modules. A failing plugin raises :class:`PluginError`
    on every call until it is fixed, so nothing runs with a registration missing.
    """
    global _loading, _env_done, _entry_points_done
    env = os.environ.get(ENV, "")
    if _entry_points_done and env == _env_done:
        return list(_loaded)
    with _lock:
        if _loading:
            return list(_loaded)
        _loading = True
        try:
            if not _entry_points_done:
                for ep in _entry_points():
                    key = f"{ep.name} = {ep.value}"
                    if key not in _loaded:
                        _load_entry_point(ep)
                        _loaded.append(key)
                _entry_points_done = True
            for name in plugin_names(env):
                if name not in _loaded:
                    _import(name)
                    _loaded.append(name)
            _env_done = env
        finally:
            _loading = False
    return list(_loaded)
