"""What gets installed, and the layers between the packages: the built wheel holds only the
interface's import packages, and the import-linter contracts (pyproject.toml) hold and can fail."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"keyhygiene", "db", "migrations", "tasks", "worker"}
BIN = Path(sys.executable).parent


def copy_project(target: Path) -> Path:
    """The files a build or an import check reads, copied away from the working tree."""
    target.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, target / name)
    for package in sorted(PACKAGES):
        shutil.copytree(ROOT / package, target / package, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def test_the_wheel_installs_only_the_interface_import_packages(tmp_path: Path) -> None:
    source = copy_project(tmp_path / "src")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", "dist", "."],
        cwd=source,
        check=True,
        capture_output=True,
    )
    (wheel,) = (source / "dist").glob("keyhygiene-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (top_level,) = [name for name in names if name.endswith(".dist-info/top_level.txt")]
        assert set(archive.read(top_level).decode().split()) == PACKAGES
        metadata = archive.read(top_level.replace("top_level.txt", "METADATA")).decode()
    roots = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert roots == PACKAGES
    # What the packages need at run time besides code: the migrations and the fake API's scenarios.
    assert "migrations/script.py.mako" in names
    assert any(name.startswith("migrations/versions/0001") for name in names)
    assert any(name.startswith("keyhygiene/fakeapi/scenarios/") for name in names)
    assert "License-Expression: Apache-2.0" in metadata
    assert "Requires-Dist: python-dotenv" not in metadata


def lint_imports(source: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "lint-imports"), str(source / "pyproject.toml"), "--no-cache", "--no-logo"],
        cwd=source,
        env={"PATH": str(BIN), "PYTHONPATH": str(source)},
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_the_layer_contracts_hold_and_a_violation_breaks_them(tmp_path: Path) -> None:
    source = copy_project(tmp_path / "src")
    kept = lint_imports(source)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "0 broken" in kept.stdout

    # The rules engine reaching for the database, as a careless change would.
    engine = source / "keyhygiene" / "rules" / "engine.py"
    engine.write_text(engine.read_text() + "\nfrom db import runs  # noqa\n")
    broken = lint_imports(source)
    assert broken.returncode == 1
    assert "The rules engine is pure" in broken.stdout and "BROKEN" in broken.stdout
    assert "keyhygiene.rules.engine -> db.runs" in broken.stdout


def test_python_m_keyhygiene_is_the_same_command_line(tmp_path: Path) -> None:
    # Where the console script is not on the PATH (and in `python -m bench sync` without it).
    result = subprocess.run(
        [sys.executable, "-m", "keyhygiene", "sync", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: keyhygiene sync [OPTIONS]")
    assert "Page through every key of every workspace" in result.stdout
