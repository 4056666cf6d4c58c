"""Pass@K with and without Activation Replay: the same harness as
`actreplay passk` (see actreplay_ext/passk.py for the options), kept as a
script for torchrun command lines written before it moved into the package:

    torchrun --nproc_per_node 8 python/eval_passk.py --base B --rlvr R --data rows.jsonl --out results/
    torchrun --nproc_per_node 8 -m actreplay_ext passk ...   # the same, from an installed package
"""

import sys

from actreplay_ext.tools.passk import main

if __name__ == "__main__":
    sys.exit(main())
