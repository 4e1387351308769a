"""unifiededit: ROME, MEMIT, EMMET, ENCORE and AlphaEdit model editing, derived from one preservation-memorization
objective.

The public names below are imported on first use (PEP 562), so `import unifiededit` stays light.
"""
__version__ = "0.1.0"

_PUBLIC = {
    "HParams": "unifiededit.hparams",
    "EditRequest": "unifiededit.requests",
    "Edit": "unifiededit.history",
    "EditHistory": "unifiededit.history",
    "edit": "unifiededit.editing",
    "load_pretrained": "unifiededit.pretrained",
    "collect_key_stats": "unifiededit.stats",
    "compute_target_values": "unifiededit.batched_values",
    "load_dataset": "unifiededit.data",
    "evaluate": "unifiededit.metrics",
}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name):
    if name in _PUBLIC:
        import importlib
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'unifiededit' has no attribute {name!r}")


def __dir__(): return sorted(list(globals()) + list(_PUBLIC))
