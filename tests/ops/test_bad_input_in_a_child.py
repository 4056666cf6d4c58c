"""Every operator refuses bad arguments with a Python exception that names the
argument, on every device: each operator runs its cases in a child process, so
a crash (a segfault, a device-side assertion) fails that operator's test alone
instead of ending the whole run. On an H200 machine every such error once ended
the process: its compiler linked a private copy of libstdc++ into the extension
(see setup.py, _process_libstdcxx)."""

import os
import subprocess
import sys

import pytest

# Each case: (argument the message must name, exception type, a call). The child
# prints one line per case: "ok" or what went wrong.
_CHILD = r'''
import sys
import torch
import actreplay_ext  # noqa: F401
from actreplay_ext import ops

A = torch.ops.actreplay
op, dev = sys.argv[1], sys.argv[2]
g = torch.Generator().manual_seed(0)
h = torch.randn(4, 8, generator=g).to(dev)
U = torch.randn(30, 8, generator=g).to(dev)
w = torch.ones(8, device=dev)
idx = torch.stack([torch.randperm(30, generator=g)[:5] for _ in range(4)]).to(dev)
lp = torch.log_softmax(torch.randn(4, 5, generator=g), -1).to(dev)
gk = torch.ones(4, device=dev)
logq = A.topk_kl_logq(h, U, w, 1e-6, idx, lp)[1]
ent = torch.rand(2, 5, generator=g).to(dev)
cand = torch.ones(5, dtype=torch.bool, device=dev)
vals = torch.randn(2, 8, generator=g).to(dev)
pos = lambda *p: torch.tensor(p, device=dev)  # noqa: E731

lens = [
    # the numbers too: a private libstdc++ lost everything after the first one
    ("topk", ValueError, lambda: ops.lens_entropy(h, U, w, 1e-6, 31), "V = unembed.size(0) = 30, got topk = 31"),
    ("topk", ValueError, lambda: ops.lens_entropy(h, U, w, 1e-6, -1)),
    ("unembed", ValueError, lambda: ops.lens_entropy(h, U[:, :7].contiguous(), w, 1e-6, 1)),
    ("hidden", ValueError, lambda: ops.lens_entropy(torch.randn(8, 4, device=dev).t(), U, w, 1e-6, 1)),
    ("unembed", TypeError, lambda: ops.lens_entropy(h, U.half(), w, 1e-6, 1)),
    ("hidden", TypeError, lambda: ops.lens_entropy(h.int(), U.int(), None, 1e-6, 1)),
    ("norm_weight", ValueError, lambda: ops.lens_entropy(h, U, w[:5].contiguous(), 1e-6, 1)),
    ("eps", ValueError, lambda: ops.lens_entropy(h, U, w, float("nan"), 1)),
    ("hidden", ValueError, lambda: ops.lens_entropy(h[0], U, w, 1e-6, 1)),
]
kl_args = [
    ("target_idx", IndexError, lambda f: f(h, U, w, 1e-6, idx + 30, lp)),
    ("target_idx", IndexError, lambda f: f(h, U, w, 1e-6, idx - 31, lp)),
    ("target_idx", TypeError, lambda f: f(h, U, w, 1e-6, idx.int(), lp)),
    ("target_idx", ValueError, lambda f: f(h, U, w, 1e-6, idx[:3], lp[:3])),
    ("target_logp", ValueError, lambda f: f(h, U, w, 1e-6, idx, lp[:, :2].contiguous())),
    ("target_logp", ValueError, lambda f: f(h, U, w, 1e-6, idx, torch.full_like(lp, float("nan")))),
    ("target_logp", TypeError, lambda f: f(h, U, w, 1e-6, idx, lp.half())),
    ("unembed", ValueError, lambda f: f(h, U.t().contiguous().t(), w, 1e-6, idx, lp)),
]
cases = {
    "lens_entropy": lens,
    "topk_kl": [(a, e, lambda c=c: c(ops.topk_kl)) for a, e, c in kl_args],
    "topk_kl_raw": [(a, e, lambda c=c: c(A.topk_kl)) for a, e, c in kl_args],
    "topk_kl_logq": [(a, e, lambda c=c: c(A.topk_kl_logq)) for a, e, c in kl_args],
    "topk_kl_backward": [(a, e, lambda c=c: c(lambda *x: A.topk_kl_backward(gk, *x))) for a, e, c in kl_args]
    + [("grad_kl", ValueError, lambda: A.topk_kl_backward(gk[:3], h, U, w, 1e-6, idx, lp))],
    # its index range is checked on the device as the kernel reads it (a device-side
    # assertion on CUDA, see test_ops.py); every other argument here
    "topk_kl_backward_logq": [
        ("grad_kl", ValueError, lambda: A.topk_kl_backward_logq(gk[:3], h, U, w, 1e-6, idx, lp, logq)),
        ("logq", ValueError, lambda: A.topk_kl_backward_logq(gk, h, U, w, 1e-6, idx, lp, logq[:, :4])),
        ("target_idx", TypeError, lambda: A.topk_kl_backward_logq(gk, h, U, w, 1e-6, idx.int(), lp, logq)),
        ("target_logp", ValueError,
         lambda: A.topk_kl_backward_logq(gk, h, U, w, 1e-6, idx, lp[:, :3].contiguous(), logq)),
    ],
    "topk_logp": [
        ("target_idx", IndexError, lambda: ops.topk_logp(h, U, w, 1e-6, idx + 30)),
        ("target_idx", TypeError, lambda: ops.topk_logp(h, U, w, 1e-6, idx.float())),
        ("norm_weight", TypeError, lambda: ops.topk_logp(h, U, w.double(), 1e-6, idx)),
    ],
    "replay_scatter": [
        ("positions", ValueError, lambda: ops.replay_scatter(h, pos(0, 1, 2), vals, "add")),
        ("positions", IndexError, lambda: ops.replay_scatter(h, pos(0, 4), vals, "add")),
        ("positions", IndexError, lambda: ops.replay_scatter(h, pos(-1, 2), vals, "add")),
        ("positions", ValueError, lambda: ops.replay_scatter(h, pos(1, 1), vals, "replace")),
        ("mode", ValueError, lambda: ops.replay_scatter(h, pos(1, 2), vals, "mul")),
        ("values", TypeError, lambda: ops.replay_scatter(h, pos(1, 2), vals.double(), "add")),
        ("positions", TypeError, lambda: ops.replay_scatter(h, pos(1, 2).int(), vals, "add")),
    ],
    "select_tokens": [
        ("rule", ValueError, lambda: ops.select_tokens(ent, cand, "median", 0.4, "low")),
        ("side", ValueError, lambda: ops.select_tokens(ent, cand, "ratio", 0.4, "middle")),
        ("value", ValueError, lambda: ops.select_tokens(ent, cand, "ratio", [0.1, 0.2, 0.3], "low")),
        ("value", ValueError, lambda: ops.select_tokens(ent, cand, "topk", 2.5, "low")),
        ("candidates", ValueError, lambda: ops.select_tokens(ent, cand[:4], "ratio", 0.4, "low")),
        ("candidates", TypeError, lambda: ops.select_tokens(ent, cand.int(), "ratio", 0.4, "low")),
        ("entropy", ValueError, lambda: ops.select_tokens(ent.index_fill(1, pos(1), float("nan")), cand, "ratio",
                                                          0.4, "low")),
    ],
}[op]
for arg, exc, call, *text in cases:
    try:
        call()
        print(f"no error for {arg}")
    except exc as e:
        msg = str(e).splitlines()[0]
        named = f"argument '{arg}'" in msg or f"arguments '{arg}'" in msg
        print("ok" if named and all(t in msg for t in text) else f"message does not say {arg!r} {text}: {msg}")
    except Exception as e:  # noqa: BLE001
        print(f"{type(e).__name__} instead of {exc.__name__} for {arg}: {str(e).splitlines()[0]}")
if dev == "cuda":
    torch.cuda.synchronize()
# good input still works after all that
assert torch.isfinite(ops.topk_kl(h, U, w, 1e-6, idx, lp)).all()
print("done")
'''

OPS = ["lens_entropy", "topk_kl", "topk_kl_raw", "topk_kl_logq", "topk_kl_backward", "topk_kl_backward_logq",
       "topk_logp", "replay_scatter", "select_tokens"]


@pytest.mark.parametrize("op", OPS)
def test_bad_arguments_are_python_errors_that_name_them(device, op):
    # -P / PYTHONSAFEPATH: the child imports the installed package, not a source tree in the cwd
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-P", "-c", _CHILD, op, device], capture_output=True, text=True, env=env,
                       timeout=300)
    lines = r.stdout.splitlines()
    assert r.returncode == 0, f"the child ended with {r.returncode}:\n{r.stdout}\n{r.stderr[-3000:]}"
    assert lines and lines[-1] == "done", r.stdout + r.stderr[-3000:]
    bad = [line for line in lines[:-1] if line != "ok"]
    assert not bad and len(lines) > 2, "\n".join(bad)
