"""Unit fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from skyhop.home import Home
from skyhop.security.pki import Pki


@pytest.fixture
def home(tmp_path: Path) -> Home:
    """A fleet home with its fleet key and CA, as `skyhop init` and `certs init` leave it."""
    h = Home(tmp_path / "fleet")
    h.init()
    Pki(h.path).init()
    return h
