"""Write the README's bad-input table from the test suite's cases (tests/test_bad_inputs.py: CASES).

    .venv/bin/python scripts/gen_bad_input_table.py          # rewrite the table in README.md
    .venv/bin/python scripts/gen_bad_input_table.py --check  # exit 1 if README.md is out of date

Each case is run through the CLI exactly as the test runs it; the table shows the exit code and the one line
the user sees (paths relative to the case's folder). The test ``test_readme_table_is_current`` compares.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
START, END = "<!-- bad-inputs:start (scripts/gen_bad_input_table.py) -->", "<!-- bad-inputs:end -->"


def render() -> str:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.test_bad_inputs import CASES, run_case, shown

    rows = ["| bad input | exit | what the user sees (stderr, one line; nothing is written) |", "|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            d = Path(tmp) / case.id
            code, _, err, _, _ = run_case(case, d)
            msg = shown(err, d).replace("|", "\\|").replace("\0", "\\0")
            code_span = f"`` {msg} ``" if "`" in msg else f"`{msg}`"
            rows.append(f"| {case.what} | {code} | {code_span} |")
    return "\n".join(rows) + "\n"


def section(text: str) -> str:
    """The table currently between the markers in ``text``."""
    if START not in text or END not in text:
        return ""
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def main() -> int:
    text = README.read_text(encoding="utf-8")
    table = render()
    if "--check" in sys.argv:
        return 0 if section(text) == table else 1
    if START not in text:
        raise SystemExit(f"README.md has no {START} marker")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    README.write_text(f"{head}{START}\n{table}{END}{tail}", encoding="utf-8")
    print(f"README.md: {table.count(chr(10)) - 2} bad inputs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
