"""Run a command for as long as the process that started this one lives.

``python watchdog.py [--remove DIR]... -- COMMAND [ARG]...`` starts COMMAND and waits. It
ends COMMAND (SIGTERM, then SIGKILL after two seconds), removes every DIR and exits when
the first of these happens:

* its standard input reaches end-of-file: the parent closed the pipe (a normal stop) or
  the parent is gone, however it died. The kernel closes a dead process's file descriptors
  whatever killed it, SIGKILL included, so this needs no co-operation from the parent;
* it gets SIGTERM, SIGHUP or SIGINT;
* COMMAND exits by itself (its exit status becomes the watchdog's).

The parent starts it with a pipe as standard input and never writes to it. COMMAND's own
standard input is ``/dev/null`` and its output goes where the watchdog's goes. The first line
the watchdog prints is ``watchdog: pid N``, N being COMMAND's process id.

The file is run as a script, never imported from the package (which would import the whole
emulator), and uses the standard library only, so that ``python -I -S`` starts it in
milliseconds.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from types import FrameType

#: The prefix of the line that reports the command's process id.
PID_LINE = "watchdog: pid "
#: Seconds between SIGTERM and SIGKILL.
GRACE = 2.0


def _parse(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    remove: list[str] = []
    args = list(argv)
    while args and args[0] != "--":
        option = args.pop(0)
        if option != "--remove" or not args:
            raise SystemExit(f"usage: watchdog.py [--remove DIR]... -- COMMAND... ({option!r})")
        remove.append(args.pop(0))
    if len(args) < 2:
        raise SystemExit("usage: watchdog.py [--remove DIR]... -- COMMAND...")
    return remove, args[1:]


def main(argv: Sequence[str]) -> int:
    remove, command = _parse(argv)
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    print(f"{PID_LINE}{child.pid}", flush=True)
    stopping = threading.Lock()

    def end_child() -> None:
        # From the stdin thread and from signal handlers: the first caller does the work.
        if not stopping.acquire(blocking=False):
            return
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(GRACE)
            except subprocess.TimeoutExpired:
                child.kill()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=end_child, daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, on_signal)

    def watch_stdin() -> None:
        while True:
            try:
                if not os.read(0, 4096):
                    break
            except OSError:
                break
        end_child()

    threading.Thread(target=watch_stdin, name="stdin", daemon=True).start()
    status = child.wait()
    for folder in remove:
        shutil.rmtree(folder, ignore_errors=True)
    return 0 if stopping.locked() else status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
