"""alexnet-mp: AlexNet trained as two model-parallel columns, one process per column.

``alexnet_mp.load_exported(path)`` gives a ready model and its preprocessing from a file
written by ``python -m alexnet_mp.export``. It is imported on first use, so that importing
a submodule does not load the whole package.
"""

__all__ = ["load_exported"]


def __getattr__(name):
    if name == "load_exported":
        from .export import load_exported
        return load_exported
    raise AttributeError(f"module 'alexnet_mp' has no attribute {name!r}")
