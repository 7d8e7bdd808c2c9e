"""The package as a user installs it: a wheel built with `python -m build`, installed into a fresh
venv, brings the outpost, its console script, the test harness and the pytest plugin, and works
outside the checkout.

The fresh venv takes its dependencies from the project's venv (a `.pth` line) instead of the
package index, so that the test costs seconds; the wheel itself goes in with `--no-deps --no-index`.
"""

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], cwd: Path, timeout: float = 180) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{args[:3]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built from a copy of what the package is made of, so the checkout gets no build/ directory."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "addons" / "mitm_outpost", source / "addons" / "mitm_outpost",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(source)], source)
    (built,) = out.glob("mitm_outpost-*.whl")
    return built


@pytest.fixture(scope="module")
def fresh(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], venv.parent)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     venv.parent).strip())
    (site / "project-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], venv.parent)
    return venv


def test_the_wheel_holds_the_package_and_nothing_of_the_checkout(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "mitm_outpost/__main__.py" in names and "mitm_outpost/pytest_plugin.py" in names
    assert "mitm_outpost/testing/__init__.py" in names, "the test harness ships with the package"
    assert "mitm_outpost/testing/nginx-single.conf" in names, "the forward-auth config ships as package data"
    assert not [n for n in names if n.startswith(("tests/", "scripts/", "docs/")) or "__pycache__" in n]
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "mitm-outpost = mitm_outpost.__main__:main" in text
    assert "[pytest11]" in text and "mitm_outpost.pytest_plugin" in text


def test_installed_it_runs_from_anywhere(fresh: Path, tmp_path: Path) -> None:
    assert _run([str(fresh / "bin" / "mitm-outpost"), "--version"], tmp_path).strip() == "mitm-outpost 0.1.0"
    where = _run([str(fresh / "bin" / "python"), "-c", "import mitm_outpost.testing as t; print(t.__file__)"], tmp_path)
    assert where.startswith(str(fresh)), f"imported from {where.strip()}, not from the installed wheel"
    template = _run([str(fresh / "bin" / "python"), "-c", "import importlib.resources as r; "
                     "print(r.files('mitm_outpost.testing').joinpath('nginx-single.conf').read_text())"], tmp_path)
    assert template == (ROOT / "docs" / "forward-auth" / "nginx-single.conf").read_text() + "\n"


def test_installed_pytest_finds_the_plugin(fresh: Path, tmp_path: Path) -> None:
    (tmp_path / "test_nothing.py").write_text("def test_nothing(): pass\n")
    listed = _run([str(fresh / "bin" / "python"), "-m", "pytest", "--fixtures", "-p", "no:cacheprovider"], tmp_path)
    assert "outpost_login_as" in listed and "mitm_outpost/pytest_plugin.py" in listed
