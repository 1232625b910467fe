"""Keeping freed memory: large tensors allocated every step stop costing fresh page faults."""

import subprocess
import sys

import pytest

# A training step in miniature: logits of 4096 positions x 8192 classes (128 MB), their gradient, an update.
SCRIPT = """
import resource, statistics, sys, torch
from lmforge.train.host import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tuned" else False
head = torch.nn.Linear(64, 8192, bias=False)
x, y = torch.randn(4096, 64), torch.randint(0, 8192, (4096,))
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.nn.functional.cross_entropy(head(x), y).backward()
    head.weight.grad = None
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# the median step of the second half: steady state, robust to the odd step where the heap grows once more
print(applied, int(statistics.median(faults[10:])))
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True).stdout
    applied, faults = out.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt tuning applies to Linux/glibc only")
def test_freed_memory_is_reused_without_page_faults():
    applied, tuned = _faults("tuned")
    assert applied == "True"
    _, plain = _faults("plain")
    logits_pages = 4096 * 8192 * 4 // 4096
    assert plain >= logits_pages, "without tuning every step faults its logits' pages in afresh"
    assert tuned < logits_pages // 100, "with tuning, a steady training loop reuses its freed memory"


def test_can_be_disabled_by_environment(monkeypatch):
    import lmforge.train.host as host

    monkeypatch.setattr(host, "_applied", False)
    monkeypatch.setenv("LMFORGE_MALLOC_TUNING", "0")
    assert host.keep_freed_memory() is False
