"""Alembic's environment and the dated revisions. Installed with the package as ``qbgw.migrations`` (a wheel
carries them, so ``qbgw db upgrade`` and the embedded default work from a plain ``pip install``); Alembic
reads the scripts by path, never by import.
"""
