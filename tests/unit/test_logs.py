"""Log formats (skyhop.logs): JSON lines carry the request's fields; text reads as before."""

from __future__ import annotations

import io
import json
import logging

import pytest

from skyhop.logs import fields, setup


def emit(fmt: str) -> str:
    out = io.StringIO()
    setup("info", fmt, stream=out)
    logging.getLogger("skyhop.broker").info(
        "request %s (%s) answered %s: %s", "ab12", "digits", "INFEASIBLE", "too tight",
        extra=fields(request_id="ab12", model="digits", code="INFEASIBLE"))
    logging.getLogger("skyhop.broker").info("no fields")
    return out.getvalue()


def test_json_lines_carry_the_request_fields() -> None:
    first, second = (json.loads(line) for line in emit("json").splitlines())
    assert first["message"] == "request ab12 (digits) answered INFEASIBLE: too tight"
    assert (first["request_id"], first["model"], first["code"]) == ("ab12", "digits",
                                                                    "INFEASIBLE")
    assert first["level"] == "INFO" and first["logger"] == "skyhop.broker"
    assert "node" not in first and "model" not in second


def test_text_lines_are_one_greppable_line_each() -> None:
    lines = emit("text").splitlines()
    assert len(lines) == 2 and lines[0].endswith(
        "INFO skyhop.broker request ab12 (digits) answered INFEASIBLE: too tight")


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="use text or json"):
        setup("info", "xml")
