"""The distribution as users get it: the wheel and the sdist hold the recipes, py.typed and every module,
an install from the wheel finds its recipes, and the version has one source.

The build runs the setuptools backend offline (no build isolation) on a copy of the sources,
so the checkout stays clean. In CI, FXDECOMP_DIST_DIR names the folder of the wheel and sdist
that `python -m build` made and that the suite runs against; those are checked too.
"""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

import fxdecomp
from fxdecomp.cli import main
from fxdecomp.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE", "fxdecomp", "passes", "tests")
RECIPES = sorted(p.name for p in (ROOT / "passes").glob("*.toml"))
MODULES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "fxdecomp").rglob("*.py"))


def backend(hook: str, source: Path, out: Path) -> Path:
    """Run a PEP 517 hook of setuptools in ``source``; the path of the file it built."""
    code = f"import setuptools.build_meta as b; print(b.{hook}({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(wheel, sdist) built as `python -m build` does: the sdist from the sources, the wheel from the sdist."""
    tmp = tmp_path_factory.mktemp("build")
    source = tmp / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, source / name)
    sdist = backend("build_sdist", source, tmp / "dist")
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp / "unpacked", filter="data")
    wheel = backend("build_wheel", tmp / "unpacked" / sdist.name.removesuffix(".tar.gz"), tmp / "dist")
    return wheel, sdist


def check_wheel(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f"fxdecomp/_recipes/{r}" for r in RECIPES] + ["fxdecomp/_recipes/__init__.py", "fxdecomp/py.typed"] + MODULES
    assert not [n for n in missing if n not in names], "missing from the wheel"
    assert not [n for n in names if "__pycache__" in n or n.startswith(("tests/", "tools/", "passes/"))]
    info = next(n for n in names if n.endswith(".dist-info/METADATA"))
    metadata = zipfile.ZipFile(wheel).read(info).decode()
    for field in ("License-Expression: MIT", "Requires-Python: >=3.11", "Project-URL: Repository", "Classifier: Typing :: Typed", "Provides-Extra: demo"):
        assert field in metadata, field
    assert "tensorly" not in metadata.split("Provides-Extra")[0], "tensorly is no runtime dependency"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "fxdecomp = fxdecomp.cli:main" in zipfile.ZipFile(wheel).read(info.replace("METADATA", "entry_points.txt")).decode()


def check_sdist(sdist: Path) -> None:
    top = sdist.name.removesuffix(".tar.gz")
    names = set(tarfile.open(sdist).getnames())
    needed = [f"{top}/passes/{r}" for r in RECIPES] + [f"{top}/{n}" for n in ("LICENSE", "setup.py", "pyproject.toml", "fxdecomp/py.typed", "tests/conftest.py")]
    assert not [n for n in needed if n not in names], "missing from the sdist"


def test_wheel_and_sdist_hold_recipes_typing_marker_and_modules(built):
    wheel, sdist = built
    check_wheel(wheel)
    check_sdist(sdist)
    dist = os.environ.get("FXDECOMP_DIST_DIR")
    if dist:  # CI: the artifacts the suite is running against
        check_wheel(next(Path(dist).glob("fxdecomp-*.whl")))
        check_sdist(next(Path(dist).glob("fxdecomp-*.tar.gz")))


def test_installed_wheel_loads_its_recipes(built, tmp_path):
    """The wheel unpacked alone on sys.path (no checkout beside it): recipes come from the package data."""
    site = tmp_path / "site"
    zipfile.ZipFile(built[0]).extractall(site)
    code = (
        "import json, fxdecomp; from fxdecomp.recipes import available_recipes, load_recipe, recipe_root; "
        "r = load_recipe('fast'); "
        "print(json.dumps([fxdecomp.__file__, str(recipe_root().joinpath('fast.toml')), available_recipes(), [[s.name, s.options] for s in r.steps]]))"
    )
    env = dict(os.environ, PYTHONPATH=str(site), PYTHONSAFEPATH="1")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    file, root, names, steps = json.loads(done.stdout.splitlines()[-1])
    assert Path(file).is_relative_to(site) and Path(root) == site / "fxdecomp" / "_recipes" / "fast.toml"
    assert names == [r.removesuffix(".toml") for r in RECIPES]
    assert steps == [[s.name, s.options] for s in load_recipe("fast").steps]


def test_version_has_one_source(capsys):
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert fxdecomp.__version__ == importlib.metadata.version("fxdecomp") == declared
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"fxdecomp {declared} (torch ")
