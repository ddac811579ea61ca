"""The ``skyhop`` command line (``main``), its security commands (``security``) and the
status table (``status_view``)."""

from skyhop.cli.main import agent_main, broker_main, main

__all__ = ["agent_main", "broker_main", "main"]
