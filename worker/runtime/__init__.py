"""Runtime: what one process holds (``context``), found for some settings only by the facade and a process's
entry points (``locator``); the Celery app (``app``), the doorbell for a stored job (``dispatch``), and a guard on
kombu's Redis channels (``broker_guard``).
"""
