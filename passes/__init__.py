"""The recipes (``*.toml``), shipped as the package data ``fxdecomp._recipes`` (see setup.py).

This file only makes the folder importable under that name, for ``importlib.resources`` in an
editable install; there is no code here.
"""
