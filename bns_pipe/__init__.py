"""bns_pipe: distributed full-graph GCN training with boundary-node sampling and pipelining.

The Python API (:mod:`bns_pipe.api`): ``bns_pipe.fit(data, parts=4, **options)`` trains a PyG
``Data`` and returns a :class:`~bns_pipe.api.FitResult`; ``bns_pipe.load_model(checkpoint)``
gives a checkpoint's model as a ``torch_geometric.nn`` module.
"""

__version__ = "0.1.0"
__all__ = ["FitResult", "fit", "load_model"]


def __getattr__(name: str):
    if name in __all__:  # imported on first use: the CLI starts without torch_geometric
        from bns_pipe import api

        return getattr(api, name)
    raise AttributeError(f"module 'bns_pipe' has no attribute {name!r}")
