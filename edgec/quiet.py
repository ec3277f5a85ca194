"""Keep native libraries' stderr chatter (TensorFlow's CUDA probes, LiteRT's delegate
banners) out of edgec's output, while keeping it for error messages."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def captured_stderr() -> Iterator[IO[str]]:
    """Redirect file descriptor 2 into a temporary file for the duration of the block."""
    with tempfile.TemporaryFile(mode="w+") as log:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            yield log
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)


def import_tensorflow():
    """Import TensorFlow without its start-up log lines (harmless CUDA probes on CPU hosts).

    Listing devices runs the CUDA probe now, muted, instead of at the first layer built.
    """
    with captured_stderr():
        import tensorflow

        tensorflow.config.list_physical_devices()

    return tensorflow
