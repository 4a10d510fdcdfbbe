"""Write the model-family table of ``docs/model-families.md`` from a fresh run of the family matrix.

Runs :func:`family_cases.family_check` (plain and packed batch, Ulysses and ring, 2 gloo ranks,
loss/logits/every gradient against the unsharded model) for every causal-LM family transformers
ships, and prints one Markdown row per family; with ``--write`` it puts the rows into the table of
``docs/model-families.md`` (``tests/test_docs.py`` and ``tests/test_families.py`` check that table
against the installed transformers and against each family's result). Usage::

    python tests/family_table.py --write                     # every family (~15 min on 2 cores)
    python tests/family_table.py --write llama gpt_oss       # rewrite some rows
    python tests/family_table.py llama                       # print only
"""

from __future__ import annotations

import os
import pathlib
import re
import sys

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__))]

import family_cases as fc  # noqa: E402
from harness import RankPool  # noqa: E402

#: The page holding the table.
DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "model-families.md"
HEADER = "| family | ulysses | ring |\n|---|---|---|\n"


def doc_rows(text: str | None = None) -> dict[str, str]:
    """The table's rows in :data:`DOC` by model type, in the page's order."""
    text = DOC.read_text() if text is None else text
    return {m.group(1): m.group(0) for m in re.finditer(r"^\| `([^`]+)` \|.*$", text, re.M)}


def write_rows(rows: dict[str, str]) -> None:
    """Replace (or add) these rows of :data:`DOC`'s table, keeping it sorted by model type."""
    text = DOC.read_text()
    table = {**doc_rows(text), **rows}
    start = text.index(HEADER) + len(HEADER)
    end = start
    for line in text[start:].splitlines(keepends=True):
        if not line.startswith("| `"):
            break
        end += len(line)
    body = "".join(table[k] + "\n" for k in sorted(table))
    DOC.write_text(text[:start] + body + text[end:])


def row(model_type: str, result: dict | None) -> str:
    """One Markdown table row for a family's :func:`family_cases.family_check` result (None: the
    family bypasses the attention registry, refused without building it)."""
    if result is None:
        text = "refused: attention bypasses transformers' attention registry"
        return f"| `{model_type}` | {text} | {text} |"
    if "build_error" in result:
        reason = result["build_error"]
        text = (
            "not checked: " + reason
            if reason in fc.NOT_BUILT.values()
            else f"not checked: the tiny config does not build ({reason[:90]})"
        )
        return f"| `{model_type}` | {text} | {text} |"
    cells = []
    for strategy in ("ulysses", "ring"):
        ok, text = fc.verdict(result[strategy])
        cells.append(text if ok else f"**FAILS**: {text}")
    return f"| `{model_type}` | {cells[0]} | {cells[1]} |"


def main(argv: list[str]) -> None:
    write = "--write" in argv
    families = [a for a in argv if a != "--write"] or fc.causal_lm_families()
    rows = {}
    pool = RankPool(2)
    try:
        print(HEADER, end="")
        for model_type in families:
            result = pool.run(fc._family_check_quiet, model_type)[0] if fc.through_registry(model_type) else None
            rows[model_type] = row(model_type, result)
            print(rows[model_type], flush=True)
    finally:
        pool.close()
    if write:
        write_rows(rows)
        print(f"wrote {len(rows)} rows to {DOC}")


if __name__ == "__main__":
    main(sys.argv[1:])
