"""The Balanced NAO search: its configuration, run directory, phases and loop (:class:`~.loop.BalancedNAO`).

Submodules are imported where they are used (``bnao.search.config``, ``bnao.search.loop``, ...), so that
reading a config does not import the supernet.
"""
