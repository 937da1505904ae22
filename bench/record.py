"""The metadata block every results file starts with (date, tabulation sha, machine, load, command): one
function builds it, one renders its markdown header, so every bench/results/*.{json,md} says the same
things the same way."""
from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

from bench.common import git_sha


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo; platform.processor() elsewhere): it changes between sessions
    on this machine kind, so speeds are only comparable within one record."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpus() -> int:
    """CPUs this process may run on (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def loadavg() -> list[float] | None:
    """1, 5 and 15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def metadata(command: str, threads: int | None = None, load_before: list[float] | None = None) -> dict:
    """The record's header: `git_sha` is the checkout at tabulation time (each run's training sha is in its
    own row); `load` is the machine's load average when the record was written (and `load_before`, when the
    caller sampled it before measuring)."""
    meta = dict(date=datetime.date.today().isoformat(), git_sha=git_sha(), command=command,
                machine=dict(arch=platform.machine(), cpu=cpu_model(), cpus=cpus()))
    if threads is not None:
        meta["machine"]["threads"] = threads
    meta["load"] = dict(before=load_before, after=loadavg()) if load_before is not None else dict(at_write=loadavg())
    return meta


def machine_line(meta: dict) -> str:
    m = meta["machine"]
    parts = [m["arch"], m["cpu"], f"{m['cpus']} CPUs"] + ([f"{m['threads']} threads"] if "threads" in m else [])
    load = meta.get("load") or {}
    show = lambda la: "n/a" if la is None else " / ".join(f"{x:g}" for x in la)  # noqa: E731
    if "before" in load:
        parts.append(f"load avg (1/5/15 min) before {show(load['before'])}, after {show(load['after'])}")
    else:
        parts.append(f"load avg (1/5/15 min) {show(load.get('at_write'))}")
    return ", ".join(parts)


def header(title: str, meta: dict, extra: str = "") -> list[str]:
    """Markdown lines: title, date + machine + tabulation sha, the command that wrote the file."""
    return [f"# {title}", "", f"{meta['date']}, {machine_line(meta)}; tabulated at git {meta['git_sha']}"
            + (f", {extra}" if extra else ""), "", f"`{meta['command']}`", ""]


def write_index(out: Path, stem: str, title: str, setups: list[str], driver: str) -> None:
    """OUT/<stem>.md: every setup's OUT/<stem>_<setup>.md in one file (a setup not run yet says so); each
    section is rewritten by its own run of the driver."""
    parts = [f"# {title}\n", f"Each section is `{stem}_<setup>.md`, rewritten by its own run of `{driver}`; the "
             f"JSON is `{stem}_<setup>.json`.\n"]
    for name in setups:
        md = Path(out) / f"{stem}_{name}.md"
        parts.append(md.read_text().replace("# ", "## ", 1) if md.exists()
                     else f"## {name}\n\nnot run yet: `python {driver} {name}`\n")
    (Path(out) / f"{stem}.md").write_text("\n".join(parts))
