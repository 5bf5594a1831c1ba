"""How much this machine charges for memory touched for the first time in a while.

    python benchmarks/probe_fresh_memory.py [--gib 10]

Backs ``--gib`` GiB of fresh anonymous memory, one GiB at a time (``MADV_POPULATE_WRITE``: the
kernel writes each 4 KiB page once, nothing is copied), and prints the time of each GiB. On
bare metal every GiB takes about the same, a few tenths of a second. On a virtual machine whose
host takes back the memory its guest leaves unused (free page reporting, ballooning), the GiB
the host still backs are as fast, and every GiB after them costs a host fault per page: on the
VM the README's figures come from, about 2.5 GiB stayed backed and every further GiB took
2.8-3.1 s (10-11 µs per page). That price is paid by whichever tool touches the memory first,
for the memory it allocates and for the page-cache pages the disk fills for it (see the README,
"Why ``"auto"`` is not simply ``"keep"``"). Run it after the machine has been quiet for a
minute: memory freed moments ago is still backed.
"""

from __future__ import annotations

import argparse
import mmap
import time

MADV_POPULATE_WRITE = 23  # Linux 5.14; Python's mmap module does not name it
GIB = 1 << 30


def main(argv: list[str] | None = None) -> list[float]:
    """Back ``--gib`` GiB one GiB at a time; print and return the seconds of each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=int, default=10, help="GiB to back (each held to the end)")
    args = parser.parse_args(argv)
    held, seconds = [], []
    for index in range(args.gib):
        memory = mmap.mmap(-1, GIB)
        start = time.perf_counter()
        memory.madvise(MADV_POPULATE_WRITE)
        seconds.append(time.perf_counter() - start)
        held.append(memory)  # so that the next GiB is new memory too
        print(f"GiB {index + 1:>3}: {seconds[-1]:.3f} s", flush=True)
    return seconds


if __name__ == "__main__":
    main()
