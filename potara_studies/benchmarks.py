"""The benchmarks behind `python -m potara_studies.bench` (bench.py: the command line, what each section measures
and how it is timed): per section a function returning table rows, and run(), which runs the chosen ones.

    report = run(args, ["lora", "fisher"], command)   # rows, machine, timings; written to args.out (JSON)
    rows = bench_lora(defaults_for(device), device)  # one section: [{"section", "name", "median", "ratio", ...}]
"""

from __future__ import annotations

import copy
import ctypes
import gc
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import VisionTransformer, vit_b_16

import potara
from fed import shuffled_batches, state_bytes, train_adapter
from lora import LoRALinear, LoRAPackedQKV, add_lora, load_lora_state_dict, lora_state_dict, merge_lora
from potara import merge_adapters, personalize, segment_loss
from potara_guards.safe_files import UnsafeFile, read_regular
from potara_harness.config import MAX_RESULTS_FILE_BYTES, VIT_PRESETS, ExperimentConfig
from potara_harness.evaluation import Evaluator, accuracy_and_loss, lam_grid
from potara_harness.report import write_text

# the tiny preset's numbers (config.VIT_PRESETS) and Potara's statistics at the pipelines' default sample count
TINY = {
    **{
        k: v
        for k, v in VIT_PRESETS["tiny"].items()
        if k in ("vit", "train", "local_train_steps", "lr", "batch_size", "rank", "lora_alpha")
    },
    "fisher_samples": ExperimentConfig.fisher_samples,
}
SMALL_VIT = dict(image_size=32, patch_size=4, num_layers=6, num_heads=6, hidden_dim=192, mlp_dim=768)  # 65 tokens
PIPELINE_CMD = ["run_cifar.py", "--preset", "tiny", "--data", "synthetic"]


@dataclass
class BenchConfig:
    """Every size the benchmarks use (defaults per device in `defaults_for`)."""

    reps: int = 5
    warmup: int = 1
    min_sample_s: float = 0.25  # shorter variants are repeated within a round (see measure)
    tokens: int = 197  # ViT-B/16 at 224 px: 196 patches + the class token
    layer_batch: int = 32  # LoRALinear rows: batch x tokens x 768
    mha_batch: int = 8  # packed q/v attention rows (the fused in-projection is the costly part on a CPU)
    rank: int = 8
    alpha: float = 16
    infer_batch: int = 2  # merged-inference images (224 px); this section runs 2x the rounds
    fisher_counts: tuple = (32, 256)
    fisher_vits: tuple = ("tiny", "small")  # run_cifar's tiny preset; SMALL_VIT below
    fisher_batch: int = 32
    clients_small: int = 10
    clients_large: int = 100
    switch_reps: int = 20


def defaults_for(device: torch.device) -> BenchConfig:
    if device.type == "cuda":
        return BenchConfig(reps=10, warmup=3, mha_batch=32, infer_batch=64, switch_reps=50)
    return BenchConfig(reps=7)


# ----------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    variants: dict[str, Callable[[], object]], cfg: BenchConfig, device: torch.device, reps: int | None = None
) -> dict[str, list[float]]:
    """Seconds per call of each variant: warm-up, then `reps` rounds, each variant once per round in
    rotating order (the first variant is the baseline of the ratios). A variant faster than
    cfg.min_sample_s is called several times per round (the time per call is reported), so that
    scheduler hiccups do not dominate short measurements."""
    reps = reps or cfg.reps
    calls = {}
    for k, fn in variants.items():
        for _ in range(max(cfg.warmup - 1, 0)):
            fn()
        _sync(device)
        t0 = time.perf_counter()
        fn()  # the last warm-up call also sizes the inner loop
        _sync(device)
        calls[k] = max(1, math.ceil(cfg.min_sample_s / max(time.perf_counter() - t0, 1e-9)))
    names, times = list(variants), {k: [] for k in variants}
    for r in range(reps):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(calls[k]):
                variants[k]()
            _sync(device)
            times[k].append((time.perf_counter() - t0) / calls[k])
    return times


def rows_from(
    section: str, times: dict[str, list[float]], baseline: str, goal: dict | None = None, note: str = ""
) -> list[dict]:
    """One row per variant: median seconds, median paired ratio to `baseline` and its min-max (noise)."""
    out = []
    for k, ts in times.items():
        ratios = [a / b for a, b in zip(ts, times[baseline])]
        out.append(
            {
                "section": section,
                "name": k,
                "median_s": statistics.median(ts),
                "min_s": min(ts),
                "ratio": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "baseline": baseline,
                "note": note,
                **(goal or {}).get(k, {}),
            }
        )
    return out


def value_row(section: str, name: str, value: float, unit: str, note: str = "", **extra) -> dict:
    return {"section": section, "name": name, "value": value, "unit": unit, "note": note, **extra}


# ----------------------------------------------------------------------------- models
def tiny_preset() -> dict:
    return copy.deepcopy(TINY)


def lora_vit(vit: VisionTransformer, rank: int, alpha: float, num_classes: int, seed: int = 0) -> VisionTransformer:
    """The project's setting: a new head, LoRA on attention q and v, head trainable; B made non-zero
    (a trained adapter) so that nothing is skipped because a factor is zero."""
    torch.manual_seed(seed)
    vit.heads.head = nn.Linear(vit.hidden_dim, num_classes)
    add_lora(vit, ["self_attention"], r=rank, alpha=alpha, trainable=["heads"])
    with torch.no_grad():
        for n, p in vit.named_parameters():
            if ".lora_B" in n:
                p.normal_(0, 0.02)
    return vit


def tiny_vit(
    cfg: BenchConfig, device: torch.device, seed: int = 0, geometry: dict | None = None
) -> tuple[VisionTransformer, dict]:
    """The tiny preset's LoRA ViT (or the same setting on another `geometry`) and the preset's numbers."""
    p = tiny_preset()
    if geometry:
        p["vit"] = geometry
    torch.manual_seed(seed)
    vit = VisionTransformer(num_classes=100, **p["vit"])
    return lora_vit(vit, p["rank"], p["lora_alpha"], 100, seed).to(device), p


def peft_layer(module: nn.Module, rank: int, alpha: float):
    """peft's LoRA layer around a copy of `module` (benchmark-only dependency), or None without peft."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = get_peft_model(
            nn.Sequential(copy.deepcopy(module)), LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"])
        )
    layer = wrapped.base_model.model[0]
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return layer


# ----------------------------------------------------------------------------- 1. LoRA layers
def bench_lora(cfg: BenchConfig, device: torch.device) -> list[dict]:
    rows = []

    def fwd_bwd(module, x, grad_out, call):
        def step():
            x.grad = None
            module.zero_grad(set_to_none=True)
            call(module, x).backward(grad_out)

        return step

    linear_call = lambda m, x: m(x)
    mha_call = lambda m, x: m(x, x, x, need_weights=False)[0]
    cases = [
        (
            f"Linear 768x768, {cfg.layer_batch}x{cfg.tokens} tokens",
            nn.Linear(768, 768),
            cfg.layer_batch,
            768,
            linear_call,
            lambda m: LoRALinear(m, cfg.rank, cfg.alpha),
        ),
        (
            f"Linear 768x3072, {cfg.layer_batch}x{cfg.tokens} tokens",
            nn.Linear(768, 3072),
            cfg.layer_batch,
            3072,
            linear_call,
            lambda m: LoRALinear(m, cfg.rank, cfg.alpha),
        ),
        (
            f"attention q/v (MHA 768, 12 heads), {cfg.mha_batch}x{cfg.tokens} tokens",
            nn.MultiheadAttention(768, 12, batch_first=True),
            cfg.mha_batch,
            768,
            mha_call,
            lambda m: LoRAPackedQKV(m, cfg.rank, cfg.alpha),
        ),
    ]
    # note: nn.MultiheadAttention(batch_first=True) itself runs its in-projection as a broadcast bmm when training,
    # slower than three plain matmuls; our activation-space q/v path does the latter, so it can beat "plain".
    for label, plain, batch, out_features, call, wrap in cases:
        torch.manual_seed(0)
        plain = plain.to(device).requires_grad_(False)  # the frozen backbone layer LoRA wraps
        ours = wrap(copy.deepcopy(plain)).to(device)
        with torch.no_grad():
            for n, p in ours.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        x = torch.randn(batch, cfg.tokens, 768, device=device, requires_grad=True)  # a mid-network layer
        grad_out = torch.randn(batch, cfg.tokens, out_features, device=device)
        variants = {"plain (frozen)": fwd_bwd(plain, x, grad_out, call), "potara": fwd_bwd(ours, x, grad_out, call)}
        theirs = peft_layer(plain, cfg.rank, cfg.alpha)
        if theirs is not None:
            variants["peft"] = fwd_bwd(theirs.to(device), x, grad_out, call)
        times = measure(variants, cfg, device)
        got = rows_from("lora", times, "plain (frozen)", note=label)
        ratio = {r["name"]: r["ratio"] for r in got}
        for r in got:
            r["name"] = f"{label}: {r['name']}"
        if "peft" in ratio:
            rows_of_ours = [r for r in got if r["name"].endswith("potara")]
            rows_of_ours[0].update(
                goal=f"overhead <= peft's ({ratio['peft']:.2f}x)", met=ratio["potara"] <= ratio["peft"]
            )
        rows += got
    return rows


# ----------------------------------------------------------------------------- 2. merged inference
def bench_merged(cfg: BenchConfig, device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    plain = vit_b_16(weights=None).to(device).eval()  # ViT-B/16 geometry; weights do not change the cost
    unmerged = lora_vit(copy.deepcopy(plain), cfg.rank, cfg.alpha, 1000).eval()
    merged = copy.deepcopy(unmerged)
    merge_lora(merged)
    x = torch.randn(cfg.infer_batch, 3, 224, 224, device=device)
    with torch.inference_mode():
        diff = float((merged(x) - unmerged(x)).abs().max())
        call = lambda m: lambda: m(x)
        times = measure(
            {"plain model": call(plain), "merged adapter": call(merged), "unmerged adapter": call(unmerged)},
            cfg,
            device,
            reps=2 * cfg.reps,
        )
    rows = rows_from("merged", times, "plain model", note=f"ViT-B/16, {cfg.infer_batch} images 224 px, inference")
    for r in rows:
        if r["name"] == "merged adapter":
            r.update(goal="1.00x (within +-3%)", met=abs(r["ratio"] - 1) <= 0.03)
    rows.append(value_row("merged", "max |merged - unmerged| logit", diff, "abs", "same function, folded"))
    return rows


# ----------------------------------------------------------------------------- 3. Fisher
def naive_fisher(model: nn.Module, batches, n: int) -> dict[str, torch.Tensor]:
    """The textbook loop: one sample at a time, forward, backward, square, accumulate."""
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    acc = [torch.zeros_like(p) for p in params]
    model.eval()
    seen = 0
    for x, y in batches:
        for i in range(len(y)):
            log_p = F.log_softmax(model(x[i : i + 1]), -1)[0, y[i]]
            for a, g in zip(acc, torch.autograd.grad(log_p, params)):
                a += g * g
            seen += 1
            if seen == n:
                return {k: a / n for k, a in zip(names, acc)}
    return {k: a / seen for k, a in zip(names, acc)}


def per_sample_grads_fused_attention(model: nn.Module, params: dict, x: torch.Tensor, y: torch.Tensor):
    """potara.per_sample_grads as it was: vmap(grad) under the default attention kernel choice."""
    frozen = {n: p for n, p in model.named_parameters() if n not in params}
    buffers = dict(model.named_buffers())

    def log_lik(p, xi, yi):
        out = torch.func.functional_call(model, (p, frozen, buffers), (xi.unsqueeze(0),))
        return potara.classification_likelihood.log_prob(out, yi.unsqueeze(0)).sum()

    return torch.func.vmap(torch.func.grad(log_lik), in_dims=(None, 0, 0))(params, x, y)


def bench_fisher(cfg: BenchConfig, device: torch.device) -> list[dict]:
    rows = []
    for which in cfg.fisher_vits:
        model, p = tiny_vit(cfg, device, geometry=SMALL_VIT if which == "small" else None)
        rows += fisher_rows(
            model,
            p,
            f"{which} ViT ({{num_layers}}x{{hidden_dim}}, {{image_size}}px/{{patch_size}})".format(**p["vit"]),
            cfg,
            device,
        )
    return rows


def fisher_rows(model: nn.Module, p: dict, geometry: str, cfg: BenchConfig, device: torch.device) -> list[dict]:
    n_max = max(cfg.fisher_counts)
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(n_max, 3, p["vit"]["image_size"], p["vit"]["image_size"], generator=gen).to(device)
    Y = torch.randint(0, 100, (n_max,), generator=gen).to(device)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.0)  # lr 0: the same arithmetic, the adapter stays put
    rows = []
    for n in cfg.fisher_counts:
        batches = [(X[i : i + cfg.fisher_batch], Y[i : i + cfg.fisher_batch]) for i in range(0, n, cfg.fisher_batch)]

        def train_pass():
            model.train()
            for x, y in batches:
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()
            model.eval()

        variants = {
            "training pass": train_pass,
            "diag_fisher (torch.func)": lambda: potara.diag_fisher(model, batches, n_samples=n),
            "naive per-sample loop": lambda: naive_fisher(model, batches, n),
        }
        times = measure(variants, cfg, device, reps=cfg.reps if n <= 32 else max(3, cfg.reps // 2))
        got = rows_from(
            "fisher", times, "training pass", note=f"{geometry}, {n} samples, batches of {cfg.fisher_batch}"
        )
        t = {r["name"]: r for r in got}
        speedup = [a / b for a, b in zip(times["naive per-sample loop"], times["diag_fisher (torch.func)"])]
        t["diag_fisher (torch.func)"].update(
            goal="<= 2x the training pass", met=t["diag_fisher (torch.func)"]["ratio"] <= 2
        )
        for r in got:
            r["name"] = f"{geometry}, {n} samples: {r['name']}"
        rows += got
        rows.append(
            value_row(
                "fisher",
                f"{geometry}, {n} samples: naive loop / diag_fisher",
                statistics.median(speedup),
                "x",
                f"min-max {min(speedup):.2f}-{max(speedup):.2f}",
                **({"goal": ">= 5x", "met": statistics.median(speedup) >= 5} if n == 32 else {}),
            )
        )
        f_func, f_naive = potara.diag_fisher(model, batches, n_samples=n), naive_fisher(model, batches, n)
        err = max(float((f_func[k] - f_naive[k]).abs().max() / f_naive[k].abs().max().clamp_min(1e-30)) for k in f_func)
        rows.append(
            value_row("fisher", f"{geometry}, {n} samples: max rel. diff torch.func vs loop", err, "rel", "correctness")
        )
    # the attention kernel under vmap: fused CPU flash attention has no batching rule (vmap loops over samples)
    x, y = X[: cfg.fisher_batch], Y[: cfg.fisher_batch]
    state = {k: q.detach() for k, q in model.named_parameters() if q.requires_grad}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        per_sample_grads_fused_attention(model, state, x, y)
    fell_back = any("batching rule" in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times = measure(
            {
                "per_sample_grads, math attention (potara)": lambda: potara.per_sample_grads(model, state, x, y),
                "per_sample_grads, default attention kernel": lambda: per_sample_grads_fused_attention(
                    model, state, x, y
                ),
            },
            cfg,
            device,
        )
    got = rows_from(
        "fisher",
        times,
        "per_sample_grads, math attention (potara)",
        note=f"{geometry}, {cfg.fisher_batch} samples; with the default kernel vmap warned it loops "
        f"over samples: {'yes' if fell_back else 'no'}",
    )
    for r in got:
        r["name"] = f"{geometry}: {r['name']}"
    return rows + got


# ----------------------------------------------------------------------------- 4. clients
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_free_memory() -> None:
    gc.collect()
    try:  # glibc: give freed heap pages back, so that later growth is new memory (Linux only)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def client_memory(small: int, large: int, rank: int, alpha: float) -> dict:
    """In a fresh process: the shared ViT-B backbone, then `small` and `large` clients' adapters made the
    way fedit.py/experiment.py make them (load into the backbone, read back with lora_state_dict)."""
    torch.set_num_threads(1)
    model = lora_vit(vit_b_16(weights=None), rank, alpha, 100)
    template = lora_state_dict(model)
    _release_free_memory()
    base, held = _rss_bytes(), {}
    rss = {}
    for count in (small, large):
        for c in range(len(held), count):
            load_lora_state_dict(model, {k: torch.randn_like(v) * 0.01 for k, v in template.items()})
            held[f"client{c}"] = lora_state_dict(model)
        _release_free_memory()
        rss[count] = _rss_bytes() - base
    owned = {t.untyped_storage().data_ptr() for s in held.values() for t in s.values()}
    shared = owned & {q.untyped_storage().data_ptr() for q in model.parameters()}
    return {
        "adapter_bytes": state_bytes(template),
        "model_bytes": sum(q.numel() * q.element_size() for q in model.parameters()),
        "rss_growth": rss,
        "storages_shared_with_model": len(shared),
    }


def bench_clients(cfg: BenchConfig, device: torch.device) -> list[dict]:
    model = lora_vit(vit_b_16(weights=None), cfg.rank, cfg.alpha, 100).to(device)
    template = lora_state_dict(model)
    states = [{k: torch.randn_like(v) * 0.01 for k, v in template.items()} for _ in range(4)]
    full = {k: v.clone() for k, v in model.state_dict().items()}
    i = iter(range(10**9))
    note = f"ViT-B/16, q/v rank {cfg.rank} + 100-class head"
    times = measure(
        {
            "load one client's adapter": lambda: load_lora_state_dict(model, states[next(i) % 4]),
            "load a full model state_dict": lambda: model.load_state_dict(full),
            "deepcopy the model": lambda: copy.deepcopy(model),
        },
        cfg,
        device,
        reps=cfg.switch_reps,
    )
    rows = rows_from("clients", times, "load one client's adapter", note=note)
    with mp.get_context("spawn").Pool(1) as pool:  # a fresh process: RSS not blurred by earlier sections
        m = pool.apply(client_memory, (cfg.clients_small, cfg.clients_large, cfg.rank, cfg.alpha))
    grow = m["rss_growth"][cfg.clients_large] - m["rss_growth"][cfg.clients_small]
    extra = cfg.clients_large - cfg.clients_small
    per_client = grow / extra
    rows += [
        value_row("clients", "adapter bytes per client", m["adapter_bytes"], "B", note),
        value_row("clients", "backbone bytes (one copy)", m["model_bytes"], "B", note),
        value_row("clients", f"RSS growth, {cfg.clients_small} clients", m["rss_growth"][cfg.clients_small], "B"),
        value_row("clients", f"RSS growth, {cfg.clients_large} clients", m["rss_growth"][cfg.clients_large], "B"),
        value_row(
            "clients",
            "RSS growth per extra client / adapter bytes",
            per_client / m["adapter_bytes"],
            "x",
            f"{per_client / 1e6:.2f} MB per client over {extra} clients; "
            f"{m['storages_shared_with_model']} storages shared with the model",
            goal="~1x adapter, never a model copy",
            met=per_client <= 1.25 * m["adapter_bytes"] and grow < m["model_bytes"],
        ),
    ]
    return rows


# ----------------------------------------------------------------------------- 5. Potara's weight: cost
def bench_potara(cfg: BenchConfig, device: torch.device) -> list[dict]:
    """The default weight (potara.personalize: 2 forward-backward passes + at most 1 forward pass over the
    held-out samples) against one ordinary forward-backward pass over the same samples, against the 21-point
    grid search scored on them, and against the local training it follows; paired ratios from one run."""
    model, p = tiny_vit(cfg, device)
    gen = torch.Generator().manual_seed(1)
    size = p["vit"]["image_size"]
    X = torch.randn(p["train"], 3, size, size, generator=gen)
    Y = torch.randint(0, 100, (p["train"],), generator=gen)
    n = p["fisher_samples"]
    Xh = torch.randn(n, 3, size, size, generator=gen).to(device)
    Yh = torch.randint(0, 100, (n,), generator=gen).to(device)
    held = [(Xh, Yh)]
    init = lora_state_dict(model)
    G = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in init.items()}  # stands in for FedIT's

    def local_training():
        load_lora_state_dict(model, init)
        return train_adapter(
            model, shuffled_batches(X, Y, p["batch_size"], 0), p["local_train_steps"], p["lr"], progress=False
        ).state

    L = local_training()
    load_lora_state_dict(model, L)

    def forward_backward():  # one ordinary training-style pass: mean loss, backward to the adapter's tensors
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(Xh), Yh).backward()

    def ends():  # what the default costs when its Hermite candidate is an end: 2 fwd-bwd
        segment_loss(model, G, L, 0.0, held)
        segment_loss(model, G, L, 1.0, held)

    def worst_case():  # when its Hermite candidate is interior: 2 fwd-bwd + 1 fwd (the verification pass)
        ends()
        segment_loss(model, G, L, 0.5, held, slope=False)

    ev = Evaluator(model, L, ExperimentConfig())  # L: what every score loads back

    def grid():  # the grid as evaluation.grid_search scores val: accuracy and loss from one merged forward per lam
        return [accuracy_and_loss(ev, merge_adapters(G, L, lam), Xh, Yh) for lam in lam_grid(0.05)]

    def grid_before():  # the earlier grid: accuracy through the rank-r branches, then the loss (two forwards)
        from potara_harness.evaluation import accuracy

        for lam in lam_grid(0.05):
            merged = merge_adapters(G, L, lam)
            load_lora_state_dict(model, merged)
            model.eval()
            accuracy(model, Xh, Yh)
            segment_loss(model, G, L, lam, held, slope=False)
        load_lora_state_dict(model, L)

    _, info = personalize(model, G, L, held_out=held)
    times = measure(
        {
            "one forward-backward pass": forward_backward,
            "potara.personalize (default)": lambda: personalize(model, G, L, held_out=held),
            "default, candidate at an end (2 fwd-bwd)": ends,
            "default, worst case (2 fwd-bwd + 1 fwd)": worst_case,
            "21-point grid search": grid,
            "21-point grid search, the earlier way (2 unmerged forwards per lam)": grid_before,
            "local training": local_training,
        },
        cfg,
        device,
    )
    load_lora_state_dict(model, init)
    note = (
        f"tiny preset ViT, {n} held-out samples in one batch; personalize took {info['passes']} here "
        f"(candidate: {info['candidate']}); local training: {p['local_train_steps']} steps of batch "
        f"{p['batch_size']}"
    )
    rows = rows_from("potara", times, "one forward-backward pass", note=note)
    paired = lambda a, b: [x / y for x, y in zip(times[a], times[b])]
    for r in rows:
        if r["name"] == "default, worst case (2 fwd-bwd + 1 fwd)":
            r.update(goal="<= 2.5x one forward-backward pass", met=r["ratio"] <= 2.5)
    for name, of, goal, limit in (
        ("default, worst case / 21-point grid search", "21-point grid search", "<= 0.25 of the grid search", 0.25),
        (
            "21-point grid search / the earlier way",
            "21-point grid search, the earlier way (2 unmerged forwards per lam)",
            "faster than before",
            1.0,
        ),
        ("potara.personalize / local training", "local training", "< 5% of local training", 0.05),
    ):
        subject = (
            "default, worst case (2 fwd-bwd + 1 fwd)"
            if "worst" in name
            else "21-point grid search"
            if name.startswith("21-point")
            else "potara.personalize (default)"
        )
        ratios = paired(subject, of)
        rows.append(
            value_row(
                "potara",
                name,
                statistics.median(ratios),
                "x",
                f"paired over rounds, noise {min(ratios):.3f}-{max(ratios):.3f}",
                goal=goal,
                met=statistics.median(ratios) <= limit,
            )
        )
    return rows


# ----------------------------------------------------------------------------- 6. run_cifar stages
def bench_pipeline(args, cfg: BenchConfig, device: torch.device) -> list[dict]:
    """Stages as pipeline.run_experiment times them (results.json "timing_s"); with --pipeline-run also the
    command's wall time, the rest being data preparation, backbone loading/pre-training, setup and outputs."""
    path, wall, started = args.pipeline_results, None, time.time()
    if args.pipeline_run:
        path = os.path.join(args.pipeline_out, "results.json")
        subprocess.run([sys.executable, *PIPELINE_CMD, "--out", args.pipeline_out], check=True)
        wall = time.time() - started
    if not os.path.exists(path):
        return [
            value_row(
                "pipeline",
                "not measured",
                float("nan"),
                "",
                f"no {path}: run `python {' '.join(PIPELINE_CMD)}` (or python -m potara_studies.bench --pipeline-run)",
            )
        ]
    try:  # a regular file of bounded size (safe_files.read_regular: never a FIFO or /dev/zero), JSON
        results = json.loads(read_regular(path, MAX_RESULTS_FILE_BYTES))
    except (UnsafeFile, OSError, ValueError) as e:
        return [value_row("pipeline", "not measured", float("nan"), "", f"{path}: {str(e)[:200]}")]
    stages = dict(results.get("timing_s", {}))
    total = sum(stages.values())
    rows = [
        value_row(
            "pipeline", f"stage: {k}", v, "s", f"{100 * v / total:.0f}% of the staged {total:.0f} s", share=v / total
        )
        for k, v in stages.items()
    ]
    rows.append(value_row("pipeline", "staged total (run_experiment)", total, "s", path))
    backbone = results.get("config", {}).get("backbone", {}) or {}
    cached = backbone.get("backbone")
    fresh = wall is not None and cached and os.path.exists(cached) and os.path.getmtime(cached) >= started
    if backbone.get("pretrain_seconds"):
        rows.append(
            value_row(
                "pipeline",
                "backbone pre-training (once; cached and reused by later runs)",
                backbone["pretrain_seconds"],
                "s",
                "in this run" if fresh else "when it was cached",
            )
        )
    if wall is not None:
        rows.append(
            value_row(
                "pipeline",
                "rest: data, backbone, setup, outputs",
                wall - total,
                "s",
                f"{100 * (wall - total) / wall:.0f}% of the wall time",
            )
        )
        rows.append(value_row("pipeline", "wall time of the command", wall, "s", " ".join(PIPELINE_CMD)))
    return rows


# ----------------------------------------------------------------------------- report
def fmt_row(r: dict) -> str:
    if "median_s" in r:
        value = f"{r['median_s'] * 1e3:.1f} ms" if r["median_s"] < 10 else f"{r['median_s']:.1f} s"
        ratio = f"{r['ratio']:.2f}x" + (
            f" ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"
            if r["name"] != r["baseline"] and not r["name"].endswith(r["baseline"])
            else ""
        )
    else:
        v, u = r["value"], r["unit"]
        value = (
            f"{v / 1e6:.2f} MB"
            if u == "B"
            else f"{v:.2f}{u}"
            if u == "x"
            else f"{v:.1f} s"
            if u == "s"
            else f"{v:.2e}"
            if u in ("rel", "abs")
            else str(v)
        )
        ratio = ""
    met = {True: "met", False: "NOT met"}.get(r.get("met"), "")
    goal = f"{r.get('goal', '')} {met}".strip()
    return f"| {r['section']} | {r['name']} | {value} | {ratio} | {goal} | {r.get('note', '')} |"


def machine_info(device: torch.device) -> dict:
    cpu = (
        next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
            platform.processor(),
        )
        if os.path.exists("/proc/cpuinfo")
        else platform.processor()
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": os.getloadavg(),
    }


def run(args, sections: list[str], command: str) -> dict:
    """The chosen sections on --device with --threads torch threads, checked by bench.main; the report
    (machine, config, rows, seconds per section) is written to args.out even when a section fails."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda" if args.device == "cuda" or args.device == "auto" and torch.cuda.is_available() else "cpu"
    )
    cfg = defaults_for(device)
    if args.reps:
        cfg.reps = args.reps
    report = {
        "command": command,
        "machine": machine_info(device),
        "config": asdict(cfg),
        "rows": [],
        "section_seconds": {},
    }
    run_section = {
        "lora": bench_lora,
        "merged": bench_merged,
        "fisher": bench_fisher,
        "clients": bench_clients,
        "potara": bench_potara,
        "pipeline": lambda c, d: bench_pipeline(args, c, d),
    }
    t_start = time.time()
    try:
        for s in sections:
            print(f"[bench] {s} ...", file=sys.stderr, flush=True)
            t0 = time.time()
            report["rows"] += run_section[s](cfg, device)
            report["section_seconds"][s] = time.time() - t0
    finally:  # whatever finished is kept
        report["machine"]["loadavg_end"] = os.getloadavg()
        report["total_seconds"] = time.time() - t_start
        write_text(args.out, json.dumps(report, indent=1))  # atomic, never through a link (checked up front too)
    m = report["machine"]
    print(
        f"\n{m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads), device {m['device']}"
        f"{' ' + m['gpu'] if m['gpu'] else ''}, torch {m['torch']}; load average {m['loadavg_start'][0]:.1f} -> "
        f"{m['loadavg_end'][0]:.1f}\n`{report['command']}` ({report['total_seconds']:.0f} s)\n"
    )
    print("| section | measurement | median | ratio to baseline (min-max) | goal | note |")
    print("|---|---|---|---|---|---|")
    for r in report["rows"]:
        print(fmt_row(r))
    print(f"\nfigures in {args.out}")
    return report
