"""The pure scheduling core: no sockets, no clocks, no randomness of its own.

Time (``now``, in seconds on any monotonic scale) and every input come in as arguments, so the
live coordinator and the simulator drive exactly the same code.
"""
