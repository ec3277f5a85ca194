"""Keep native libraries' stderr chatter (TensorFlow's CUDA probes, LiteRT's delegate
banners) out of edgec's output, while keeping it for error messages."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def _redirected(fds: tuple[int, ...], target: int) -> Iterator[None]:
    """Point file descriptors ``fds`` at ``target`` for the duration of the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in fds]
    for fd in fds:
        os.dup2(target, fd)
    try:
        yield
    finally:
        for fd, copy in zip(fds, saved):
            os.dup2(copy, fd)
            os.close(copy)


@contextlib.contextmanager
def captured_stderr() -> Iterator[IO[str]]:
    """Redirect file descriptor 2 into a temporary file for the duration of the block."""
    with tempfile.TemporaryFile(mode="w+") as log:
        try:
            with _redirected((2,), log.fileno()):
                yield log
        finally:
            log.seek(0)


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """Discard what is written to stdout and stderr, by Python and by native code alike."""
    with open(os.devnull, "wb") as null, contextlib.redirect_stdout(io.StringIO()), _redirected((1, 2), null.fileno()):
        yield


def import_tensorflow():
    """Import TensorFlow without its start-up log lines (harmless CUDA probes on CPU hosts).

    Listing devices runs the CUDA probe now, muted, instead of at the first layer built.
    """
    with captured_stderr():
        import tensorflow

        tensorflow.config.list_physical_devices()

    return tensorflow
