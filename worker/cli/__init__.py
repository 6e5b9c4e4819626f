"""CLI: ``qbgw``. Each command is a few lines over a library call; errors become one line on stderr and a named
exit code (``kit``).
"""

from .main import main

__all__ = ["main"]
