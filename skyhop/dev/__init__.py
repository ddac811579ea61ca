"""Harnesses for tests, the demo and benches: a private Mosquitto (``mosquitto``), a local
fleet (``localstack``), a user-space WAN delay proxy (``netem``) and ``skyhop demo``.
Nothing in production imports this wing."""
