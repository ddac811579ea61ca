"""Putting skyhop on machines: ``bundle`` (one node's offline install) and ``wheelhouse``
(the wheels for another platform and Python). The scripts and the systemd unit they
ship are in ``templates/``."""
