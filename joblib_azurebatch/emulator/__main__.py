"""``python -m joblib_azurebatch.emulator``: the same command as ``joblib-azurebatch emulator``
(:mod:`.command`): run a local account until Ctrl-C and print how to reach it."""

from __future__ import annotations

from .command import main

if __name__ == "__main__":
    raise SystemExit(main())
