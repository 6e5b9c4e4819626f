"""File broker: the embedded default's broker, kombu's filesystem transport with one change, so that no reader
ever opens a message still being written. Touches kombu and the broker's queue folder, nothing else.

What goes wrong (kombu 5.7.0): ``filesystem.Channel._put`` creates the message's file under its final name,
then locks it and writes the message; ``_get`` takes no lock, it moves any file with the queue's name out of the
folder and reads it. A worker polling between the creation and the write (a few microseconds, or milliseconds
when the writing thread waits for the GIL or the CPU on a busy machine) reads an empty file: ``json.loads``
raises in Celery's consume loop, the worker logs "Unrecoverable error" and stops, and the message is gone (its
writer writes into the file the reader took away and removed). With every worker of a machine stopped so, a job
stays where it was (a 429's retry "still retrying") until one is started again.

Here a message is written under a name the readers pass over (a dot first, ``.tmp`` last) and then renamed
into the queue, in one step: a reader finds the whole message or no file. No released kombu does this (5.7.0
is the newest); drop this module once one does.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

__all__ = ["FileTransport"]


class _Channel(filesystem.Channel):
    # kombu's callers pass keyword arguments (the exchange's routing); its base class's signature does not say so.
    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """Put ``message`` on ``queue``: written aside, then renamed into the queue (the name as kombu's)."""
        folder = Path(self.data_folder_out)
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        staged = folder / f".{name}.tmp"  # what _get and _size look for is "<anything>.<queue>.msg"
        try:
            staged.write_bytes(str_to_bytes(dumps(message)))  # type: ignore[no-untyped-call]
            os.replace(staged, folder / name)  # same folder, same file system: atomic
        except OSError as exc:
            staged.unlink(missing_ok=True)
            raise ChannelError(f"Cannot add file {name!r} to directory") from exc


class FileTransport(filesystem.Transport):
    """kombu's filesystem transport whose messages appear in the queue folder whole (see the module docstring)."""

    Channel = _Channel
