"""scripts/bench_longest_seq.py (issue 21's GPU benchmark, prepared on the CPU): its chunked loss equals the full
cross entropy, and the CPU smoke run trains every length up to --max."""

from __future__ import annotations

import doctest
import subprocess
import sys

import torch
import torch.nn.functional as F

from tests.conftest import REPO


def test_the_doctests_pass():
    import scripts.bench_longest_seq as m

    assert doctest.testmod(m).failed == 0


def test_chunked_loss_and_its_gradient_equal_the_full_cross_entropy():
    from scripts.bench_longest_seq import chunked_loss

    torch.manual_seed(0)
    h = torch.randn(1, 37, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    y = torch.randint(0, 11, (1, 37))
    full = F.cross_entropy((h[:, :-1] @ w.T).flatten(0, 1), y[:, 1:].flatten())
    g_full = torch.autograd.grad(full, (h, w))
    part = chunked_loss(h, w, y, 5)  # 36 targets in chunks of 5: the last chunk is short
    g_part = torch.autograd.grad(part, (h, w))
    torch.testing.assert_close(part, full)
    for a, b in zip(g_part, g_full):
        torch.testing.assert_close(a, b)


def test_the_cpu_smoke_run_trains_each_length_up_to_max():
    out = subprocess.run([sys.executable, "scripts/bench_longest_seq.py", "--size", "tiny", "--device", "cpu",
                          "--start", "128", "--max", "512", "--chunk", "64"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Longest row trained in one step: 512 tokens" in out.stdout and "stopped by --max" in out.stdout
    assert [line.split("|")[1].strip() for line in out.stdout.splitlines() if line.startswith("| ") and "yes" in line] \
        == ["128", "256", "512"]
