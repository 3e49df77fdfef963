"""The one place fastspawn's version is written: pyproject.toml reads it
(``[tool.setuptools.dynamic]``) and ``fastspawn.__version__`` is this."""
__version__ = "0.1.0"
