"""The docs are true: every ```python block of docs/*.md and README.md runs, links resolve, support.md is current.

Blocks run as written, each in a fresh namespace, in a temporary working folder (Lightning writes logs and
checkpoints where it runs), on the CPU. Only placeholders for what a user brings are filled in:

* ``tokenised_train``, ``tokenised_val``, ``tokenised_test``: lists of tokenised samples (``input_ids`` and a label
  of 40 classes, 3-40 tokens, ids below 64);
* ``tokenizer``: an object with ``pad_token_id = 0``;
* ``"path/to/local/model"``: a saved tiny BERT classifier (12 layers of width 16, 512 positions, 40 labels);
  ``"path/to/local/causal-lm"``: a saved tiny GPT-2 (512 positions);
* hardware: ``accelerator="cuda"`` runs as ``accelerator="cpu"`` and ``devices=2`` as ``devices=1`` (the 2-process
  CPU twin of the multi-GPU page is ``tests/test_workflow.py``); ``TokenBudgetFinder()`` and
  ``GradientCheckpointing(every_n_layers="auto")``, which measure CUDA memory, get ``memory=SavedTensorsMemory(...)``
  (an estimate against a pretend 64 MiB device).

A block that cannot run as written (a fragment) is marked in the markdown with ``<!-- skip-test: why -->`` on the
line above its opening fence; the reason is shown as the skip message. Any other ``"path/to/..."`` string in a block
is an error: add its fixture here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_txopt.memory import SavedTensorsMemory
from tests import support_table
from tests.helpers import make_samples, tiny_bert, tiny_gpt2

ROOT = Path(__file__).resolve().parents[1]
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
SKIP = re.compile(r"<!--\s*skip-test:\s*(?P<why>.+?)\s*-->")
HARDWARE = {
    'accelerator="cuda"': 'accelerator="cpu"',
    "devices=2": "devices=1",
    # the finder and checkpointing to a memory budget measure CUDA memory: on the CPU they run on an estimate
    "TokenBudgetFinder()": "TokenBudgetFinder(memory=_estimate())",
    'GradientCheckpointing(every_n_layers="auto")': 'GradientCheckpointing(every_n_layers="auto", memory=_estimate())',
}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    code: str
    skip: str | None

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def python_blocks(page: Path) -> list[Block]:
    """The page's ```python blocks, each with the reason of a ``skip-test`` comment right above it."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            above = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            marker = SKIP.search(above)
            blocks.append(Block(page, i + 1, "\n".join(lines[i + 1 : end]) + "\n", marker and marker["why"]))
            i = end
        i += 1
    return blocks


BLOCKS = [block for page in PAGES for block in python_blocks(page)]


class _Tokenizer:
    pad_token_id = 0


def _samples(n: int, seed: int) -> list[dict[str, Any]]:
    return [{"input_ids": s["input_ids"], "labels": s["labels"]} for s in make_samples(n, seed=seed, num_labels=40)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    # 512 positions: the pages' rows and budgets are sized for real models (max_length=512)
    tiny_bert(num_hidden_layers=12, num_labels=40, max_position_embeddings=512).save_pretrained(root / "model")
    tiny_gpt2(n_positions=512).save_pretrained(root / "causal-lm")
    return {
        '"path/to/local/model"': repr(str(root / "model")),
        '"path/to/local/causal-lm"': repr(str(root / "causal-lm")),
    }


@pytest.fixture
def clean_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, in_process_ddp: None) -> None:
    """A temporary working folder; ``in_process_ddp`` undoes what an in-process ``strategy="ddp"`` run leaves."""
    monkeypatch.chdir(tmp_path)


def test_blocks_are_found():
    assert len(BLOCKS) >= 10
    assert all(b.code.strip() for b in BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.id)
def test_block_runs(block: Block, model_folders: dict[str, str], clean_process: None) -> None:
    if block.skip:
        pytest.skip(block.skip)
    code = block.code
    for placeholder, value in {**model_folders, **HARDWARE}.items():
        code = code.replace(placeholder, value)
    unknown = re.findall(r"[\"']path/to/[^\"']*[\"']", code)
    assert not unknown, f"{block.id}: no fixture for {unknown}; add one to tests/test_docs.py"
    namespace: dict[str, Any] = {
        "__name__": "docs_block",
        "tokenised_train": _samples(64, seed=1),
        "tokenised_val": _samples(16, seed=2),
        "tokenised_test": _samples(12, seed=3),
        "tokenizer": _Tokenizer(),
        "_estimate": lambda: SavedTensorsMemory(capacity=64 * 2**20),
    }
    torch.manual_seed(0)
    exec(compile(code, block.id, "exec"), namespace)


# --- links and the generated support page ---

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (not - and _), spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    found: set[str] = set()
    in_code = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            anchor = _anchor(line.lstrip("#"))
            n, unique = 1, anchor
            while unique in found:
                unique, n = f"{anchor}-{n}", n + 1
            found.add(unique)
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        missing_anchor = bool(anchor) and file.suffix == ".md" and file.exists() and anchor not in _anchors(file)
        if not file.exists() or missing_anchor:
            broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"


def test_anchor_matches_github():
    assert _anchor("A ladder of widths (`pad_to_lengths`)") == "a-ladder-of-widths-pad_to_lengths"
    assert _anchor("Time to accuracy (`time_to_accuracy.py`)") == "time-to-accuracy-time_to_accuracypy"


def test_support_page_is_the_rendering_of_the_matrices():
    assert support_table.PAGE.read_text(encoding="utf-8") == support_table.render(), (
        "docs/support.md is stale: run `python -m tests.support_table`"
    )


def test_support_page_cells():
    text = support_table.render()
    assert "| t5 |" in text and "✗ encoder-decoder (use strategy='bucket')" in text
    assert "✗ layers differ (full vs sliding-window attention)" in text
    with pytest.raises(ValueError, match="Unknown support-matrix value 'maybe'"):
        support_table._cell("maybe")


def test_every_method_page_links_the_support_matrix():
    pages = ["index", "padding", "packing", "freeze_embeddings", "gradient_checkpointing", "parameter_sharing"]
    pages += ["gradient_accumulation", "multi_gpu"]
    missing = [p for p in pages if "(support.md)" not in (ROOT / "docs" / f"{p}.md").read_text(encoding="utf-8")]
    assert not missing, f"no link to support.md in {missing}"
