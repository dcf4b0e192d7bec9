"""The blocks of the tutorial and of the guide to writing layers paste into the standard
interactive prompt, where a blank line ends a compound statement and a line after an
indented block must follow a blank line: the blocks, in order, are fed to ``python -i``
(and to IPython, where it is installed beside jbp) in a fresh temporary folder, and nothing may fail.
(tests/test_readme.py runs the same blocks as a script and compares what they print.)"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_readme import ROOT, blocks

PASTED = ["tutorial.md", "custom_layers.md"]
FAILED = ("Traceback (most recent call last)", "SyntaxError", "IndentationError")


def pasted(path: Path) -> str:
    """The python blocks of ``path`` as typed at the prompt: each block, then a blank line
    (what ends a block that closes on an indented line)."""
    return "".join(b.body + "\n" for b in blocks(path.read_text()) if b.lang == "python")


def _run(command, text, cwd):
    # LLVM at optimisation level 0: the same math, compiled about twice as fast
    env = dict(os.environ, TMPDIR=str(cwd), MPLBACKEND="Agg", PYTHONPATH=str(ROOT),
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip())
    return subprocess.run(command, input=text, capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


@pytest.mark.parametrize("name", PASTED)
def test_blocks_paste_into_the_interactive_prompt(name, tmp_path):
    proc = _run([sys.executable, "-i", "-q"], pasted(ROOT / "docs" / name) + "exit()\n",
                tmp_path)
    bad = [f for f in FAILED if f in proc.stderr]
    assert not bad, f"{name} pasted into python -i:\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".py"]


def test_the_prompt_rules_are_the_ones_checked(tmp_path):
    """A loop followed by an unindented line with no blank line is the known failure."""
    proc = _run([sys.executable, "-i", "-q"], "for i in range(2):\n    pass\nprint(i)\n",
                tmp_path)
    assert "SyntaxError" in proc.stderr
    proc = _run([sys.executable, "-i", "-q"], "for i in range(2):\n    pass\n\nprint(i)\n",
                tmp_path)
    assert "Error" not in proc.stderr and proc.stdout.strip() == "1"


@pytest.mark.skipif(importlib.util.find_spec("IPython") is None,
                    reason="IPython is not installed beside jbp")
@pytest.mark.parametrize("name", PASTED)
def test_blocks_paste_into_ipython(name, tmp_path):
    proc = _run([sys.executable, "-m", "IPython", "--simple-prompt", "--no-banner", "--colors=NoColor"],
                pasted(ROOT / "docs" / name) + "exit()\n", tmp_path)
    out = proc.stdout + proc.stderr
    bad = [f for f in FAILED if f in out]
    assert not bad, f"{name} pasted into ipython:\n{out[-6000:]}"
