"""The process tree from Linux's /proc: what a test reads to see which processes a command left running."""

from __future__ import annotations

from pathlib import Path


def proc_stat(pid: str) -> list[str] | None:
    """/proc/PID/stat after the command name: [state, ppid, pgrp, ...]; None once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def proc_cmdline(pid: str) -> str:
    """A process's command line ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def live(pids) -> list[str]:
    """Those of ``pids`` still running (a zombie has stopped: it only waits for its parent to read its status)."""
    return [p for p in pids if (st := proc_stat(p)) is not None and st[0] not in ("Z", "X")]


def descendants(root: int) -> list[str]:
    """The live process tree below ``root``, found through /proc's parent links."""
    children: dict[str, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := proc_stat(entry.name)) is not None:
            children.setdefault(st[1], []).append(entry.name)
    out, todo = [], [str(root)]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return live(out)
