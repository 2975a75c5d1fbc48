"""One way for the small benchmark scripts to hand over their markdown report: printed, and written if asked."""

from __future__ import annotations

from pathlib import Path


def publish(lines: list[str], out: Path | None) -> None:
    """Print the report ``lines`` and, with ``out``, write them there (folders made as needed)."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
