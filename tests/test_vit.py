"""vit.py: backbone files load whatever their form, the tiny backbone's cache is reused, rebuilt when damaged
and skipped when unwritable, and the model build is LoRA on q and v with a zero head."""

import os
from urllib.error import URLError

import numpy as np
import pytest
import torch
from conftest import MICRO_VIT
from torchvision.models import VisionTransformer

from data import load_cifar100, write_synthetic_cifar100
from lora import lora_state_dict
from potara_harness import config, vit


def micro_backbone(seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(**MICRO_VIT, num_classes=100)


def test_backbone_file_round_trip(tmp_path, same):
    """--backbone loads a potara backbone file and a plain state_dict alike; misfits fail in one line."""
    backbone = micro_backbone()
    path = tmp_path / "micro.pt"
    torch.save(
        {
            "format": "potara-backbone-v1",
            "vit": {**MICRO_VIT, "num_classes": 100},
            "state_dict": backbone.state_dict(),
            "info": {},
        },
        path,
    )
    loaded = vit.load_backbone_file(str(path), None)
    plain = tmp_path / "plain.pt"
    torch.save(backbone.state_dict(), plain)
    again = vit.load_backbone_file(str(plain), {**MICRO_VIT, "num_classes": 100})
    body = lambda m: {k: v for k, v in m.state_dict().items() if not k.startswith("heads.")}
    assert same(body(loaded), body(backbone)) and same(body(again), body(backbone))
    bad = tmp_path / "bad.pt"
    torch.save({"encoder.nope": torch.zeros(1)}, bad)
    with pytest.raises(vit.BackboneError, match="does not fit a ViT of its architecture"):
        vit.load_backbone_file(str(bad), {**MICRO_VIT, "num_classes": 100})
    torch.save(torch.zeros(3), bad)
    with pytest.raises(vit.BackboneError, match="neither a potara backbone file nor a state_dict"):
        vit.load_backbone_file(str(bad), None)
    bad.write_bytes(b"garbage")
    with pytest.raises(vit.BackboneError, match="not a readable, safe torch file"):
        vit.load_backbone_file(str(bad), None)


def test_imagenet_weights_offline_is_one_line(monkeypatch):
    def offline(*a, **k):
        raise URLError("no network")

    monkeypatch.setattr(vit.torchvision.models, "vit_b_16", offline)
    with pytest.raises(vit.BackboneError, match=r"ImageNet weights of vit_b_16 \(offline\?.*--backbone PATH") as e:
        vit.imagenet_vit_b_16()
    assert "\n" not in str(e.value)


def test_build_model_is_a_zero_head_and_lora_on_q_and_v():
    model = vit.build_model(micro_backbone(), config.VIT_PRESETS["tiny"], rank=2, lora_alpha=4, seed=3)
    adapter = lora_state_dict(model)
    layers = MICRO_VIT["num_layers"]
    assert sorted(adapter) == sorted(
        [
            f"vit.encoder.layers.encoder_layer_{i}.self_attention.lora_{f}_{p}"
            for i in range(layers)
            for f in "AB"
            for p in "qv"
        ]
        + ["vit.heads.head.weight", "vit.heads.head.bias"]
    )
    assert not model.vit.heads.head.weight.any() and not model.vit.heads.head.bias.any()
    again = vit.build_model(micro_backbone(), config.VIT_PRESETS["tiny"], rank=2, lora_alpha=4, seed=3)
    assert all(torch.equal(v, lora_state_dict(again)[k]) for k, v in adapter.items())  # phi_0 from the seed
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(model(x), torch.zeros(3, 100))  # zero head: the adapter starts as "no opinion"


def test_tiny_backbone_cache_reused_rebuilt_and_skipped(tmp_path, capsys, micro_preset, same):
    """A second call reuses the cache file; a damaged one is pre-trained again to the same weights; an
    unwritable cache folder only skips caching."""
    write_synthetic_cifar100(str(tmp_path / "syn"), 12, 2)
    data = load_cifar100(str(tmp_path / "syn"))
    public = np.arange(0, len(data.labels), 2)
    call = lambda: vit.tiny_backbone(
        config.VIT_PRESETS["tiny"],
        data,
        public,
        {"data": "synthetic"},
        str(tmp_path / "d"),
        3,
        torch.device("cpu"),
        False,
    )
    first, info = call()
    cached = tmp_path / "d" / "backbones" / os.listdir(tmp_path / "d" / "backbones")[0]
    assert info["backbone"] == str(cached) and "pre-trained" in capsys.readouterr().out
    second, _ = call()
    assert "reusing" in capsys.readouterr().out and same(second.state_dict(), first.state_dict())
    cached.write_bytes(cached.read_bytes()[:200])
    third, _ = call()
    assert "is unusable (" in capsys.readouterr().out and same(third.state_dict(), first.state_dict())
    for p in (tmp_path / "d" / "backbones").iterdir():
        p.unlink()
    (tmp_path / "d" / "backbones").rmdir()
    (tmp_path / "d" / "backbones").write_text("a file where the cache folder should be")
    fourth, info = call()
    assert "NOT cached" in capsys.readouterr().out and info["backbone"] == "(not cached)"
    assert same(fourth.state_dict(), first.state_dict())


# ----------------------------------------------------------------------------- hostile backbone files
def potara_file(path, arch=None, state=None):
    backbone = micro_backbone()
    torch.save(
        {
            "format": "potara-backbone-v1",
            "vit": {**MICRO_VIT, "num_classes": 100} if arch is None else arch,
            "state_dict": backbone.state_dict() if state is None else state,
            "info": {},
        },
        path,
    )
    return backbone.state_dict()


def edited(key, make):
    state = micro_backbone().state_dict()
    state[key] = make(state[key])
    return state


W = "encoder.layers.encoder_layer_0.mlp.0.weight"


@pytest.mark.parametrize(
    "arch, state, why",
    [
        (None, edited(W, lambda w: w.index_fill(0, torch.tensor([3]), float("nan"))), f"{W} holds NaN or Inf"),
        (None, edited(W, lambda w: w.to(torch.complex64)), "dtype torch.complex64, expected torch.float32"),
        (None, edited(W, lambda w: w > 0), "dtype torch.bool, expected torch.float32"),
        (None, edited(W, lambda w: w.t().contiguous()), "has shape (16, 32), the model expects (32, 16)"),
        (None, edited(W, lambda w: torch.zeros(1).expand(w.shape)), "expanded view"),
        ({**MICRO_VIT, "num_classes": 100, "rm_rf": 1}, None, "unknown keys ['rm_rf']"),
        ({**MICRO_VIT, "hidden_dim": 400000}, None, "hidden_dim must be an integer in [1, 4096], got 400000"),
        ({**MICRO_VIT, "num_layers": 60, "hidden_dim": 4096, "mlp_dim": 16384}, None, "parameters, more than 1e+09"),
        ({**MICRO_VIT, "patch_size": 7}, None, "patch_size | image_size"),
        ({**MICRO_VIT, "num_heads": True}, None, "num_heads must be an integer"),
        ("a string", None, "the architecture is a str, not a dict"),
        ([1, 2], None, "the architecture is a list, not a dict"),
        (None, "a string", "the weights are not a dict of named tensors"),
        (None, [torch.zeros(2)], "the weights are not a dict of named tensors"),
    ],
)
def test_malformed_backbone_files_are_refused_before_building(tmp_path, monkeypatch, arch, state, why):
    """Each is one line naming the file and the problem; no VisionTransformer is built (so no terabyte
    allocation from a crafted architecture) before the file passed every check."""
    built = []
    real = vit.VisionTransformer
    monkeypatch.setattr(vit, "VisionTransformer", lambda **kw: built.append(torch.get_default_device()) or real(**kw))
    path = tmp_path / "b.pt"
    potara_file(path, arch, state)
    with pytest.raises(vit.BackboneError) as e:
        vit.load_backbone_file(str(path), None)
    msg = str(e.value)
    assert why in msg and msg.startswith(f"--backbone {path}") and "\n" not in msg, msg
    assert all(d.type == "meta" for d in built)  # at most the meta-device ViT that gives the expected shapes


def test_a_nan_cached_tiny_backbone_is_pretrained_again(tmp_path, capsys, micro_preset):
    root = tmp_path / "data"
    write_synthetic_cifar100(str(root), 12, 2)
    d = load_cifar100(str(root), download=False)
    public = np.arange(1000)
    p = config.VIT_PRESETS["tiny"]
    first, _ = vit.tiny_backbone(p, d, public, {"data": "synthetic"}, str(tmp_path), 2, torch.device("cpu"), False)
    (cached,) = (tmp_path / "backbones").iterdir()
    obj = torch.load(cached, weights_only=True)
    obj["state_dict"][W][0, 0] = float("nan")
    torch.save(obj, cached)
    capsys.readouterr()
    again, _ = vit.tiny_backbone(p, d, public, {"data": "synthetic"}, str(tmp_path), 2, torch.device("cpu"), False)
    out = capsys.readouterr().out
    assert "is unusable (BackboneError:" in out and "holds NaN or Inf" in out and "pre-training it again" in out
    assert torch.isfinite(again.state_dict()[W]).all() and torch.equal(again.state_dict()[W], first.state_dict()[W])


def test_fuzz_backbone_files_give_one_clear_error_or_a_sound_backbone(tmp_path, bounded, corrupted_torch_file):
    """300 seeded corruptions of a micro backbone file (truncations, bit flips, untrustworthy tensors, crafted
    huge / zero strides, junk architecture values): each ends in a one-line BackboneError or a backbone whose
    every weight is finite, with no hang or huge allocation (RLIMIT_AS) and nothing written."""
    import random

    good = tmp_path / "good.pt"
    potara_file(good)
    template = good.read_bytes()
    plain = torch.load(good, weights_only=True)
    rng, accepted = random.Random(0), 0
    for case in range(300):
        path = tmp_path / "backbone.pt"
        if rng.random() < 0.2:  # an architecture value replaced by junk
            key = rng.choice(sorted(plain["vit"]) + ["extra"])
            junk = rng.choice([400000, 2**62, -1, 0, 3.5, "16", None, True, [16], {"a": 1}])
            torch.save({**plain, "vit": {**plain["vit"], key: junk}}, path)
        else:
            path.write_bytes(corrupted_torch_file(rng, template, plain, 1700))
        before = sorted(os.listdir(tmp_path))
        with bounded():
            try:
                backbone = vit.load_backbone_file(str(path), None)
            except vit.BackboneError as e:
                assert str(e).startswith(f"--backbone {path}") and "\n" not in str(e), (case, str(e))
            else:  # a flip in a value or in zip padding: still a sound backbone
                accepted += 1
                assert all(torch.isfinite(t).all() for t in backbone.state_dict().values())
        assert sorted(os.listdir(tmp_path)) == before, case
    print(f"{accepted} of 300 corrupted backbone files were still sound")
    assert accepted < 100, (
        accepted
    )  # as test_fuzz.py: flips inside weight values (or the dropped head, info) stay sound
