"""The app's own view of a measurement: the durations in the access records it wrote meanwhile.

wrk's latencies include what happens outside the app: gunicorn's parsing and sending, the
load generator and the kernel, all on the benchmark's two cores, and wrk's bookkeeping has
implied more requests in flight than it had connections (docs/performance.md). Every access
record carries the time the app took (`event.duration`: from gunicorn handing it the request
to the app handing the answer back), so a measurement can show the app's p99 beside wrk's.

The app's processes append to their own files under the log directory and rotate them by
renaming (`lib.log_files`); a file is followed by its inode, so a line written just before a
rotation is still read, from the file's new name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lib.core.config import APP_ID
from lib.observability.logs import log_files

ACCESS_DATASET = b'"dbapi.access"'


class AccessRecords:
    """Reads the access records appended under `directory` since the last `skip()` or read."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.offsets: dict[int, int] = {}  # inode -> the bytes of it already read

    def files(self) -> list[tuple[Path, int, int]]:
        """(path, inode, size) of every log file there now; one gone meanwhile is left out."""
        found = []
        for path in log_files(self.directory, APP_ID):
            try:
                status = os.stat(path)
            except FileNotFoundError:
                continue
            found.append((path, status.st_ino, status.st_size))
        return found

    def skip(self) -> None:
        """What the files hold now is not read: the next read starts here."""
        for _, inode, size in self.files():
            self.offsets[inode] = size

    def durations_ms(self) -> list[float]:
        """The durations of the access records written since the last skip or read, in ms,
        sorted. A line still being written is left for the next read."""
        durations = []
        for path, inode, size in self.files():
            start = self.offsets.get(inode, 0)
            if size < start:
                start = 0  # a new file under a freed inode
            if size == start:
                continue
            try:
                with path.open('rb') as lines:
                    lines.seek(start)
                    data = lines.read(size - start)
            except FileNotFoundError:
                continue  # rotated away between the listing and the read: read from its new name next time
            whole = data.rfind(b'\n') + 1
            self.offsets[inode] = start + whole
            for line in data[:whole].splitlines():
                if ACCESS_DATASET in line:
                    durations.append(json.loads(line)['event.duration'] / 1e6)
        return sorted(durations)
