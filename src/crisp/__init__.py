"""crisp: make reasoning models think shorter without getting worse."""

__version__ = "0.1.0"
