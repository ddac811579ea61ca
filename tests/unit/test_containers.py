"""deploy/containers/: no container engine runs on this machine, so the images are not
built here (docs/deploy.md says so). What can be checked is: every Dockerfile parses,
runs as a non-root user with a health check, installs from a bundle's wheels with no
index, and starts a ``skyhop`` command whose every flag exists in the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer.main

from skyhop.cli.main import app

CONTAINERS = Path(__file__).resolve().parents[2] / "deploy" / "containers"
DOCKERFILES = sorted(CONTAINERS.glob("*.Dockerfile"))
INSTRUCTIONS = {"FROM", "ARG", "RUN", "COPY", "ENV", "USER", "VOLUME", "EXPOSE",
                "HEALTHCHECK", "ENTRYPOINT", "CMD", "WORKDIR", "LABEL"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(instruction, argument) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word, rest.strip()))
    return out


def cli_options(words: list[str]) -> set[str]:
    """The options of the ``skyhop`` subcommand that ``words`` names."""
    command = typer.main.get_command(app)
    for word in words:
        command = command.commands[word]  # type: ignore[attr-defined]
    return {opt for p in command.params for opt in p.opts}


def test_there_is_an_image_for_the_broker_a_jetson_agent_and_a_cloud_worker() -> None:
    assert [p.name for p in DOCKERFILES] == [
        "agent-jetson.Dockerfile", "broker.Dockerfile", "cloud-worker.Dockerfile"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_a_dockerfile_is_whole(path: Path) -> None:
    steps = instructions(path)
    assert {word for word, _ in steps} <= INSTRUCTIONS
    assert steps[0][0] == "FROM" or (steps[0][0] == "ARG" and steps[1][0] == "FROM")
    words = dict(steps)
    assert words["USER"] not in ("root", "0")
    assert "HEALTHCHECK" in words
    install = " ".join(arg for word, arg in steps if word == "RUN")
    assert "--no-index" in install and "/tmp/wheels/requirements.txt" in install
    assert ("COPY", "${BUNDLE}/wheels /tmp/wheels") in steps  # what a bundle holds


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_its_entrypoint_is_a_real_command(path: Path) -> None:
    argv = json.loads(dict(instructions(path))["ENTRYPOINT"])
    assert argv[0] == "skyhop"
    words = [a for a in argv[1:] if not a.startswith("-")][:1]
    options = cli_options(words)
    flags = [a for a in argv if a.startswith("--")]
    assert flags and set(flags) <= options, set(flags) - options
