"""symrnn's version (pyproject.toml holds the same; tests/test_hostile_cli.py checks it)."""

__version__ = "0.1.0"
