"""The tools around the library: the `actreplay` command and what it runs.

Imports run one way: these modules use the library (actreplay_ext.config, core,
hooks, models, reference); nothing in the library imports them.

    cli.py          the `actreplay` command (also `python -m actreplay_ext`)
    console.py      what every command shares: options, logging, output files, exit codes
    checks.py       arguments and checkpoints checked before any model loads
    data.py         data files (JSON lines), images and videos, batches of prompts
    verify.py       answer checking for Pass@K (math, numbers, choice letters)
    passk.py        Pass@K, data-parallel under torchrun
    ablate.py       a grid of configs over one data file
    analysis.py     the logit-lens analysis and its plots
    provenance.py   what each output records of its run (versions, config, files)
"""
