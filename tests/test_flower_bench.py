"""flower_bench.py: the per-round breakdown it prints, and its one-line errors. (The run itself is the
loopback run of test_flower.py; the benchmark's numbers are in the README, from one run.)"""
import pytest

pytest.importorskip("flwr")

from potara_flower import bench as flower_bench  # noqa: E402


def test_breakdown_charges_the_rest_of_a_round_to_messaging():
    """Per round: the slowest client's start-up, loading and training (clients run in parallel), and what is
    left of the server's round time; means over rounds. Hand-computed."""
    c = lambda start, imports, hand, load, train: {"flower-start": start, "imports": imports, "handover": hand,
                                                   "load": load, "train": train}
    history = [{"seconds": 10.0, "client_seconds": {"client0": c(2.0, 2.5, 0.5, 1.0, 0.5),      # 6.5
                                                    "client1": c(2.0, 3.0, 1.0, 1.0, 1.0)}},    # 8.0: slowest
               {"seconds": 6.0, "client_seconds": {"client1": c(1.0, 1.5, 0.5, 0.5, 0.5)}}]   # 4.0
    got = flower_bench.breakdown({"fedit_history": history})
    want = {"round": 8.0, "flower-start": 1.5, "imports": 2.25, "handover": 0.75, "load": 0.75, "train": 0.75,
            "messaging": (2.0 + 2.0) / 2}
    assert got == pytest.approx(want)


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        flower_bench.main(["--backbone", str(tmp_path / "missing.pt")])
    assert e.value.code == 2 and "no such file" in capsys.readouterr().err
    (tmp_path / "b.pt").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        flower_bench.main(["--backbone", str(tmp_path / "b.pt"), "--rounds", "0"])
    assert e.value.code == 2 and "rounds must be > 0" in capsys.readouterr().err
