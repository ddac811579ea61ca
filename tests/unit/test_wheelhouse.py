"""The wheelhouse's pure parts: a target's pip flags and markers, and the closure walk
that finds what pip left out (tests/integration/test_bundle.py downloads for real)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from skyhop.deploy.wheelhouse import Target, missing, read_wheel, requirements
from skyhop.errors import ConfigError


def make_wheel(folder: Path, name: str, version: str, *requires: str) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    meta = "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}-{version}.dist-info/METADATA",
                    f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{meta}")
    return path


def test_a_target_names_every_manylinux_floor_down_to_2014() -> None:
    args = Target.parse("linux_aarch64", "3.10", "2.31").pip_args()
    platforms = [args[i + 1] for i, a in enumerate(args) if a == "--platform"]
    assert platforms[0] == "manylinux_2_31_aarch64"
    assert "manylinux_2_17_aarch64" in platforms and "manylinux2014_aarch64" in platforms
    assert "manylinux_2_32_aarch64" not in platforms
    assert args[args.index("--python-version") + 1] == "3.10"
    assert [args[i + 1] for i, a in enumerate(args) if a == "--abi"] == ["cp310", "abi3", "none"]


@pytest.mark.parametrize(("platform", "python", "glibc", "says"), [
    ("linux_armv7l", "3.11", None, "--platform"),
    ("linux_x86_64", "3.9", None, "--python"),
    ("linux_x86_64", "3.11", "2.5", "2.17"),
    ("linux_x86_64", "3.11", "two", "2.31"),
])
def test_a_bad_target_is_named(platform: str, python: str, glibc: str | None,
                               says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        Target.parse(platform, python, glibc)


def test_the_walk_evaluates_markers_for_the_target_not_this_python(tmp_path: Path) -> None:
    wheels = [read_wheel(make_wheel(tmp_path, "app", "1.0", "lib>=2",
                                    "tomli>=2; python_version < '3.11'",
                                    "onnx; extra == 'cpu'",
                                    "pywin; sys_platform == 'win32'")),
              read_wheel(make_wheel(tmp_path, "lib", "2.1"))]
    roots = [Requirement("app")]
    needed, closure = missing(wheels, Target.parse("linux_x86_64", "3.10"), roots)
    assert [r.name for r in needed] == ["tomli"]
    assert missing(wheels, Target.parse("linux_x86_64", "3.12"), roots)[0] == []
    needed, _ = missing(wheels, Target.parse("linux_x86_64", "3.12"), [Requirement("app[cpu]")])
    assert [r.name for r in needed] == ["onnx"]  # an extra's requirement, only when asked
    assert {w.name for w in closure} == {"app", "lib"}


def test_a_wheel_of_the_wrong_version_is_refused_not_downloaded_around(tmp_path: Path) -> None:
    wheels = [read_wheel(make_wheel(tmp_path, "app", "1.0", "lib>=3")),
              read_wheel(make_wheel(tmp_path, "lib", "2.1"))]
    with pytest.raises(ConfigError, match="does not satisfy lib>=3"):
        missing(wheels, Target.parse("linux_x86_64", "3.11"), [Requirement("app")])


def test_requirements_pin_every_wheel(tmp_path: Path) -> None:
    wheels = [read_wheel(make_wheel(tmp_path, "Paho_MQTT", "2.2.0")),
              read_wheel(make_wheel(tmp_path, "app", "1.0"))]
    assert requirements(wheels) == "app==1.0\npaho-mqtt==2.2.0\n"


def test_a_file_that_is_no_wheel_says_so(tmp_path: Path) -> None:
    path = tmp_path / "x-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x/__init__.py", "")
    with pytest.raises(ConfigError, match="not a wheel"):
        read_wheel(path)
