"""chronoray: a distributed task scheduler on Ray.

The package stays import-light (no Ray at import time) so the pure scheduling
code and storage can use its errors and settings; `Client` is loaded lazily.
"""

from actors.heap import settle_after_start as settle_heap
from scheduling.errors import ChronorayError

__all__ = ["ChronorayError", "Client", "settle_heap"]


def __getattr__(name: str):  # lazy: importing Client pulls in Ray
    if name == "Client":
        from chronoray.client import Client

        return Client
    raise AttributeError(name)
