"""What Python 3.10 lacks of 3.11, in one place: JetPack 6 ships 3.10, and NVIDIA's
Jetson onnxruntime-gpu wheels are built for it (docs/deploy.md)."""

from __future__ import annotations

import sys
from enum import Enum

if sys.version_info >= (3, 11):
    from enum import StrEnum

    import tomllib
else:  # pragma: no cover - run by `make test`'s 3.10 unit pass
    import tomli as tomllib

    class StrEnum(str, Enum):
        """3.11's StrEnum: members are their values, in str() and f-strings alike."""

        def __str__(self) -> str:
            return str(self.value)


__all__ = ["StrEnum", "tomllib"]
