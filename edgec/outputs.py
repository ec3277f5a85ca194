"""Atomic output: a build either publishes all its files or leaves the directory as it was.

Files are written to a hidden staging folder inside the output directory (same filesystem,
so ``os.replace`` is an atomic rename) and moved into place only when everything succeeded;
``report.json`` goes last, so a report never describes files that are not there.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from edgec.errors import OutputError


class OutputDir:
    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._created = not self.path.exists()
        self._prepare()

    def _prepare(self) -> None:
        """Fail before any expensive work if the directory cannot be written."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".edgec-probe-", dir=self.path)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise OutputError(
                f"Cannot write to output directory '{self.path}': {exc.strerror or exc}.",
                hint="Choose a directory you can write to with -o/--output.",
            ) from exc

    def commit(self, files: dict[str, bytes], last: str | None = None) -> list[Path]:
        """Write every file, then move them into place (``last`` moved last)."""
        staging = Path(tempfile.mkdtemp(prefix=".edgec-staging-", dir=self.path))
        try:
            for name, content in files.items():
                (staging / name).write_bytes(content)
            order = sorted(files, key=lambda n: n == last)
            for name in order:
                os.replace(staging / name, self.path / name)
        except OSError as exc:
            raise OutputError(f"Writing to '{self.path}' failed: {exc.strerror or exc}.") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return [self.path / name for name in files]

    def discard(self) -> None:
        """After a failed build: remove the directory if this build created it and it is empty."""
        if self._created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()
