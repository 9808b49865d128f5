"""flower_bench.py: the per-round breakdown it prints, and its one-line errors. (The run itself is the
loopback run of test_flower.py; the benchmark's numbers are in the README, from one run.)"""
import pytest

pytest.importorskip("flwr")

import flower_bench  # noqa: E402


def test_breakdown_charges_the_rest_of_a_round_to_messaging():
    """Per round: the slowest client's start-up, loading and training (clients run in parallel), and what is
    left of the server's round time; means over rounds. Hand-computed."""
    history = [{"seconds": 10.0, "client_seconds": {"client0": {"startup": 5.0, "load": 1.0, "train": 0.5},
                                                    "client1": {"startup": 6.0, "load": 1.0, "train": 1.0}}},
               {"seconds": 6.0, "client_seconds": {"client1": {"startup": 3.0, "load": 0.5, "train": 0.5}}}]
    got = flower_bench.breakdown({"fedit_history": history})
    want = {"round": 8.0, "startup": 4.5, "load": 0.75, "train": 0.75, "messaging": (2.0 + 2.0) / 2}
    assert got == pytest.approx(want)


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        flower_bench.main(["--backbone", str(tmp_path / "missing.pt")])
    assert e.value.code == 2 and "no such file" in capsys.readouterr().err
    (tmp_path / "b.pt").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        flower_bench.main(["--backbone", str(tmp_path / "b.pt"), "--rounds", "0"])
    assert e.value.code == 2 and "rounds must be > 0" in capsys.readouterr().err
