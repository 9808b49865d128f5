"""Potara: federated personalisation by merging a federated and a local LoRA adapter with a closed-form weight
(arXiv 2602.18658). Each file is one part of the method and reads top to bottom on its own:

    lora.py, lora_mha.py   LoRA on nn.Linear (and nn.MultiheadAttention's packed q/k/v)
    training.py            local AdamW on the adapter only
    fedit.py               FedAvg over adapter tensors: FedIT
    fisher.py              likelihoods, per-sample gradients, the diagonal Fisher (the statistics)
    weight.py              the weight lam: the closed form, the paper's estimator, the verified default
    merge.py               the merge and the client-side step, personalize
    adapter_file.py        an adapter in one file, read back without running code
and beside them what guards untrusted input and what serves deployments:
    tensor_checks.py       the one validator of untrusted tensors
    safe_files.py          atomic writes, bounded reads of regular files, never through a link
    rounds.py              one FedIT round in the pieces a deployment calls (sampling, reply checks, seeds)

The four steps:

    import potara
    potara.add_lora(model, ["fc1", "fc2"], r=8, alpha=16, trainable=["head"])        # 1. phi_0 = lora_state_dict
    phi_0 = potara.lora_state_dict(model)
    state = potara.run_fedit(model, clients, potara.FedConfig(rounds=100, local_steps=5, lr=3e-3))  # 2. phi_G
    phi_L = potara.train_adapter(model, batches, steps=100, lr=3e-3, start=phi_0).state           #    phi_L
    merged, info = potara.personalize(model, state.global_state, phi_L, held_out=val_batches)    # 3. info["lam"]
    potara.save_adapter("client0.pt", merged, potara.lora_meta(model))                           # 4. load_adapter

The names below are imported when first used, so `import potara.safe_files` (the command-line checks) loads
no torch.
"""

from importlib import import_module

_API = {
    "lora": ["add_lora", "lora_state_dict", "load_lora_state_dict", "merge_lora", "unmerge_lora", "lora_meta"],
    "fedit": ["run_fedit", "FedConfig", "FedState", "Client", "fedavg"],
    "training": ["train_adapter", "shuffled_batches"],
    "merge": ["personalize", "Verified", "PaperFisher", "merge_adapters"],
    "adapter_file": ["save_adapter", "load_adapter"],
    "tensor_checks": ["AdapterError"],
}
_WHERE = {name: module for module, names in _API.items() for name in names}
__all__ = sorted(_WHERE)


_MODULES = ["adapter_file", "fedit", "fisher", "lora", "lora_mha", "merge", "rounds", "safe_files", "tensor_checks"]
_MODULES += ["training", "weight"]  # potara.lora_mha.LORA_LAYERS and the like, imported on first use too


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    if name in _MODULES:
        return import_module(f".{name}", __name__)
    raise AttributeError(f"module 'potara' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
