"""bench.py (the command line) and benchmarks.py's helpers, and the fast paths they measure computing the same
function as the slow ones. No timed assertions: timings are only reported, never tested."""

import json

import pytest
import torch
import torch.nn as nn

import potara
from lora import LoRALinear, LoRAPackedQKV
from potara_studies import bench, benchmarks


def test_rows_from_pairs_ratios_per_round():
    times = {"base": [1.0, 2.0, 4.0], "x": [3.0, 2.0, 4.0]}  # per-round ratios 3, 1, 1
    rows = {r["name"]: r for r in benchmarks.rows_from("s", times, "base")}
    assert rows["x"]["ratio"] == 1.0 and rows["x"]["ratio_min"] == 1.0 and rows["x"]["ratio_max"] == 3.0
    assert rows["x"]["median_s"] == 3.0 and rows["base"]["ratio"] == 1.0


def test_measure_runs_every_variant_reps_times_after_warmup():
    calls = {"a": 0, "b": 0}
    variants = {k: (lambda k=k: calls.__setitem__(k, calls[k] + 1)) for k in calls}
    times = benchmarks.measure(variants, benchmarks.BenchConfig(reps=4, warmup=2, min_sample_s=0), torch.device("cpu"))
    assert calls == {"a": 6, "b": 6} and all(len(t) == 4 for t in times.values())


def test_lora_linear_equals_the_formula_for_any_leading_shape():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 5), r=2, alpha=4)
    nn.init.normal_(layer.lora_B)
    for shape in [(6,), (3, 6), (2, 3, 6), (0, 6)]:
        x = torch.randn(*shape)
        expected = layer.base(x) + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
        assert torch.allclose(layer(x), expected, atol=1e-6)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("parts", ["qv", "k"])
def test_packed_qkv_activation_path_equals_weight_path_and_merge(batch_first, parts):
    torch.manual_seed(0)
    m = LoRAPackedQKV(nn.MultiheadAttention(16, 4, batch_first=batch_first), r=2, alpha=4, parts=parts)
    for n, p in m.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p)
    params = [p for p in m.parameters() if p.requires_grad]
    for shape in [(3, 5, 16), (5, 16)]:
        x = torch.randn(*shape, requires_grad=True)
        fast = m(x, x, x, need_weights=False)[0]  # activation space (the ViT call)
        slow = m(x, x, x, need_weights=True)[0]  # weight space through nn.MultiheadAttention itself
        assert torch.allclose(fast, slow, atol=1e-5)
        g_fast = torch.autograd.grad(fast.pow(2).sum(), [x, *params])
        g_slow = torch.autograd.grad(slow.pow(2).sum(), [x, *params])
        for a, b in zip(g_fast, g_slow):
            assert float((a - b).abs().max() / b.abs().max()) < 1e-4
        with torch.no_grad():
            m.merge()
            merged = m(x, x, x, need_weights=False)[0]
            m.unmerge()
        assert torch.allclose(fast, merged, atol=1e-5)


def test_naive_fisher_loop_matches_diag_fisher():
    torch.manual_seed(0)
    vit = benchmarks.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16)
    model = benchmarks.lora_vit(vit, rank=2, alpha=4, num_classes=3)
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    loop, func = benchmarks.naive_fisher(model, batches, 5), potara.diag_fisher(model, batches, n_samples=5)
    assert set(loop) == set(func)
    for k in func:
        assert torch.allclose(func[k], loop[k], rtol=1e-4, atol=1e-9), k


def test_pipeline_section_reads_stage_timings(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(
        json.dumps({"timing_s": {"fedit": 30.0, "local": 10.0}, "config": {"backbone": {"pretrain_seconds": 60.0}}})
    )
    out = tmp_path / "bench.json"
    report = bench.main(["--only", "pipeline", "--pipeline-results", str(results), "--out", str(out)])
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["staged total (run_experiment)"]["value"] == 40.0 and rows["stage: fedit"]["share"] == 0.75
    assert rows["backbone pre-training (once; cached and reused by later runs)"]["value"] == 60.0
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(report["rows"]))


def test_cli_rejects_unknown_sections(tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--only", "lora,nope", "--out", str(tmp_path / "x.json")])
