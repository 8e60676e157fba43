"""The version of kvpack, in one place (pyproject reads it; results and files record it)."""

__version__ = "0.1.0"
