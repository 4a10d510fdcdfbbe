"""hf-seqpar bench --rows: the row structures, the growth arithmetic, and one real measurement."""

from __future__ import annotations

import math

import pytest

from hf_seqpar.tools.cli import main
from hf_seqpar.tools.rowbench import RowSpec, growth_table, make_rows


def test_row_structures():
    packed = make_rows(RowSpec("ulysses", 2, 4096, "packed", doc_len=1024), 97)
    assert packed["position_ids"].shape == (1, 4096) and int((packed["position_ids"] == 0).sum()) == 4
    padded = make_rows(RowSpec("ulysses", 2, 4096, "padded", pad_frac=0.25), 97)
    assert int(padded["attention_mask"].sum()) == 3072 and bool((padded["labels"][:, 3072:] == -100).all())
    short = make_rows(RowSpec("ulysses", 2, 4096, "short", doc_len=1024), 97)
    assert short["input_ids"].shape == (4, 1024)  # the same tokens per step as one 4096-token row


def test_growth_exponent_and_ratio_to_single():
    rows = [
        dict(strategy="ring", world=2, rows=r, seq_len=n, peak_mib=m)
        for r, n, m in (("single", 1000, 10.0), ("single", 2000, 20.0), ("packed", 1000, 11.0), ("packed", 2000, 44.0))
    ]
    by = {(r["rows"], r["seq_len"]): r for r in growth_table(rows)}
    assert by["single", 2000]["growth"] == pytest.approx(1.0)
    assert by["packed", 2000]["growth"] == pytest.approx(math.log(4) / math.log(2))  # S^2 shows as 2.0
    assert by["packed", 1000]["vs_single"] == pytest.approx(1.1) and by["single", 1000]["growth"] is None


def test_bench_rows_refuses_unknown_structures(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--rows", "packd"])
    assert "valid row structures" in capsys.readouterr().err


@pytest.mark.e2e
def test_bench_rows_measures_in_fresh_ranks(capsys, tmp_path):
    out = tmp_path / "rows.json"
    assert (
        main(
            [
                "bench",
                "--rows",
                "packed",
                "--strategies",
                "ulysses",
                "--seq-lens",
                "512,1024",
                "--doc-len",
                "128",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    import json

    rows = json.loads(out.read_text())
    assert [r["seq_len"] for r in rows] == [512, 1024] and all(r["peak_mib"] > 0 for r in rows)
    assert rows[1]["growth"] is not None and "| ulysses | 2 | packed | 1024 |" in capsys.readouterr().out


def test_malloc_follows_tensors_is_set_unless_the_user_set_it(monkeypatch):
    """One allocator setting for every measuring tool (rows and the memory-model check); a user's
    ``MALLOC_MMAP_THRESHOLD_`` stands."""
    import platform

    from hf_seqpar.tools import bench

    monkeypatch.setenv(bench.MALLOC_ENV, "65536")
    assert bench.malloc_follows_tensors() is False
    monkeypatch.delenv(bench.MALLOC_ENV)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert bench.malloc_follows_tensors() is True
