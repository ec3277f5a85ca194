"""Remembering expensive, pure steps of a build by what went into them.

An int8 build lowers the same float model more than once (each accuracy-recovery variant,
then the one kept with the precision search, then fp32 for the speed check); calibrating
or converting it again would give the same result. ``Recent`` keeps the last few results,
found by a fingerprint of the inputs' content, never by object identity.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

T = TypeVar("T")


def fingerprint(*parts: Any) -> str:
    """A digest of bytes, strings, numbers, numpy arrays, and mappings/sequences of them."""
    digest = hashlib.sha256()
    _feed(digest, parts)
    return digest.hexdigest()


def _feed(digest, part: Any) -> None:
    if isinstance(part, bytes):
        digest.update(b"b%d:" % len(part) + part)
    elif isinstance(part, np.ndarray):
        digest.update(f"a{part.dtype.str}{part.shape}:".encode() + np.ascontiguousarray(part).tobytes())
    elif isinstance(part, Mapping):
        digest.update(b"{")
        for key in sorted(part):
            _feed(digest, key)
            _feed(digest, part[key])
        digest.update(b"}")
    elif isinstance(part, Sequence) and not isinstance(part, str):
        digest.update(b"[")
        for item in part:
            _feed(digest, item)
        digest.update(b"]")
    else:
        digest.update(f"{type(part).__name__}:{part!r};".encode())


class Recent(Generic[T]):
    """The results of the last ``size`` distinct keys (least recently used dropped first)."""

    def __init__(self, size: int = 2):
        self.size = size
        self._results: collections.OrderedDict[Hashable, T] = collections.OrderedDict()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._results

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        if key not in self._results:
            self._results[key] = compute()
            while len(self._results) > self.size:
                self._results.popitem(last=False)
        self._results.move_to_end(key)
        return self._results[key]
