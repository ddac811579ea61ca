"""MQTT 5: ``url`` and ``message`` (values, no paho), ``bus`` (``Bus``, the only module
that imports paho) and ``memory`` (``MemoryBus``: the same surface in memory, for unit
tests, as httpx ships its ``MockTransport``). Import from the submodule you need:
importing this package imports no paho."""
