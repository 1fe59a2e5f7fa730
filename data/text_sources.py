"""Text that exists on every machine with Python: the standard library's own source files.

Used to pretrain the tiny base Llama where nothing can be downloaded. The result depends on the
Python installation (version, distribution), and is deterministic for a given one.
"""

from __future__ import annotations

import os
import random
import sysconfig
from pathlib import Path

__all__ = ["stdlib_documents", "stdlib_files"]

# Folder names skipped anywhere below the stdlib root: test suites (large, repetitive, full of
# deliberately broken code), third-party packages, and GUI code (idle/tkinter/turtle demos).
_SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "site-packages",
        "dist-packages",
        "idlelib",
        "tkinter",
        "turtledemo",
        "__pycache__",
        "lib-dynload",
    }
)
# Single files skipped: the GUI turtle module, and build-specific sysconfig data that differs
# between machines with the same Python version (it would make the corpus machine-dependent).
_SKIP_FILE_PREFIXES = ("turtle.py", "_sysconfigdata_")


def stdlib_files(stdlib_dir: str | Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files kept by :func:`stdlib_documents`, sorted by relative path.

    ``stdlib_dir`` defaults to ``sysconfig.get_paths()["stdlib"]``.
    """
    root = Path(stdlib_dir if stdlib_dir is not None else sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"standard library folder {root} does not exist (sysconfig 'stdlib' path)")
    files = []
    # os.walk rather than rglob: pruning the skipped folders in place avoids walking site-packages.
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith("config-")]
        for name in names:
            if name.endswith(".py") and not name.startswith(_SKIP_FILE_PREFIXES):
                files.append((Path(folder) / name).relative_to(root))
    return [root / rel for rel in sorted(files, key=lambda p: p.as_posix())]


def stdlib_documents(max_chars: int | None = None, seed: int = 0) -> list[str]:
    """The Python standard library's ``.py`` sources as documents, one per file.

    Order: sorted by path, then shuffled with ``random.Random(seed)``, so that a ``max_chars`` cut
    samples the whole library rather than its alphabetical beginning. Files that are empty or do
    not decode as UTF-8 are skipped. With ``max_chars`` the documents are taken in that order until
    their total length reaches ``max_chars``; the last one is cut so that the total is exactly
    ``max_chars`` (or less, when the library is smaller).
    """
    if max_chars is not None and max_chars <= 0:
        raise ValueError(f"max_chars={max_chars} must be positive (or None for the whole library)")
    files = stdlib_files()
    random.Random(seed).shuffle(files)
    documents: list[str] = []
    total = 0
    for path in files:
        if max_chars is not None and total >= max_chars:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        if max_chars is not None and total + len(text) > max_chars:
            text = text[: max_chars - total]
        documents.append(text)
        total += len(text)
    if not documents:
        raise RuntimeError(
            f"no readable .py file in the standard library at {sysconfig.get_paths()['stdlib']}"
        )
    return documents
