"""Specification of training.py: train_adapter moves only the adapter, counts the examples it saw and
refuses a pointless call; shuffled_batches covers every example once per epoch."""

import pytest
import torch
import torch.nn.functional as F

from potara.lora import lora_state_dict
from potara.training import classification_loss, shuffled_batches, train_adapter


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
