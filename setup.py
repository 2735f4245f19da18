"""Build layout that pyproject.toml cannot state: the recipes in ``passes/`` ship as ``fxdecomp/_recipes``.

The recipes are written in the repository's ``passes/`` folder (pipelines apart from the pass
code, the way a compiler keeps its pipeline definitions). ``package_dir`` maps that folder onto
the package ``fxdecomp._recipes`` (``passes/__init__.py`` holds no code; setuptools' editable
finder needs it for a mapped subpackage), so the wheel, the sdist and an editable install all
hold the TOML files, and ``fxdecomp.recipes.load_recipe`` reads them with ``importlib.resources``.
Everything else is in pyproject.toml.
"""

from setuptools import find_namespace_packages, setup

RECIPES = "fxdecomp._recipes"

setup(
    # every folder of the package (new subpackages are picked up without editing this file), plus the recipes
    packages=[*find_namespace_packages(include=["fxdecomp", "fxdecomp.*"], exclude=["*.__pycache__"]), RECIPES],
    package_dir={RECIPES: "passes"},
    package_data={"fxdecomp": ["py.typed"], RECIPES: ["*.toml"]},
)
