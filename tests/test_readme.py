"""The Python examples of the README and docs/ run as written, and print what they show.

Each markdown file is run as one script: its ```python blocks execute in order in one
namespace (a tutorial builds on its earlier blocks), in a temporary working folder, so
files a block writes (the tutorial's figure) never land in the repository.

Printed output: a ```python block followed, with only blank lines between, by a ```text
block must print exactly that text (each line's trailing whitespace and trailing blank
lines aside). Every ```text block must be such an output, so no number shown in one can
be typed in or go stale. In the files of ``STRICT`` every block that prints must show its
output that way.
"""

import contextlib
import io
import os
import re
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = (ROOT / "docs" / "reference.md").read_text()
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
STRICT = {"tutorial.md"}

FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


class Block:
    def __init__(self, text: str, match: re.Match):
        self.lang, self.body = match.group(1), match.group(2)
        self.start, self.end = match.start(), match.end()
        self.line = text.count("\n", 0, match.start(2)) + 1  # first line of the body


def blocks(text: str) -> list[Block]:
    return [Block(text, m) for m in FENCE.finditer(text)]


def normalize(s: str) -> str:
    return "\n".join(line.rstrip() for line in s.rstrip().splitlines())


def runs(text: str):
    """``(python block, the text block it must print or None)`` in order of the file."""
    found = blocks(text)
    for i, block in enumerate(found):
        if block.lang != "python":
            continue
        nxt = found[i + 1] if i + 1 < len(found) else None
        shown = (nxt if nxt is not None and nxt.lang == "text"
                 and not text[block.end:nxt.start].strip() else None)
        yield block, shown


@pytest.fixture(autouse=True)
def _data_cache(tmp_path_factory, monkeypatch):
    """MNIST-1D is generated into a cache of this test run, not the user's."""
    monkeypatch.setenv("JBP_CACHE", str(tmp_path_factory.getbasetemp() / "jbp-cache"))


@pytest.fixture
def _isolated(tmp_path, monkeypatch):
    """A temporary working folder (also the temporary folder of ``tempfile``), and
    jax_enable_x64 put back as it was."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    x64 = jax.config.jax_enable_x64
    yield tmp_path
    jax.config.update("jax_enable_x64", x64)


def _repository_files() -> dict:
    """Every file of the repository (not .git, .venv, caches) with its modification time."""
    found = {}
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in
                         ("__pycache__", "runs", "build") and not d.endswith(".egg-info")]
        for name in files:
            path = os.path.join(folder, name)
            found[path] = os.stat(path).st_mtime_ns
    return found


def _models(namespace, found: dict) -> None:
    """Add every model (a Layer) bound in ``namespace`` to ``found`` (by id)."""
    import jbp

    for value in namespace.values():
        if isinstance(value, jbp.Layer):
            found.setdefault(id(value), value)


def _unsummarized(models, namespace) -> list:
    """The models that ``jbp.summary`` prints for no input shape of the namespace's arrays
    (each array's shape without its batch axis)."""
    import jbp

    arrays = [a for a in jax.tree_util.tree_leaves(list(namespace.values()))
              if isinstance(a, (jax.Array, np.ndarray)) and a.ndim >= 1]
    shapes = sorted({tuple(a.shape[1:]) for a in arrays}, key=lambda s: (len(s), s))
    failed = []
    for model in models:
        for shape in shapes:
            try:
                table = jbp.summary(model, shape)
            except Exception:  # noqa: BLE001 (not this model's input shape)
                continue
            assert table.splitlines()[-1].startswith("total: ")
            break
        else:
            failed.append(model)
    return failed


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_markdown_python_blocks(path, _isolated):
    before = _repository_files()
    text = path.read_text()
    namespace = {"__name__": "__main__"}
    models = {}
    n_run = 0
    for block, shown in runs(text):
        where = f"{path.name}, block at line {block.line}"
        out = io.StringIO()
        # Padding keeps the markdown's line numbers in tracebacks.
        code = compile("\n" * (block.line - 1) + block.body, str(path), "exec")
        with contextlib.redirect_stdout(out):
            exec(code, namespace)
        n_run += 1
        _models(namespace, models)
        printed = out.getvalue()
        if "print(jbp.compare_grads(" in block.body:
            assert "all leaves agree" in printed, where
        if shown is not None:
            assert normalize(printed) == normalize(shown.body), (
                f"{where} printed (+) something other than the ```text block below it "
                f"(-, line {shown.line})")
        elif path.name in STRICT:
            assert not printed.strip(), f"{where} prints, but no ```text block shows it:\n{printed}"
    orphans = [b.line for b in blocks(text) if b.lang == "text"
               and b.line not in {s.line for _, s in runs(text) if s is not None}]
    assert not orphans, f"{path.name}: ```text blocks at lines {orphans} follow no python block"
    assert _repository_files() == before, f"{path.name}: a block wrote into the repository"
    failed = _unsummarized(models.values(), namespace)
    assert not failed, f"{path.name}: jbp.summary printed none of {failed}"
    if path.name == "tutorial.md":
        assert n_run > 10
        assert (_isolated / "reverse_network.png").stat().st_size > 10_000
        assert (ROOT / "docs" / "img" / "reverse_network.png").is_file()


def test_output_check_compares_what_is_printed():
    """The check above would catch a stale number, and pairs only adjacent blocks."""
    text = ("```python\nprint(1 + 1)\n```\n\n```text\n2   \n\n```\n"
            "```python\nx = 3\n```\nprose\n```text\nnot output\n```\n")
    pairs = [(b.body, s and s.body) for b, s in runs(text)]
    assert pairs == [("print(1 + 1)\n", "2   \n\n"), ("x = 3\n", None)]
    assert normalize("2\n") == normalize(pairs[0][1])
    assert normalize("3\n") != normalize(pairs[0][1])


def test_reference_quotes_real_error_message():
    import jax.numpy as jnp
    import jbp

    model = jbp.mlp([40, 100, 100, 10])
    _, params = model.init(jax.random.key(0), (40,))
    with pytest.raises(ValueError) as err:
        model.apply(params, jnp.ones((32, 39)))
    for text in (str(err.value), *err.value.__notes__):
        assert " ".join(text.split()) in " ".join(REFERENCE.split())
