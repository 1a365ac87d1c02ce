"""CPU use of every process (and each of its threads) over an interval, from /proc: who is busy under load?

    python -m realtime_qa.benchmarks.device.cpu_by_process --seconds 3 [--threads]

Prints one line per process using more than 2 % of a core: CPU % of one core, pid, command line (shortened);
with --threads, the busiest threads of each such process by name.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def _ticks(stat: Path) -> int:
    fields = stat.read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15 of stat)


def _sample(threads: bool) -> dict[tuple[int, int], int]:
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            found[(int(proc.name), 0)] = _ticks(proc / "stat")
            if threads:
                for task in (proc / "task").iterdir():
                    found[(int(proc.name), int(task.name))] = _ticks(task / "stat")
        except (OSError, ValueError, IndexError):
            continue
    return found


def _name(pid: int, tid: int) -> str:
    try:
        if tid:
            return Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:110]
    except OSError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--threads", action="store_true")
    args = parser.parse_args()
    before = _sample(args.threads)
    time.sleep(args.seconds)
    after = _sample(args.threads)
    scale = 100.0 / (TICKS * args.seconds)
    busy = {key: (after[key] - before.get(key, after[key])) * scale for key in after}
    total = sum(value for (pid, tid), value in busy.items() if tid == 0)
    print(f"all processes: {total:.0f} % of one core ({os.cpu_count()} cores)")
    for (pid, tid), value in sorted(busy.items(), key=lambda item: -item[1]):
        if tid == 0 and value > 2:
            print(f"{value:6.0f} %  {pid:>7}  {_name(pid, 0)}")
            if args.threads:
                tops = sorted(((v, t) for (p, t), v in busy.items() if p == pid and t), reverse=True)[:4]
                print("            threads: " + ", ".join(f"{_name(pid, t)} {v:.0f} %" for v, t in tops if v > 1))


if __name__ == "__main__":
    main()
