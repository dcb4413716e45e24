"""bnao: Balanced Neural Architecture Optimization with a C++/CUDA core.

Public entry points (imported lazily so that ``import bnao`` stays cheap):

* search spaces: :func:`create_search_space`, :class:`NAOSpace`, :class:`Arch`
* model size: :func:`model_size`
* samplers: :func:`create_sampler`, :func:`register_sampler`, :func:`list_samplers`
* networks: :func:`build_network` (an arch's stand-alone net), :func:`load_model` (a ``bnao train`` model file)
* data: :func:`create_dataset`, :func:`create_loader`, :func:`split_train_dev` (and their registries)
"""

from importlib import import_module

from .version import __version__

_LAZY = {
    "Arch": "bnao.space",
    "NAOSpace": "bnao.space",
    "InvalidArchError": "bnao.space",
    "create_search_space": "bnao.space",
    "list_search_spaces": "bnao.space",
    "register_search_space": "bnao.space",
    "model_size": "bnao.size",
    "create_sampler": "bnao.sampling",
    "register_sampler": "bnao.sampling",
    "list_samplers": "bnao.sampling",
    "create_dataset": "bnao.data",
    "list_datasets": "bnao.data",
    "register_dataset": "bnao.data",
    "create_loader": "bnao.data",
    "list_loaders": "bnao.data",
    "register_loader": "bnao.data",
    "split_train_dev": "bnao.data",
    "load_model": "bnao.train",
    "build_network": "bnao.nets",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bnao' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = ["__version__"] + sorted(_LAZY)
