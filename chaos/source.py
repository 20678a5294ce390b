"""The code a chaos run imports: a frozen copy, so others' edits cannot leak in.

A run lasts many minutes and restarts workers throughout; several developers
edit this tree meanwhile. Before the first worker starts, the run copies
``celery_turnout/``, ``tests/integration/`` and ``chaos/`` into its own folder
(from the working tree, or ``celery_turnout/`` and ``tests/integration/`` from
a git commit) and puts that copy first on the import path of itself and of
every worker it starts.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

#: The repository root.
ROOT = Path(__file__).resolve().parent.parent

#: What a run imports, relative to the repository root.
PARTS = ("celery_turnout", "tests/integration")


def describe(ref: str | None) -> str:
    """Name the code a run uses: a commit, with ``+changes`` for a dirty tree."""
    head = _git("rev-parse", "--short", ref or "HEAD").strip()
    if ref is not None:
        return head
    dirty = _git("status", "--porcelain", "--", *PARTS, "chaos").strip()
    return f"{head}+changes" if dirty else head


def freeze(destination: Path, ref: str | None) -> Path:
    """Copy the code of a run into ``destination``; return the copy's root.

    Args:
        destination: A folder that does not exist yet.
        ref: A git commit for ``celery_turnout`` and ``tests/integration``, or
            None for the working tree. ``chaos/`` always comes from the tree.
    """
    destination.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    if ref is None:
        for part in PARTS:
            shutil.copytree(ROOT / part, destination / part, ignore=ignore)
    else:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", ref, *PARTS],
            capture_output=True, check=True, timeout=60,
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(destination)
    shutil.copytree(ROOT / "chaos", destination / "chaos", ignore=ignore)
    return destination


def use(root: Path) -> None:
    """Put the code under ``root`` first on this process's import path.

    Must run before anything imports ``celery_turnout``, ``harness`` or ``app``.
    """
    for path in (root / "tests" / "integration", root):
        text = str(path)
        if text in sys.path:
            sys.path.remove(text)
        sys.path.insert(0, text)


def _git(*args: str) -> str:
    completed = subprocess.run(
        ["git", "-C", str(ROOT), *args],
        capture_output=True, text=True, check=True, timeout=60,
    )
    return completed.stdout
