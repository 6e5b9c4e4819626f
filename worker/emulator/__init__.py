"""Emulator: a faithful stand-in for the QuickBlox HIPAA AI Gateway and its session endpoint, product code for
development, tests and demos (``server``), with scripted and random faults (``faults``) and sessions
(``sessions``). Everything it does that the QuickBlox docs do not state is marked as an assumption.
"""

from .server import Emulator, EmulatorConfig, serve

__all__ = ["Emulator", "EmulatorConfig", "serve"]
