"""Print the README's model-family table from a fresh run of the family matrix.

Runs :func:`family_cases.family_check` (plain and packed batch, Ulysses and ring, 2 gloo ranks,
loss/logits/every gradient against the unsharded model) for every causal-LM family transformers
ships, and prints one Markdown row per family. Usage::

    python tests/family_table.py > /tmp/families.md          # every family (~15 min on 2 cores)
    python tests/family_table.py llama gpt_oss               # some families
"""

from __future__ import annotations

import os
import sys

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__))]

import family_cases as fc  # noqa: E402
from harness import RankPool  # noqa: E402


def row(model_type: str, result: dict | None) -> str:
    """One Markdown table row for a family's :func:`family_cases.family_check` result (None: the
    family bypasses the attention registry, refused without building it)."""
    if result is None:
        text = "refused: attention bypasses transformers' attention registry"
        return f"| `{model_type}` | {text} | {text} |"
    if "build_error" in result:
        reason = result["build_error"]
        text = ("not checked: " + reason if reason in fc.NOT_BUILT.values()
                else f"not checked: the tiny config does not build ({reason[:90]})")
        return f"| `{model_type}` | {text} | {text} |"
    cells = []
    for strategy in ("ulysses", "ring"):
        ok, text = fc.verdict(result[strategy])
        cells.append(text if ok else f"**FAILS**: {text}")
    return f"| `{model_type}` | {cells[0]} | {cells[1]} |"


def main(families: list[str]) -> None:
    families = families or fc.causal_lm_families()
    pool = RankPool(2)
    try:
        print("| family | ulysses | ring |")
        print("|---|---|---|")
        for model_type in families:
            result = pool.run(fc._family_check_quiet, model_type)[0] if fc.through_registry(model_type) else None
            print(row(model_type, result), flush=True)
    finally:
        pool.close()


if __name__ == "__main__":
    main(sys.argv[1:])
