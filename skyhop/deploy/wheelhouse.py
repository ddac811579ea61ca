"""A wheelhouse for another machine: every wheel skyhop needs on one platform and Python.

    target = Target.parse("linux_aarch64", "3.10")        # or Target.host()
    wheels = build(target, into, extras=("cpu",))          # pip wheel + pip download
    missing(wheels, target, roots)                         # [] when the closure is whole

``pip download --platform --python-version`` picks wheels for the target, but evaluates
the dependencies' environment markers on the Python running it (pip issues 10050 and
11010): built on 3.11 for 3.10, it leaves out ``tomli; python_version < '3.11'``. So
the closure is walked again here with the target's markers (``missing``), and what pip
left out is downloaded until nothing is.
"""

from __future__ import annotations

import platform
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from skyhop.errors import ConfigError
from skyhop.process import run_pip

PLATFORMS = ("linux_x86_64", "linux_aarch64")
PYTHONS = ("3.10", "3.11", "3.12")
# manylinux floor: RHEL 8, Ubuntu 20.04, JetPack 5 (2.31) and 6 (2.35) all run 2.28 wheels.
DEFAULT_GLIBC = (2, 28)
OLDEST_GLIBC_MINOR = 17  # manylinux2014
PIP_TIMEOUT_S = 900.0
MAX_ROUNDS = 5  # of downloading what the markers add; one is usual, two is rare
SOURCE_ROOT = Path(__file__).resolve().parents[2]  # a source checkout has pyproject.toml
SOURCE_FILES = ("pyproject.toml", "README.md")
SOURCE_PACKAGES = ("skyhop", "edge_agent", "cloud_broker", "sim")


@dataclass(frozen=True)
class Target:
    """The machine a bundle is for: ``linux_<arch>``, CPython ``X.Y``, a glibc floor."""

    platform: str
    python: str
    glibc: tuple[int, int] = DEFAULT_GLIBC

    @classmethod
    def parse(cls, platform_: str, python: str, glibc: str | None = None) -> Target:
        if platform_ not in PLATFORMS:
            raise ConfigError(f"--platform {platform_!r}: use one of {', '.join(PLATFORMS)}")
        if python not in PYTHONS:
            raise ConfigError(f"--python {python!r}: use one of {', '.join(PYTHONS)}")
        floor = DEFAULT_GLIBC
        if glibc is not None:
            try:
                major, minor = (int(p) for p in glibc.split("."))
            except ValueError:
                raise ConfigError(f"--glibc {glibc!r}: write it as 2.31") from None
            if major != 2 or minor < OLDEST_GLIBC_MINOR:
                raise ConfigError(f"--glibc {glibc}: manylinux wheels start at 2.17")
            floor = (major, minor)
        return cls(platform_, python, floor)

    @classmethod
    def host(cls) -> Target:
        major, minor = sys.version_info[:2]
        return cls.parse(f"linux_{platform.machine()}", f"{major}.{minor}")

    @property
    def arch(self) -> str:
        return self.platform.removeprefix("linux_")

    @property
    def abi(self) -> str:
        return "cp" + self.python.replace(".", "")

    def pip_args(self) -> list[str]:
        """``pip download`` flags for wheels that install here and nowhere newer."""
        # pip takes the platforms as given (no manylinux expansion): name every floor.
        tags = [f"manylinux_2_{m}_{self.arch}"
                for m in range(self.glibc[1], OLDEST_GLIBC_MINOR - 1, -1)]
        tags += [f"manylinux2014_{self.arch}", self.platform]
        args = ["--only-binary=:all:", "--implementation", "cp",
                "--python-version", self.python]
        for abi in (self.abi, "abi3", "none"):
            args += ["--abi", abi]
        for tag in tags:
            args += ["--platform", tag]
        return args

    def markers(self, extra: str = "") -> dict[str, str]:
        """PEP 508 marker values on the target (CPython on Linux)."""
        return {
            "python_version": self.python, "python_full_version": f"{self.python}.0",
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "implementation_version": f"{self.python}.0", "os_name": "posix",
            "sys_platform": "linux", "platform_system": "Linux",
            "platform_machine": self.arch, "platform_release": "", "platform_version": "",
            "extra": extra,
        }


@dataclass(frozen=True)
class Wheel:
    path: Path
    name: str  # canonical
    version: str
    requires: tuple[Requirement, ...]


def read_wheel(path: Path) -> Wheel:
    """A wheel's name, version and Requires-Dist, from its METADATA."""
    name, version, _, _ = parse_wheel_filename(path.name)
    with zipfile.ZipFile(path) as zf:
        meta = next((n for n in zf.namelist()
                     if n.count("/") == 1 and n.endswith(".dist-info/METADATA")), None)
        if meta is None:
            raise ConfigError(f"{path.name} has no .dist-info/METADATA: not a wheel")
        headers = HeaderParser().parsestr(zf.read(meta).decode("utf-8"))
    requires = tuple(Requirement(r) for r in headers.get_all("Requires-Dist") or ())
    return Wheel(path, canonicalize_name(name), str(version), requires)


def missing(wheels: Iterable[Wheel], target: Target, roots: Sequence[Requirement]
            ) -> tuple[list[Requirement], list[Wheel]]:
    """What the target needs that ``wheels`` lack, and the wheels its closure reaches.

    Walks from ``roots`` through each wheel's requirements, with markers evaluated for
    ``target`` and each requirement's extras. A wheel whose version a requirement does not
    allow is a ConfigError: downloading more would not fix it.
    """
    by_name = {w.name: w for w in wheels}
    needed: list[Requirement] = []
    reached: dict[str, Wheel] = {}
    todo: list[tuple[Requirement, str]] = [(r, "") for r in roots]
    seen: set[tuple[str, str]] = set()
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate(target.markers(extra)):
            continue
        name = canonicalize_name(req.name)
        wheel = by_name.get(name)
        if wheel is None:
            needed.append(req)
            continue
        if req.specifier and not req.specifier.contains(wheel.version, prereleases=True):
            raise ConfigError(f"{wheel.path.name} does not satisfy {req}: remove it from "
                              f"the wheels given to the bundle")
        reached[name] = wheel
        for wanted in ("", *sorted(req.extras)):
            if (name, wanted) in seen:
                continue
            seen.add((name, wanted))
            for sub in wheel.requires:
                todo.append((sub, wanted))
    return needed, list(reached.values())


def skyhop_wheel(into: Path, find_links: Sequence[Path]) -> Path:
    """This skyhop as a wheel: built from the source checkout, else found in ``find_links``."""
    if (SOURCE_ROOT / "pyproject.toml").is_file():
        # From a copy: setuptools reuses a checkout's build/, stale files and all.
        with tempfile.TemporaryDirectory(prefix="skyhop-src-") as tmp:
            src = Path(tmp)
            for name in SOURCE_FILES:
                shutil.copy(SOURCE_ROOT / name, src / name)
            for name in SOURCE_PACKAGES:
                shutil.copytree(SOURCE_ROOT / name, src / name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            _pip(["wheel", "--no-deps", "--quiet", "-w", str(into), str(src)],
                 "building the skyhop wheel")
        return _one(into.glob("skyhop-*.whl"), "skyhop-*.whl", into)
    for folder in find_links:
        found = sorted(folder.glob("skyhop-*.whl"))
        if found:
            return Path(shutil.copy(found[-1], into))
    raise ConfigError("no source checkout to build skyhop from: pass --find-links DIR "
                      "with a skyhop-*.whl (pip wheel . in a checkout makes one)")


def build(target: Target, into: Path, *, extras: Sequence[str] = ("cpu",),
          onnxruntime_wheel: Path | None = None, find_links: Sequence[Path] = (),
          also: Sequence[str] = ()) -> list[Wheel]:
    """Fill ``into`` with the wheels of skyhop[extras] for ``target``; the closure's wheels.

    ``onnxruntime_wheel`` replaces PyPI's onnxruntime (NVIDIA's Jetson onnxruntime-gpu
    wheel for the device's JetPack); ``also`` adds requirements (``nvidia-ml-py`` for
    NVML telemetry). Wheels outside the closure are deleted.
    """
    into.mkdir(parents=True, exist_ok=True)
    own = skyhop_wheel(into, find_links)
    roots = [Requirement(f"skyhop[{','.join(extras)}]" if extras else "skyhop")]
    if onnxruntime_wheel is not None:
        ort = Path(shutil.copy(onnxruntime_wheel, into))
        roots.append(Requirement(read_wheel(ort).name))
    try:
        roots += [Requirement(r) for r in also]
    except InvalidRequirement as exc:
        raise ConfigError(f"--with: {exc}") from None
    links = [a for d in (into, *find_links) for a in ("--find-links", str(d))]
    pending = [f"{roots[0]} @ {own.resolve().as_uri()}", *map(str, roots[1:])]
    for _ in range(MAX_ROUNDS):
        _pip(["download", "--quiet", *target.pip_args(), *links, "-d", str(into), *pending],
             f"downloading wheels for {target.platform} / Python {target.python}")
        needed, closure = missing([read_wheel(p) for p in sorted(into.glob("*.whl"))],
                                  target, roots)
        if not needed:
            for path in set(into.glob("*.whl")) - {w.path for w in closure}:
                path.unlink()
            return sorted(closure, key=lambda w: w.name)
        # Unmarked: pip would evaluate the markers on this Python again and skip them.
        pending = sorted({_unmarked(r) for r in needed})
    raise ConfigError(f"the wheelhouse still lacks {', '.join(pending)} after "
                      f"{MAX_ROUNDS} rounds of downloads")


def _unmarked(req: Requirement) -> str:
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    return f"{req.name}{extras}{req.specifier}"


def requirements(wheels: Iterable[Wheel]) -> str:
    """requirements.txt pinning every wheel: install.sh installs exactly these."""
    return "".join(f"{w.name}=={w.version}\n" for w in sorted(wheels, key=lambda w: w.name))


def _one(paths: Iterable[Path], what: str, where: Path) -> Path:
    found = sorted(paths)
    if len(found) != 1:
        raise ConfigError(f"expected one {what} in {where}, found {len(found)}")
    return found[0]


def _pip(args: list[str], doing: str) -> None:
    run_pip([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], doing,
            "hint: check access to the package index (pip honours PIP_INDEX_URL and "
            "pip.conf), or pass --find-links DIR", PIP_TIMEOUT_S)
