"""The ``svdadapt`` command: ``commands`` parses, calls and prints; ``report`` formats its tables. ``main`` is the
console script's entry point (``python -m svdadapt.cli`` runs it too).
"""

from .commands import main

__all__ = ["main"]
