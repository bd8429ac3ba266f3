"""Write lora_migrate/_listing.py: what `lora-migrate conventions` prints, rendered from the schemas.

    .venv/bin/python scripts/gen_conventions_listing.py

Run it after changing a convention; tests/test_cli.py fails while the copy differs from what the schemas render.
"""

from __future__ import annotations

from pathlib import Path

from lora_migrate.cli import render_conventions
from lora_migrate.schemas import CONVENTIONS

OUT = Path(__file__).resolve().parents[1] / "lora_migrate" / "_listing.py"


def main() -> None:
    lines = render_conventions(CONVENTIONS).splitlines()
    OUT.write_text(
        '"""What `lora-migrate conventions` prints, generated from the schemas by\n'
        "`scripts/gen_conventions_listing.py`. Do not edit: tests/test_cli.py checks it against the schemas.\"\"\"\n\n"
        'LISTING = "".join(line + "\\n" for line in (\n' + "".join(f"    {line!r},\n" for line in lines) + "))\n",
        encoding="utf-8")
    print(f"{OUT}: {len(lines)} lines")


if __name__ == "__main__":
    main()
