"""evaluation.py's Potara and grid stages: the statistics' samples, potara_step (the default, and "paper" reading the
Fisher-merging statistics), the grid's val loss and the loss barrier. Checked against potara.personalize and plain
forward passes of the merged model."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import ClientSplits
from fed import derive_seed
from lora import add_lora, load_lora_state_dict, lora_state_dict
from potara import gradient_stats, merge_adapters, personalize
from potara_harness.config import SALT_LABELS, ExperimentConfig
from potara_harness.evaluation import Evaluator, evaluate_client, fisher_merge, grid_search, potara_step, stat_batches
from potara_harness.report import METHODS


def micro_run(**cfg) -> tuple[Evaluator, dict, dict, ClientSplits]:
    """A LoRA MLP, one client (24 train / 20 val / 12 test), two trained-looking adapters G and L."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    add_lora(model, ["0"], r=2, alpha=4, trainable=["2"])
    init = lora_state_dict(model)
    g = torch.Generator().manual_seed(1)
    G, L = ({k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in init.items()} for _ in range(2))
    x, y = torch.randn(56, 6, generator=g), torch.randint(0, 3, (56,), generator=g)
    s = ClientSplits("c0", x[:24], y[:24], x[24:44], y[24:44], x[44:], y[44:])
    return Evaluator(model, init, ExperimentConfig(**cfg)), G, L, s


def test_stat_batches_read_each_sample_once():
    run, _, _, s = micro_run(fisher_samples=100)  # more than the 20 val samples
    ((x, y),) = stat_batches(run, 0, s)
    assert len(y) == 20 and len(torch.unique(x, dim=0)) == 20
    assert sorted(y.tolist()) == sorted(s.val_targets.tolist())
    run, _, _, s = micro_run(fisher_samples=8, fisher_split="train")
    ((x, y),) = stat_batches(run, 0, s)
    assert len(y) == 8 and all(any(torch.equal(r, t) for t in s.train_inputs) for r in x)


def test_potara_step_is_personalize_and_paper_reads_the_fisher_statistics():
    run, G, L, s = micro_run()
    merged, info = potara_step(run, 0, s, G, L)
    _, ref = personalize(run.model, G, L, held_out=[(s.val_inputs, s.val_targets)])
    assert info["lam"] == pytest.approx(ref["lam"]) and info["estimator"] == "verified"
    assert all(torch.equal(merged[k], merge_adapters(G, L, info["lam"])[k]) for k in G)
    run, G, L, s = micro_run(estimator="paper")
    stats = gradient_stats(run.model, G, L, stat_batches(run, 0, s), seed=derive_seed(0, 0, SALT_LABELS))
    _, from_stats = potara_step(run, 0, s, G, L, stats)
    _, direct = potara_step(
        run, 0, s, G, L
    )  # no statistics given: personalize(estimator=PaperFisher(...)) computes them
    assert from_stats["lam"] == pytest.approx(direct["lam"]) and {"a", "b", "c"} <= set(from_stats)
    assert from_stats["a"] == pytest.approx(direct["a"])


def test_grid_search_val_loss_and_barrier_against_plain_forwards():
    run, G, L, s = micro_run(grid_step=0.25)
    out = grid_search(run, s, G, L)
    curves = out["curves"]
    assert curves["lam"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for lam, loss, val in zip(curves["lam"], curves["val_loss"], curves["val"]):
        load_lora_state_dict(run.model, merge_adapters(G, L, lam))
        with torch.no_grad():
            logits = run.model(s.val_inputs)
        assert loss == pytest.approx(float(F.cross_entropy(logits, s.val_targets)), rel=1e-5)
        assert val == pytest.approx(float((logits.argmax(-1) == s.val_targets).float().mean()))
    f = curves["val_loss"]
    chord = [(1 - lam) * f[0] + lam * f[-1] for lam in curves["lam"]]
    assert out["barrier"] == pytest.approx(max(v - c for v, c in zip(f, chord)))
    assert out["barrier"] >= 0  # the ends themselves are on the chord


def test_evaluate_client_returns_its_record_and_the_adapter_it_scored():
    """evaluate_client writes into nothing: every accuracy is a plain forward of the adapter it names, and the
    Potara adapter it hands back is the A/B merge at its lam (what a device keeps), merged once."""
    ev, G, L, s = micro_run(grid_step=0.25)
    F_ = {k: v + 0.1 for k, v in L.items()}
    e = evaluate_client(ev, 0, s, G, L, F_)
    assert set(e.acc) == set(METHODS) - {"fedsa"}
    assert all(torch.equal(v, ev.init[k]) for k, v in lora_state_dict(ev.model).items())  # left at phi_0

    def plain(adapter):
        load_lora_state_dict(ev.model, adapter)
        with torch.no_grad():
            return int((ev.model(s.test_inputs).argmax(-1) == s.test_targets).sum()) / len(s.test_targets)

    lam = e.record["potara"]["lam"]
    expected = merge_adapters(G, L, lam)
    assert all(torch.equal(e.potara_adapter[k], expected[k]) for k in G)
    assert e.acc["local"] == plain(L) and e.acc["fedit"] == plain(G) and e.acc["fedit_ft"] == plain(F_)
    assert e.acc["potara_ab"] == plain(expected) and e.acc["uniform"] == plain(merge_adapters(G, L, 0.5))
    assert e.record["lam_potara"] == lam and e.record["abs_lam_diff"] == abs(lam - e.record["lam_grid_val"])


# ----------------------------------------------------------------------------- the faster grid
def old_grid_curves(ev, s, G, L):
    """The grid as it was scored before (two unmerged forwards): per lam the merged adapter loaded, accuracy on val
    and on test through the rank-r branches (no merged weights), and the val loss by potara.segment_loss: three
    forwards."""
    from potara import segment_loss
    from potara_harness.evaluation import accuracy, lam_grid

    val, test, loss = [], [], []
    batches = [(s.val_inputs[k : k + 64], s.val_targets[k : k + 64]) for k in range(0, len(s.val_targets), 64)]
    for lam in lam_grid(ev.cfg.grid_step):
        merged = merge_adapters(G, L, lam, ev.cfg.grid_space)
        load_lora_state_dict(ev.model, merged, allow_rank_change=True)
        ev.model.eval()
        val.append(accuracy(ev.model, s.val_inputs, s.val_targets))
        test.append(accuracy(ev.model, s.test_inputs, s.test_targets))
        loss.append(segment_loss(ev.model, G, L, lam, batches, ev.likelihood, ev.cfg.grid_space, slope=False)[0])
        load_lora_state_dict(ev.model, ev.init, allow_rank_change=True)
    return val, test, loss


@pytest.mark.parametrize("space", ["ab", "delta"])
def test_faster_grid_equals_the_three_forward_grid(space):
    """One val forward per lam on merged weights gives the accuracies exactly and the loss to 1e-6 of the old
    grid (independent loop above), on 300 val samples (two batches of the scorer, five of segment_loss); the
    backbone's weights are bitwise what they were (merged_weights restores a copy, never W0 + D - D)."""
    ev, G, L, s = micro_run(grid_step=0.05, grid_space=space)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(300, 6, generator=g), torch.randint(0, 3, (300,), generator=g)
    s = ClientSplits("c0", s.train_inputs, s.train_targets, x, y, x[:120], y[:120])
    before = {k: v.clone() for k, v in ev.model.state_dict().items()}
    val, test, loss = old_grid_curves(ev, s, G, L)
    got = grid_search(ev, s, G, L)["curves"]
    assert got["val"] == val and got["test"] == test
    assert max(abs(a - b) for a, b in zip(got["val_loss"], loss)) < 1e-6
    assert len(set(val)) > 3  # the curve moves: the comparison is not between constants
    after = ev.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fisher_merge_hand_computed():
    G, L = {"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([3.0, 3.0])}
    out = fisher_merge(G, L, {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([3.0, 0.0])}, eps=1e-12)
    torch.testing.assert_close(out["w"], torch.tensor([(1 + 9) / 4, 2.0]))
