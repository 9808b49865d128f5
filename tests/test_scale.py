"""potara_studies/scale.py's code path (not its timings): one run's figures add up, the table renders ratios."""

import os

import pytest

from potara_harness import checkpoint, report
from potara_studies import scale


def test_one_run_counts_every_file_it_writes_and_the_table_gives_ratios(tmp_path, monkeypatch):
    monkeypatch.setattr(scale, "SPLIT", (4, 4, 4))
    monkeypatch.setitem(scale.RUN, "grid_step", 0.5)
    real = report.atomic_write
    rows = [scale.one_run("tiny", K, str(tmp_path / f"k{K}")) for K in (1, 2)]
    assert checkpoint.atomic_write is real and report.atomic_write is real  # put back
    for r in rows:
        folder = tmp_path / f"k{r['clients']}"
        parts = sorted(os.listdir(folder / "adapters"))
        assert len(parts) == 2 * r["clients"] + 2  # local + fine-tuned per client, 2 snapshots
        ckpt_writes = 1 + 2 * scale.RUN["rounds"]  # start + FedIT and FedSA-LoRA rounds
        outputs = [n for n in os.listdir(folder) if n.startswith(("results", "lambda", "communication"))]
        assert r["files_written"] == ckpt_writes + len(parts) + len(outputs)
        final = sum(os.path.getsize(folder / "adapters" / n) for n in parts) + os.path.getsize(folder / "checkpoint.pt")
        assert (
            final
            < r["bytes_written"]
            <= final + ckpt_writes * r["checkpoint_max_bytes"] + sum(os.path.getsize(folder / n) for n in outputs)
        )
        assert r["checkpoint_max_bytes"] >= os.path.getsize(folder / "checkpoint.pt") and r["peak_rss_mb"] > 0
    table = scale.ratios_table(rows)
    assert "| tiny | 1 |" in table and "(1.00x)" in table and table.count("\n") == 3
    with pytest.raises(SystemExit):
        scale.main(["--clients", "0"])
