"""Replay configurations over prompts, one table: the same harness as
`actreplay ablate` (see actreplay_ext/ablate.py for the options), kept as a
script for command lines written before it moved into the package."""

import sys

from actreplay_ext.tools.ablate import demo_setup, main  # noqa: F401  (demo_setup: the grid, for callers of the old script)

if __name__ == "__main__":
    sys.exit(main())
