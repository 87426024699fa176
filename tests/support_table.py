"""Render ``docs/support.md`` from the support matrices' ``EXPECTED`` dicts.

    python -m tests.support_table            # writes docs/support.md
    python -m tests.support_table --check    # exit status 1 if docs/support.md differs from the rendering

One table per test file (``tests/test_support_matrix.py``, ``tests/test_support_model_techniques.py``): the model
families of ``tests/zoo.py`` as rows, the techniques as columns, each cell ``✓`` (exact against the test's
independent reference), ``✗`` with the reason (refused at setup with an error naming the model, the reason and the
alternative) or ``n/a``. ``tests/test_docs.py`` checks that the page equals the rendering, so the page cannot drift
from what the tests assert.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from types import ModuleType

from tests import test_support_matrix, test_support_model_techniques
from tests.zoo import FAMILIES

PAGE = Path(__file__).resolve().parents[1] / "docs" / "support.md"
MATRICES: tuple[ModuleType, ...] = (test_support_matrix, test_support_model_techniques)

_INTRO = """\
# Support matrix: every technique on every model family

Generated from the `EXPECTED` dicts of the support-matrix tests by `python -m tests.support_table`; do not edit by
hand (`tests/test_docs.py` fails when this page and the tests disagree). Each cell is one test, run on every CI run
(CPU, fp32, tiny configs of each family from `tests/zoo.py`):

- ✓ exact: the technique's result equals an independent reference (the unoptimised model, each sample run alone, a
  hand-written list), within the tolerance the test file states;
- ✗ refused: the technique raises at setup (or at the first packed batch), with an error that names the model, the
  reason and the alternative; it never trains on a wrong result;
- n/a: the combination does not exist (the reason is under the table).
"""


def _markdown(text: str) -> str:
    """reStructuredText literals (double backticks) as markdown code."""
    return re.sub(r"``([^`]+)``", r"`\1`", text)


def _title_and_body(module: ModuleType) -> tuple[str, str]:
    """The test file's docstring: its first line (without "Support matrix: ") and the paragraphs after it."""
    lines = (module.__doc__ or module.__name__).strip().splitlines()
    title = lines[0].rstrip(".").removeprefix("Support matrix: ")
    return _markdown(title[:1].upper() + title[1:]), _markdown("\n".join(lines[1:]).strip())


def _cell(value: str) -> str:
    if value == "exact":
        return "✓"
    if value.startswith("refused: "):
        return "✗ " + value.removeprefix("refused: ")
    if value.startswith("n/a"):
        return "n/a"
    raise ValueError(f"Unknown support-matrix value {value!r}: use 'exact', 'refused: <reason>' or 'n/a: <reason>'.")


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def render_matrix(module: ModuleType) -> str:
    """One markdown section: a title, the table (families x techniques) and the reasons of the ``n/a`` cells."""
    expected: dict[tuple[str, str], str] = module.EXPECTED
    techniques: list[str] = list(module.TECHNIQUES)
    families = [f for f in FAMILIES if any((f, t) in expected for t in techniques)]
    name = Path(module.__file__ or "").name
    title, body = _title_and_body(module)
    lines = [f"## {title}", "", f"From `tests/{name}`. {body}", ""]
    lines.append("| family | what the tiny config exercises | " + " | ".join(techniques) + " |")
    lines.append("| --- " * (len(techniques) + 2) + "|")
    for family in families:
        cells = [_escape(_cell(expected[(family, t)])) for t in techniques]
        lines.append(f"| {family} | {_escape(FAMILIES[family].note)} | " + " | ".join(cells) + " |")
    reasons = sorted({v.removeprefix("n/a").lstrip(": ") for v in expected.values() if v.startswith("n/a")})
    if reasons:
        lines += ["", "n/a: " + "; ".join(r for r in reasons if r) + "."]
    return "\n".join(lines) + "\n"


def render() -> str:
    """The whole page."""
    return _INTRO + "".join("\n" + render_matrix(m) for m in MATRICES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render docs/support.md from the support-matrix tests.")
    parser.add_argument("--check", action="store_true", help="only compare; exit status 1 if the page is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = PAGE.read_text(encoding="utf-8") if PAGE.exists() else ""
        if current != text:
            sys.stderr.write(f"{PAGE} is stale: run `python -m tests.support_table`.\n")
            return 1
        return 0
    PAGE.write_text(text, encoding="utf-8")
    sys.stdout.write(f"wrote {PAGE}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
