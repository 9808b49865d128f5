"""Specification of fed.py: local training (train_adapter moves only the adapter; shuffled_batches covers
every example once per epoch), FedAvg over adapter tensors against a hand computation, the seeded sampling of clients,
run_fedit and its pieces (local_update, server_round: the loop by hand, bad replies rejected with their reasons),
resume bitwise; fed.py copied alone."""

import contextlib
import io
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import run_alone

from fed import (
    Client,
    ClientReply,
    FedConfig,
    FedState,
    classification_loss,
    derive_seed,
    fedavg,
    local_update,
    run_fedit,
    sample_clients,
    server_round,
    shuffled_batches,
    state_bytes,
    train_adapter,
)
from lora import add_lora, load_lora_state_dict, lora_factor, lora_state_dict


# ----------------------------------------------------------------------------- local training
def test_train_adapter_touches_only_adapter_and_counts_examples(mlp_problem):
    bias_free_model, client = mlp_problem
    model, c = bias_free_model(), client("c0", 0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = lora_state_dict(model)
    result = train_adapter(
        model, shuffled_batches(c.train_inputs, c.train_targets, 10, seed=0), steps=7, lr=1e-2, progress=False
    )
    assert result.num_examples == 2 * (10 + 10 + 4) + 10  # 24 examples: an epoch is 10, 10, 4
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert any(not torch.equal(result.state[k], before[k]) for k in before)
    with pytest.raises(ValueError, match="steps"):
        train_adapter(model, [(c.train_inputs, c.train_targets)], steps=0, lr=1e-2)


def test_train_adapter_mean_loss_is_the_mean_of_the_losses_of_its_steps(mlp_problem):
    """The reported mean loss against a hand replay: the same AdamW steps, losses recorded one by one."""
    bias_free_model, client = mlp_problem
    c = client("c0", 0)
    batches = [(c.train_inputs[i : i + 8], c.train_targets[i : i + 8]) for i in (0, 8, 16)]
    model = bias_free_model()
    result = train_adapter(model, batches, steps=5, lr=1e-2, progress=False)
    replay = bias_free_model()
    params = [p for p in replay.parameters() if p.requires_grad]
    opt, losses = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0), []
    for step in range(5):  # the batches list re-iterated when exhausted: 0, 8, 16, 0, 8
        x, y = batches[step % 3]
        loss = F.cross_entropy(replay(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert result.mean_loss == pytest.approx(sum(losses) / 5, rel=1e-6)
    assert all(torch.equal(result.state[k], v) for k, v in lora_state_dict(replay).items())
    assert classification_loss(replay, *batches[0]).item() == pytest.approx(
        F.cross_entropy(replay(batches[0][0]), batches[0][1]).item()
    )


def test_shuffled_batches_cover_each_epoch():
    x = torch.arange(10).float().unsqueeze(1)
    it = shuffled_batches(x, torch.arange(10), 4, seed=3)
    epoch = torch.cat([next(it)[1] for _ in range(3)])  # 4 + 4 + 2
    assert sorted(epoch.tolist()) == list(range(10))


# ----------------------------------------------------------------------------- sampling
def test_sample_clients_is_seeded_sorted_and_drops_a_subset():
    selected, dropped = sample_clients(seed=4, round=2, num_clients=10, clients_per_round=6, drop_prob=0.5)
    g = torch.Generator().manual_seed(derive_seed(4, 2))  # the documented draw, by hand
    assert selected == sorted(torch.randperm(10, generator=g)[:6].tolist())
    u = torch.rand(6, generator=g)
    assert dropped == [k for k, x in zip(selected, u.tolist()) if x < 0.5]
    assert sample_clients(4, 2, 10, 6, 0.5) == (selected, dropped)  # any process draws the same S_t
    assert sample_clients(4, 3, 10, 6, 0.0)[1] == []
    with pytest.raises(ValueError, match="clients_per_round"):
        sample_clients(0, 0, 3, 4)
    with pytest.raises(ValueError, match="drop_prob"):
        sample_clients(0, 0, 3, 2, drop_prob=1.0)


# ----------------------------------------------------------------------------- FedAvg, FedIT and its pieces
def small_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    add_lora(model, ["0", "2"], r=2, alpha=4, trainable=["4"])
    return model


def make_clients(num=3, n=48, seed=0):
    """Clients share a labelling rule (a fixed linear teacher) with client-specific input shifts."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(6, 4, generator=g)
    clients = []
    for k in range(num):
        x = torch.randn(n + 8 * k, 6, generator=g) + 0.3 * k
        clients.append(Client(f"c{k}", x, (x @ teacher).argmax(1)))
    return clients


def total_loss(model, clients):
    with torch.no_grad():
        return sum(F.cross_entropy(model(c.inputs), c.targets, reduction="sum").item() for c in clients) / sum(
            c.num_examples for c in clients
        )


def test_fedavg_hand_computed_unequal_sizes():
    s1 = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    s2 = {"w": torch.tensor([5.0, -2.0]), "b": torch.tensor([[4.0]])}
    s3 = {"w": torch.tensor([0.0, 0.0]), "b": torch.tensor([[8.0]])}
    out = fedavg([s1, s2, s3], [1, 3, 4])  # weights 1/8, 3/8, 4/8
    assert torch.equal(out["w"], torch.tensor([(1 + 15 + 0) / 8, (2 - 6 + 0) / 8]))
    assert torch.equal(out["b"], torch.tensor([[(0 + 12 + 32) / 8]]))
    assert out["w"].dtype == torch.float32
    half = fedavg(
        [{"w": torch.tensor([1.0], dtype=torch.float16)}, {"w": torch.tensor([2.0], dtype=torch.float16)}], [1, 1]
    )
    assert half["w"].dtype == torch.float16 and half["w"].item() == 1.5


def test_fedavg_errors():
    s = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="no client states"):
        fedavg([], [])
    with pytest.raises(ValueError, match="2 states but 1"):
        fedavg([s, s], [1])
    with pytest.raises(ValueError, match="positive, finite total"):
        fedavg([s, s], [0, 0])
    with pytest.raises(ValueError, match="missing"):
        fedavg([s, {"v": torch.zeros(2)}], [1, 1])
    with pytest.raises(ValueError, match="shape"):
        fedavg([s, {"w": torch.zeros(3)}], [1, 1])


def test_fedavg_never_returns_silent_nan_or_zeros():
    ok, nan = {"w": torch.ones(2)}, {"w": torch.tensor([1.0, float("nan")])}
    for states in ([nan, ok], [ok, nan]):  # client 0 is checked too, not only used as the reference
        with pytest.raises(ValueError, match="NaN or Inf"):
            fedavg(states, [1, 1])
    for counts in ([float("nan"), 1], [float("inf"), 1], [True, 1], [-1, 3], ["2", 1], [None, 1]):
        with pytest.raises(ValueError, match="example counts must be finite numbers >= 0"):
            fedavg([ok, ok], counts)
    for counts in ([1e308, 1e308], [10**400, 1]):  # the total overflows: refused, not averaged to zeros
        with pytest.raises(ValueError, match="positive, finite total"):
            fedavg([ok, ok], counts)
    out = fedavg([ok, {"w": torch.full((2,), 3.0)}], [1.5, 0.5])  # real-valued weights are fine
    assert torch.equal(out["w"], torch.full((2,), 1.5))


def fedit(model, clients, progress=False, share=None, resume=None, on_round=None, **settings):
    """run_fedit with its settings given as keywords (fed.FedConfig's fields)."""
    return run_fedit(
        model, clients, FedConfig(**settings), progress=progress, share=share, resume=resume, on_round=on_round
    )


def test_fedit_reduces_loss_and_counts_bytes():
    model, clients = small_model(), make_clients()
    init = lora_state_dict(model)
    loss0 = total_loss(model, clients)
    state = fedit(
        model, clients, rounds=6, local_steps=5, clients_per_round=2, lr=2e-2, seed=0, batch_size=16, progress=False
    )
    assert all(torch.equal(v, init[k]) for k, v in lora_state_dict(model).items())  # model left at phi_0
    load_lora_state_dict(model, state.global_state)
    assert total_loss(model, clients) < 0.8 * loss0
    adapter_bytes = sum(t.numel() * 4 for t in init.values())  # float32
    assert len(state.history) == 6
    for h in state.history:
        assert len(h["clients"]) == 2 and len(set(h["clients"])) == 2
        assert h["bytes_down"] == h["bytes_up"] == 2 * adapter_bytes
    assert state_bytes(state.global_state) == adapter_bytes


def test_fedit_resume_is_bitwise():
    clients = make_clients()
    full = fedit(small_model(), clients, rounds=3, local_steps=3, clients_per_round=2, lr=1e-2, seed=7, progress=False)
    saved = []
    model = small_model()
    fedit(
        model,
        clients,
        rounds=1,
        local_steps=3,
        clients_per_round=2,
        lr=1e-2,
        seed=7,
        progress=False,
        on_round=lambda s: saved.append(
            FedState(s.round, dict(s.global_state), {k: dict(v) for k, v in s.private_states.items()}, list(s.history))
        ),
    )
    resumed = fedit(
        model, clients, rounds=3, local_steps=3, clients_per_round=2, lr=1e-2, seed=7, progress=False, resume=saved[-1]
    )
    assert [h["clients"] for h in resumed.history] == [h["clients"] for h in full.history]
    assert all(torch.equal(resumed.global_state[k], full.global_state[k]) for k in full.global_state)


def test_fedit_uses_the_one_backbone_it_is_given(monkeypatch):
    """Clients are switched by loading tensors: no model is built or copied (deepcopy restores a module
    through __setstate__, a new one runs __init__), and no backbone tensor is reallocated or changed."""
    model, clients = small_model(), make_clients()
    frozen = {n: (p, p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters() if not p.requires_grad}
    for hook in ("__init__", "__setstate__"):
        monkeypatch.setattr(nn.Module, hook, lambda *a, **k: pytest.fail("run_fedit built or copied a module"))
    state = fedit(model, clients, rounds=2, local_steps=2, clients_per_round=3, lr=1e-2, seed=0, progress=False)
    monkeypatch.undo()
    assert len(state.history) == 2 and state.history[0]["mean_train_loss"] is not None
    now = dict(model.named_parameters())
    for n, (p, ptr, value) in frozen.items():
        assert now[n] is p and p.data_ptr() == ptr and torch.equal(p, value)


def test_fedsa_shares_only_A():
    model, clients = small_model(), make_clients()
    init = lora_state_dict(model)
    state = fedit(
        model,
        clients,
        rounds=2,
        local_steps=2,
        clients_per_round=3,
        lr=1e-2,
        seed=0,
        share=lambda k: lora_factor(k) == "A",
        progress=False,
    )
    assert set(state.global_state) == {k for k in init if lora_factor(k) == "A"}
    a_bytes = sum(init[k].numel() * 4 for k in state.global_state)
    assert all(h["bytes_up"] == 3 * a_bytes for h in state.history)
    private = state.private_states
    assert set(private) == {"c0", "c1", "c2"}
    assert not torch.equal(private["c0"]["4.weight"], private["c1"]["4.weight"])  # heads stay personal


def test_run_fedit_errors():
    model, clients = small_model(), make_clients()
    with pytest.raises(ValueError, match="clients_per_round"):
        run_fedit(model, clients, FedConfig(1, 1, 1e-2, clients_per_round=4))
    with pytest.raises(ValueError, match="no clients"):
        run_fedit(model, [], FedConfig(1, 1, 1e-2))
    with pytest.raises(ValueError, match="local_steps"):
        run_fedit(model, clients, FedConfig(1, 0, 1e-2))
    with pytest.raises(ValueError, match="selects no adapter"):
        run_fedit(model, clients, FedConfig(1, 1, 1e-2), share=lambda k: False)


def test_bad_updates_are_rejected_and_the_rest_aggregated(caplog):
    clients = make_clients()
    poisoned = Client("poisoned", clients[0].inputs.clone(), clients[0].targets)
    poisoned.inputs[0, 0] = float("nan")  # its training produces a NaN adapter
    model = small_model()
    with caplog.at_level("WARNING", logger="fed"):
        state = fedit(
            model,
            [clients[1], poisoned, clients[2]],
            rounds=1,
            local_steps=2,
            clients_per_round=3,
            lr=1e-2,
            seed=0,
            progress=False,
        )
    assert state.history[0]["rejected"][0]["client"] == "poisoned"
    assert "NaN" in state.history[0]["rejected"][0]["reason"] and "poisoned" in caplog.text
    assert all(torch.isfinite(v).all() for v in state.global_state.values())
    # the poisoned client has no influence: another poison at its place gives the same aggregate
    other = Client("poisoned", clients[0].inputs.clone(), clients[0].targets)
    other.inputs[:, 1] = float("inf")
    state2 = fedit(
        small_model(),
        [clients[1], other, clients[2]],
        rounds=1,
        local_steps=2,
        clients_per_round=3,
        lr=1e-2,
        seed=0,
        progress=False,
    )
    assert all(torch.equal(state.global_state[k], state2.global_state[k]) for k in state.global_state)
    honest = fedit(
        small_model(),
        [clients[1], poisoned, clients[2]],
        rounds=1,
        local_steps=2,
        clients_per_round=3,
        lr=1e-2,
        seed=0,
        progress=False,
        max_update_norm=1e-9,
    )
    assert len(honest.history[0]["rejected"]) == 3  # a tiny norm bound rejects everyone ...
    init = lora_state_dict(small_model())
    assert all(torch.equal(honest.global_state[k], init[k]) for k in init)  # ... and phi stays phi_0
    assert "norm" in honest.history[0]["rejected"][0]["reason"]
    adapter_bytes = state_bytes(init)
    assert state.history[0]["bytes_up"] == 3 * adapter_bytes  # rejected updates were still sent


def test_dropout_clients_are_recorded_and_not_counted():
    clients = make_clients(num=6)
    state = fedit(
        small_model(),
        clients,
        rounds=8,
        local_steps=1,
        clients_per_round=4,
        lr=1e-2,
        seed=1,
        progress=False,
        drop_prob=0.5,
    )
    adapter_bytes = state_bytes(lora_state_dict(small_model()))
    dropped = [len(h["dropped"]) for h in state.history]
    assert 0 < sum(dropped) < 32
    for h in state.history:
        assert set(h["dropped"]) <= set(h["clients"])
        assert h["bytes_down"] == 4 * adapter_bytes
        assert h["bytes_up"] == (4 - len(h["dropped"])) * adapter_bytes
    assert all(torch.isfinite(v).all() for v in state.global_state.values())
    with pytest.raises(ValueError, match="drop_prob"):
        run_fedit(small_model(), clients, FedConfig(1, 1, 1e-2, drop_prob=1.0))


def test_run_fedit_equals_its_pieces_run_as_separate_server_and_clients():
    """A deployment: the server holds only tensors, each client its own model copy; same bits as run_fedit."""
    clients = make_clients(num=4)
    kw = dict(local_steps=3, lr=2e-2, seed=11, batch_size=16)
    ref = fedit(small_model(), clients, rounds=3, clients_per_round=3, progress=False, drop_prob=0.3, **kw)
    client_models = [small_model() for _ in clients]
    init = lora_state_dict(small_model())
    global_state, private, names = dict(init), {c.name: {} for c in clients}, [c.name for c in clients]
    for t in range(3):
        selected, dropped = sample_clients(11, t, len(clients), 3, drop_prob=0.3)
        replies = {}
        for k in selected:
            if k not in dropped:
                replies[k], new_private = local_update(
                    client_models[k],
                    clients[k],
                    global_state,
                    private[names[k]],
                    t,
                    k,
                    FedConfig(rounds=3, **kw),
                    progress=False,
                )
                private[names[k]] = new_private
        outcome = server_round(t, global_state, selected, replies, names)
        global_state = outcome.global_state
        assert outcome.history == ref.history[t]
    assert all(torch.equal(global_state[k], ref.global_state[k]) for k in init)
    assert sum(len(h["dropped"]) for h in ref.history) > 0  # the drop-out path was exercised


def test_server_round_rejects_bad_replies_with_reasons_and_averages_the_rest(caplog):
    g = {"w": torch.zeros(3)}
    good1, good2 = ClientReply({"w": torch.ones(3)}, 1, 0.5), ClientReply({"w": torch.full((3,), 4.0)}, 3, 1.5)
    replies = {
        0: good1,
        2: good2,
        3: ClientReply({"w": torch.ones(3)}, True, 0.1),
        4: ClientReply({"w": torch.ones(3)}, 2, float("nan")),
        5: ("not", "a reply"),
        6: ClientReply({"w": torch.ones(3)}, 2.0, 0.1),
        7: ClientReply([1, 2], 2, 0.1),
        8: ClientReply({"w": torch.ones(3)}, 10**400, 0.1),
        9: good1,
    }  # 9 was never selected
    names = [f"c{k}" for k in range(10)]
    with caplog.at_level("WARNING", logger="fed"):
        out = server_round(5, g, [0, 1, 2, 3, 4, 5, 6, 7, 8], replies, names)
    reasons = {r["client"]: r["reason"] for r in out.history["rejected"]}
    assert set(reasons) == {"c3", "c4", "c5", "c6", "c7", "c8", "c9"}
    assert all("num_examples must be an int in [1, 2**53]" in reasons[c] for c in ("c3", "c6", "c8"))
    assert "loss" in reasons["c4"]
    assert "malformed" in reasons["c5"] and "dict" in reasons["c7"] and "not selected" in reasons["c9"]
    assert "c7" in caplog.text
    assert out.accepted == [0, 2]
    assert torch.equal(out.global_state["w"], torch.full((3,), (1 * 1.0 + 3 * 4.0) / 4))
    assert out.history["dropped"] == ["c1"] and out.history["clients"] == names[:9]
    assert out.history["mean_train_loss"] == 1.0 and out.history["round"] == 5
    assert out.history["bytes_down"] == 9 * 12 and out.history["bytes_up"] == 7 * 12  # 5 and 7 sent no tensors
    nothing = server_round(0, g, [0], {0: replies[4]}, names)
    assert nothing.global_state is g and nothing.accepted == [] and nothing.history["mean_train_loss"] is None


def test_run_fedit_leaves_the_callers_rng_alone_and_does_not_depend_on_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    add_lora(model, ["0"], r=2, alpha=4, dropout=0.5, trainable=["2"])  # dropout draws from the global RNG
    clients = make_clients()
    runs = []
    for caller_seed in (1, 2):
        torch.manual_seed(caller_seed)
        before = torch.get_rng_state()
        runs.append(
            fedit(model, clients, rounds=2, local_steps=2, clients_per_round=2, lr=1e-2, seed=0, progress=False)
        )
        assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(runs[0].global_state[k], runs[1].global_state[k]) for k in runs[0].global_state)


# ----------------------------------------------------------------------------- fed.py copied alone
TINY_FEDIT = """
import json, sys, torch, torch.nn as nn
import fed
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
model[0].requires_grad_(False)  # the adapter: every trainable tensor (here the head; LoRA factors with lora.py)
g = torch.Generator().manual_seed(1)
clients = []
for k in range(4):
    x = torch.randn(40, 6, generator=g)
    clients.append(fed.Client(f"c{k}", x, (x[:, k % 3] > 0).long()))
cfg = fed.FedConfig(rounds=4, local_steps=3, lr=0.05, batch_size=16, clients_per_round=3, drop_prob=0.4, seed=7)
state = fed.run_fedit(model, clients, cfg, progress=False)
torch.save(state.global_state, OUT)
print(json.dumps(state.history))
"""


def test_fed_py_alone_runs_a_tiny_fedit_equal_to_the_repositorys(tmp_path):
    """fed.py copied alone into an empty folder (torch and tqdm only) runs FedIT with sampling and drop-outs on a
    model of its own; its phi_G and round records equal, bitwise, the same run with the repository's fed.py."""
    out = run_alone(tmp_path / "alone", ["fed.py"], "OUT = 'phi_G.pt'" + TINY_FEDIT)
    assert out.returncode == 0, out.stderr[-2000:]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(TINY_FEDIT, {"OUT": str(tmp_path / "here.pt")})  # the repository's fed (tests run from the root)
    assert json.loads(out.stdout) == json.loads(printed.getvalue())
    alone, here = torch.load(tmp_path / "alone" / "phi_G.pt"), torch.load(tmp_path / "here.pt")
    assert sorted(alone) == ["3.bias", "3.weight"] and all(torch.equal(alone[k], here[k]) for k in here)
    assert sum(len(h["dropped"]) for h in json.loads(out.stdout)) > 0  # the drop-out path ran
