"""The wire protocol (docs/protocol.md): messages, topics, the envelope, tensors, the
replay window and key announcements. Values and pure functions only: no paho, no
files, no clock (``tests/unit/test_layers.py`` holds it to that)."""
