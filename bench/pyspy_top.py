"""Summarise a py-spy raw profile (`py-spy record -f raw --threads`): samples per thread and
the frames most often on each busy thread's stack, so a device run's log says where the time
went without a flame-graph viewer.

    python bench/pyspy_top.py profile.txt --frames 15
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path


def summarise(path: Path, frames: int, threads: int) -> str:
    """Per-thread sample counts and each top thread's most frequent frames (inclusive)."""
    per_thread: collections.Counter[str] = collections.Counter()
    inclusive: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        thread, *stack_frames = stack.split(";")
        # pool threads differ only by their number: one line per pool
        name = thread.split(": ", 1)[-1].rstrip("0123456789").rstrip("_") or thread
        per_thread[name] += n
        for frame in set(stack_frames):
            if "(threading.py" in frame or "(concurrent/futures" in frame:
                continue
            inclusive[name][frame] += n
    out = ["samples per thread: " + ", ".join(f"{t} {n}" for t, n in per_thread.most_common())]
    for name, total in per_thread.most_common(threads):
        out.append(f"-- {name} ({total} samples)")
        for frame, n in inclusive[name].most_common(frames):
            out.append(f"{n / total:6.1%}  {frame}")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("profile", type=Path)
    p.add_argument("--frames", type=int, default=15)
    p.add_argument("--threads", type=int, default=3)
    args = p.parse_args()
    print(summarise(args.profile, args.frames, args.threads))


if __name__ == "__main__":
    main()
