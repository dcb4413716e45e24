"""Stand-alone networks built from NAO archs."""

from .network import NASNetwork, build_network

__all__ = ["NASNetwork", "build_network"]
