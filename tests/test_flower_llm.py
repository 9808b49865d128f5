"""The Flower app's language experiment (experiment="language"): run_llm.py's pipeline across devices.

In process against test_flower.InProcessGrid (the ServerApp and ClientApp code paths, a SuperLink's answers) and
once for real on 127.0.0.1 (2 SuperNodes), each checked against run_llm.py run in this process on the same tasks,
tiny model file and seed: the final global adapter bitwise, every client's accuracies, lam and grid curves equal,
the device's peft adapter bitwise run_llm.py --export-peft's. The tiny model is micro (conftest.SMALL_LLAMA's
sizes, pre-trained 10 steps by run_llm.py itself); the devices read its architecture from the file.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import background
import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("transformers")

from conftest import SMALL_LLAMA  # noqa: E402
from flower_kit import (  # noqa: E402
    REPO,
    RUN,
    Unpicklable,
    final_adapter,
    serve,
)
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord  # noqa: E402
from obstacles import paths_of, planted_cases, snapshot, unprivileged  # noqa: E402

import run_llm  # noqa: E402
from potara_flower.task import model_sha256  # noqa: E402
from potara_harness import config  # noqa: E402
from potara_harness.config import AppConfig, ConfigError  # noqa: E402
from potara_harness.llm_data import DataError, read_jsonl  # noqa: E402
from potara_harness.llm_tasks import synthetic_tasks  # noqa: E402
from potara_harness.lm import load_tiny_file  # noqa: E402
from potara_harness.report import METHOD_LABELS  # noqa: E402

# a micro run; run_llm.py's options of the same names (run_llm_argv)
LANG = {
    "experiment": "language",
    "num-clients": 2,
    "rounds": 2,
    "local-steps": 2,
    "clients-per-round": 1,
    "lr": 0.003,
    "batch-size": 8,
    "rank": 4,
    "lora-alpha": 8.0,
    "seed": 1,
    "train": 24,
    "val": 8,
    "test": 8,
    "local-train-steps": 3,
    "finetune-steps": 2,
    "fisher-samples": 8,
    "grid-step": 0.5,
    "drop-prob": 0.0,
    "synthetic-examples": 40,
    "max-len": 64,
    "max-new-tokens": 8,
    "eval-batch-size": 16,
}
OPTIONS = (
    "rounds",
    "local-steps",
    "clients-per-round",
    "lr",
    "batch-size",
    "rank",
    "lora-alpha",
    "seed",
    "train",
    "val",
    "test",
    "local-train-steps",
    "finetune-steps",
    "fisher-samples",
    "grid-step",
    "synthetic-examples",
    "max-len",
    "max-new-tokens",
    "eval-batch-size",
)


def run_llm_argv(run: dict, data: str, out: Path, cache: Path, peft: Path) -> list[str]:
    """run_llm.py's command line for the same run: the first num-clients tasks of `data`, tiny, 1 thread."""
    argv = [
        "--model",
        "tiny",
        "--data",
        data,
        "--clients",
        str(run["num-clients"]),
        "--pretrain-steps",
        "10",
        "--snapshots",
        "1",
        "--no-fedsa",
        "--no-progress",
        "--threads",
        "1",
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
        "--export-peft",
        str(peft),
    ]
    for key in OPTIONS:
        argv += [f"--{key}", str(run[key])]
    return argv


@pytest.fixture
def micro_llama(monkeypatch):
    """run_llm.py's tiny model at conftest.SMALL_LLAMA's sizes (the file it caches carries them); torch's thread
    count restored afterwards (run_llm.py sets it)."""
    for k, v in SMALL_LLAMA.items():
        monkeypatch.setitem(config.TINY_LLAMA, k, v)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def in_process_reference(run: dict, data: str, tmp: Path) -> tuple[dict, Path, Path]:
    """run_llm.py on the same tasks and seed: (its results.json, its tiny model file, its peft export folder)."""
    out, cache, peft = tmp / "run_llm", tmp / "cache", tmp / "run_llm-peft"
    results = run_llm.main(run_llm_argv(run, data, out, cache, peft))
    [model_file] = cache.glob("tiny-llama-*.pt")
    return results, model_file, peft


def check_against_run_llm(out: Path, reference: dict, tasks: list[str], devices: Path | None, peft: Path) -> dict:
    """The app's outputs against run_llm.py's: the final global adapter bitwise (its checkpoint), client k's
    accuracies under every method, lam, and grid curves those of run_llm.py's k-th task; each device's peft
    adapter bitwise run_llm.py's export of the same client."""
    from safetensors.torch import load_file

    ref_adapter = torch.load(Path(reference["out"]) / "checkpoint.pt", weights_only=True)["fedit"]["global_state"]
    got = final_adapter(out)
    assert sorted(got) == sorted(ref_adapter)
    for k, v in ref_adapter.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert any(v.abs().sum() > 0 for k, v in got.items() if k.endswith("lora_B"))  # it trained (B starts at 0)
    results = json.loads((out / "results.json").read_text())
    assert results["clients"] == [f"client{k}" for k in range(len(tasks))]
    assert sorted(results["methods"]) == sorted(m for m in METHOD_LABELS if m != "fedsa")
    for k, task in enumerate(tasks):
        mine, theirs = results["per_client"][f"client{k}"], reference["per_client"][task]
        for m, r in results["methods"].items():
            assert r["per_client"][f"client{k}"] == reference["methods"][m]["per_client"][task], (m, task)
        assert mine["lam_potara"] == theirs["lam_potara"] and mine["grid"] == theirs["grid"], task
        if devices is not None:  # the device kept its Potara adapter, peft's format, run_llm.py's export bitwise
            folder = devices / f"node{k}"
            assert sorted(p.name for p in folder.iterdir()) == ["base_model", task]
            a, b = (
                load_file(folder / task / "adapter_model.safetensors"),
                load_file(peft / task / "adapter_model.safetensors"),
            )
            assert sorted(a) == sorted(b) and all(torch.equal(a[key], b[key]) for key in a), task
            config_a, config_b = (json.loads((f / task / "adapter_config.json").read_text()) for f in (folder, peft))
            assert {**config_a, "base_model_name_or_path": None} == {**config_b, "base_model_name_or_path": None}
    return results


def jsonl_tasks(folder: Path, names: list[str], n: int) -> None:
    """Synthetic tasks written as <task>.jsonl files (llm_data's format)."""
    folder.mkdir()
    tasks = synthetic_tasks(n, seed=config.SYNTHETIC_TASKS_SEED)
    for name in names:
        lines = [
            json.dumps({"prompt": e.prompt, "answer": e.answer, **({"options": list(e.options)} if e.options else {})})
            for e in tasks[name]
        ]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- in process (no network)
def test_language_app_in_process_equals_run_llm(micro_llama, task_identity, tmp_path):
    """Two clients with a JSONL task file each (one multiple choice, one free-form answer): the ServerApp +
    ClientApp code path gives run_llm.py's global adapter bitwise, its accuracies, lam and grid curves, and each
    device's peft adapter; nothing but adapters and numbers crosses the wire (every message and reply read)."""
    tasks = ["pronoun", "what_has"]  # sorted file names: run_llm.py --data DIR's client order
    jsonl_tasks(tmp_path / "tasks", tasks, LANG["synthetic-examples"])
    reference, model_file, peft = in_process_reference(LANG, str(tmp_path / "tasks"), tmp_path)
    reference["out"] = str(tmp_path / "run_llm")
    devices, seen = tmp_path / "devices", []

    def watch(k, msg, reply):  # every message and its reply, as they cross the wire
        seen.extend([msg.content, reply.content if reply.has_content() else reply.error.reason])
        return reply

    nodes = [
        {
            "partition-id": k,
            "num-partitions": 2,
            "task": str(tmp_path / "tasks" / f"{t}.jsonl"),
            "model": str(model_file),
            "threads": 1,
            "adapter-dir": str(devices / f"node{k}"),
        }
        for k, t in enumerate(tasks)
    ]
    serve(tmp_path, tmp_path / "out", nodes=nodes, tamper=watch, **LANG)
    check_against_run_llm(tmp_path / "out", reference, tasks, devices, peft)

    prompts = {e.prompt for t in tasks for e in read_jsonl(str(tmp_path / "tasks" / f"{t}.jsonl"))}
    adapter_keys = set(final_adapter(tmp_path / "out"))
    assert len(seen) == 2 * (2 + 2 * 1 + 2)  # set-up and the final step to both, one client a round
    for content in seen:
        assert not isinstance(content, str), content  # a client error
        for name, record in content.items():
            if isinstance(record, ArrayRecord):
                assert set(record.keys()) == adapter_keys, name  # adapters, and nothing else, as tensors
            else:
                assert isinstance(record, (ConfigRecord, MetricRecord)), (name, type(record))
                for v in record.values():
                    for x in v if isinstance(v, list) else [v]:
                        assert isinstance(x, (int, float, bool)) or isinstance(x, str) and len(x) <= 300, (name, x)
                        assert not (isinstance(x, str) and any(p in x for p in prompts)), (name, x)


def test_language_setup_refuses_a_misconfigured_federation(micro_llama, task_identity, tmp_path):
    """No task, an unknown synthetic task, a missing model, a model file crafted to run code (refused unread),
    another model on one node: the run stops at set-up with one line naming the problem."""
    _, model_file, _ = in_process_reference(
        {**LANG, "rounds": 1, "num-clients": 1, "clients-per-round": 0}, "synthetic", tmp_path
    )
    node = lambda k, **kw: {
        "partition-id": k,
        "num-partitions": 2,
        "task": f"synthetic:{['sentiment', 'pronoun'][k]}",
        "model": str(model_file),
        **kw,
    }
    no_task = node(1)
    del no_task["task"]
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"state_dict": {}, "info": {"key": {"arch": Unpicklable()}}}, unsafe)  # would call os.getpid if loaded
    other = tmp_path / "other.pt"
    obj = torch.load(model_file, weights_only=True)
    obj["state_dict"]["lm_head.weight"] = obj["state_dict"]["lm_head.weight"] + 1  # same shapes, other weights
    torch.save(obj, other)
    for bad, message in (
        (no_task, "node config task is missing"),
        (node(1, task="synthetic:poetry"), "the synthetic tasks are sentiment, duplicate"),
        (node(1, task=str(tmp_path / "nowhere.jsonl")), "nowhere.jsonl: cannot read"),
        (node(1, model=str(tmp_path / "none")), r"node config model='.*none': no such file or folder"),
        (node(1, model=str(unsafe)), r"unsafe.pt: not a readable, safe torch file"),
        (node(1, model=str(other)), "client1 holds another backbone file"),
    ):
        with pytest.raises(RuntimeError, match=message):
            serve(tmp_path, tmp_path / "out", nodes=[node(0), bad], **LANG)


def test_language_run_config_keys_are_typed():
    """experiment and the language keys: defaults run_llm.py's (tiny), bad values one line."""
    cfg = AppConfig.from_run_config({"experiment": "language"})
    tiny = config.LM_PRESETS["tiny"]
    assert (cfg.max_len, cfg.max_new_tokens, cfg.target_modules) == (
        tiny["max_len"],
        tiny["max_new_tokens"],
        ["q_proj", "v_proj"],
    )
    assert AppConfig().experiment == "vision"
    for bad, message in (
        ({"experiment": "audio"}, "experiment must be 'vision' or 'language'"),
        ({"max-len": 0}, re.escape("run config max-len must be an integer in [1, 32,768], got 0")),
        ({"targets": " "}, "targets must name nn.Linear"),
        ({"targets": "self_attn"}, "targets must name nn.Linear"),
        ({"synthetic-examples": 1.5}, "expected a int"),
    ):
        with pytest.raises(ConfigError, match=message):
            AppConfig.from_run_config({"experiment": "language", **bad})


def test_model_hash_covers_every_file_of_a_folder(tmp_path):
    """model_sha256: a file's sha256; a folder's equals the hash of "<relative path>\\0<sha256>\\n" lines in sorted
    order (computed here by hand), is equal for a copy, and changes with any file's bytes or name."""
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    files = {"config.json": b"{}", "model.safetensors": b"\x00" * 5000, "sub/tokenizer.json": b"[1, 2]"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    sha = lambda b: hashlib.sha256(b).hexdigest()
    expected = sha("".join(f"{n}\0{sha(files[n])}\n" for n in sorted(files)).encode())
    assert model_sha256(str(folder)) == expected
    assert model_sha256(str(folder / "config.json")) == sha(b"{}")
    shutil.copytree(folder, tmp_path / "copy")
    assert model_sha256(str(tmp_path / "copy")) == expected
    (tmp_path / "copy" / "model.safetensors").write_bytes(b"\x00" * 4999 + b"\x01")
    assert model_sha256(str(tmp_path / "copy")) != expected
    (folder / "sub" / "tokenizer.json").rename(folder / "tokenizer.json")
    assert model_sha256(str(folder)) != expected


def test_tiny_model_file_is_checked_before_use(tmp_path):
    """load_tiny_file: a file that is not pretrain_tiny's (no architecture, odd sizes, a tensor of another shape
    or with NaN) is refused in one line; a good one loads its weights."""
    from potara_harness.lm import tiny_model

    torch.manual_seed(0)
    arch = {**config.TINY_LLAMA, **SMALL_LLAMA}
    state = tiny_model(64, arch).state_dict()
    good = tmp_path / "good.pt"
    torch.save({"state_dict": state, "info": {"key": {"arch": arch}}}, good)
    model = load_tiny_file(str(good), 64)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    nan = {**state, "lm_head.weight": state["lm_head.weight"] * float("nan")}
    for obj, message in (
        ({"state_dict": state}, "not a tiny model file"),
        ({"state_dict": state, "info": {"key": {"arch": {**arch, "hidden_size": 10**9}}}}, "not a tiny model file"),
        ({"state_dict": state, "info": {"key": {"arch": {**arch, "hidden_size": 48}}}}, "shape"),
        ({"state_dict": nan, "info": {"key": {"arch": arch}}}, "NaN"),
    ):
        torch.save(obj, tmp_path / "bad.pt")
        with pytest.raises(DataError, match=message):
            load_tiny_file(str(tmp_path / "bad.pt"), 64)


def test_every_obstacle_in_a_devices_adapter_dir_is_one_line_at_setup_and_at_the_write(
    micro_llama, task_identity, tmp_path
):
    """The adapter-dir a real language device writes (the in-process app's final step: <task>/ and base_model/ in
    peft's format), with each obstacle at every path in it (tests/obstacles.py). Set-up (client_app.load_client,
    which every message runs first) refuses it with one ConfigError line naming adapter-dir and the path; the same
    obstacle met by the final write itself (planted after that check) is one UnsafeFile or WriteError line naming
    the folder. Nothing outside changes either way."""
    from flwr.app import Context, RecordDict

    from potara_flower import client_app
    from potara_guards.safe_files import UnsafeFile, WriteError
    from potara_harness.peft_export import export_with_base

    run = {**LANG, "num-clients": 1, "clients-per-round": 0, "rounds": 1}
    _, model_file, _ = in_process_reference(run, "synthetic", tmp_path)
    node = {"partition-id": 0, "num-partitions": 1, "task": "synthetic:sentiment", "model": str(model_file)}
    serve(tmp_path, tmp_path / "out", nodes=[{**node, "adapter-dir": str(tmp_path / "device")}], **run)
    tree = tmp_path / "device"
    files = {"sentiment": ["adapter_config.json", "adapter_model.safetensors"]}
    files["base_model"] = ["config.json", "generation_config.json", "model.safetensors"]
    assert paths_of(tree) == sorted(["./"] + [f"{d}/{f}" for d, fs in files.items() for f in ["", *fs]])
    run_config = {**RUN, **run, "out-dir": str(tmp_path / "out")}
    cfg, client = client_app.load_client(Context(1, 1, node, RecordDict(), run_config))
    adapter = {k: v.clone() for k, v in client.phi0.items()}
    done = []
    for case in planted_cases(tree, tmp_path / "cases"):
        adapter_dir, rel, kind = case.folder, case.rel, case.kind
        name = rel.rstrip("/") if rel != "./" else ""
        context = Context(1, 1, {**node, "adapter-dir": str(adapter_dir)}, RecordDict(), run_config)
        with pytest.raises(ConfigError) as e:
            unprivileged(client_app.load_client, context)
        assert snapshot(adapter_dir) == case.planted, (rel, kind)
        msg = str(e.value)
        assert msg.startswith(f"node config adapter-dir='{adapter_dir}': ") and "\n" not in msg, (rel, kind, msg)
        assert name.split("/")[0] in msg, (rel, kind, msg)
        with pytest.raises((UnsafeFile, WriteError)) as e:
            unprivileged(
                export_with_base, str(adapter_dir), client.model, {"sentiment": adapter}, cfg.target_modules, None
            )
        msg = str(e.value)
        assert str(adapter_dir) in msg and "\n" not in msg and ".partial" not in msg, (rel, kind, msg)
        done.append((rel, kind))
    assert len(done) == 1 + 2 * 4 + 5 * 4, done


# ----------------------------------------------------------------------------- the loopback run
LANG_TASKS = list(synthetic_tasks(1))[:2]  # run_llm.py --data synthetic --clients 2


def prepare_language(folder):
    """In the main thread, before any test: run_llm.py on the same tasks (at micro_llama's sizes, torch's
    thread count restored), which writes the tiny model file the devices read; the federation."""
    from potara_flower.loopback import LocalFederation

    threads = torch.get_num_threads()
    with (
        pytest.MonkeyPatch.context() as patch,
        open(folder / "run_llm.out", "w") as out,
        redirect_stdout(out),
        redirect_stderr(out),
    ):
        for k, v in SMALL_LLAMA.items():  # its table and bars go to run_llm.out: nothing is captured yet
            patch.setitem(config.TINY_LLAMA, k, v)
        reference, model_file, peft = in_process_reference(LANG, "synthetic", folder)
    torch.set_num_threads(threads)
    reference["out"] = str(folder / "run_llm")
    return LocalFederation(folder / "federation"), {"reference": reference, "model": model_file, "peft": peft}


def run_language(federation, folder, made: dict) -> dict:
    """In the background (tests/background.py): a SuperLink, 2 SuperNodes naming synthetic tasks (no data
    files) and run_llm.py's tiny model file, `flwr run`; its final status."""
    federation.superlink()
    for k, task in enumerate(LANG_TASKS):
        federation.supernode(
            f"node{k}",
            f"partition-id={k} num-partitions=2 task='synthetic:{task}' "
            f"model='{made['model']}' threads=1 adapter-dir='{folder / 'devices' / f'node{k}'}'",
        )
    status = federation.run(REPO, {**LANG, "out-dir": str(folder / "out")}, timeout=400)
    return {**made, "status": status, "superlink": federation.log("superlink")[-3000:]}


background.register("language", prepare_language, run_language)


@pytest.mark.federation("language")
def test_loopback_language_bitwise_equals_run_llm(federation_result):
    """The real thing on 127.0.0.1: a SuperLink, 2 SuperNodes naming synthetic tasks (no data files) and run_llm.py's
    tiny model file, `flwr run` for 2 rounds of one sampled client, then the Potara step: check_against_run_llm."""
    got, folder = federation_result
    assert got["status"]["status"] == "finished:completed", got["superlink"]
    results = check_against_run_llm(folder / "out", got["reference"], LANG_TASKS, folder / "devices", got["peft"])
    assert all(h["failed"] == [] for h in results["fedit_history"])
    assert results["config"]["run_config"]["experiment"] == "language"


def test_language_resume_refuses_other_language_settings(micro_llama, task_identity, tmp_path):
    """The checkpoint's fingerprint holds the language settings that shape the adapter (max-len cuts the prompts,
    synthetic-examples draws the tasks): resuming with another one is refused in one line; with the same, resumed."""
    from potara_harness.checkpoint import ResumeError

    _, model_file, _ = in_process_reference(
        {**LANG, "rounds": 1, "num-clients": 1, "clients-per-round": 0}, "synthetic", tmp_path
    )
    nodes = [
        {"partition-id": k, "num-partitions": 2, "task": f"synthetic:{t}", "model": str(model_file), "threads": 1}
        for k, t in enumerate(["sentiment", "pronoun"])
    ]
    one = {**LANG, "rounds": 1, "finetune-steps": 1, "local-train-steps": 1}
    serve(tmp_path, tmp_path / "out", nodes=nodes, **one)
    for change in ({"max-len": 72}, {"synthetic-examples": 41}):
        ((key, value),) = change.items()
        with pytest.raises(ResumeError, match=rf"was written by a run with other {key} \(\d+ there, {value} now\)"):
            serve(tmp_path, tmp_path / "out", nodes=nodes, **{**one, "rounds": 2, "resume": True, **change})
    resumed = serve(tmp_path, tmp_path / "out", nodes=nodes, **{**one, "rounds": 2, "resume": True})
    assert len(resumed["fedit_history"]) == 2


def test_the_recipe_names_the_model_file_run_llm_writes(tmp_path, monkeypatch):
    """docs/flower.md's language recipe names the tiny model file its preparation command caches (the cache key
    of run_llm.py's defaults), so the node configs are copy-paste true."""
    from potara_harness import lm

    doc = (REPO / "docs" / "flower.md").read_text()
    monkeypatch.chdir(tmp_path)  # the parser creates --out
    prep = next(line for line in doc.splitlines() if line.startswith("python run_llm.py --model tiny"))
    args, p = run_llm.resolve_args(run_llm.build_parser(), prep.split()[2:])

    class Written(Exception):
        pass

    def cached_pretrain(path, *rest, **kw):
        raise Written(path)

    monkeypatch.setattr(lm, "cached_pretrain", cached_pretrain)
    with pytest.raises(Written) as written:
        lm.pretrain_tiny(None, None, p, 0, "data/llm", "cpu", False)
    name = str(written.value)
    configs = [line for line in doc.splitlines() if '--node-config "' in line and "model=" in line]
    assert configs and all(f"model='{name}'" in line for line in configs), name


# ----------------------------------------------------------------------------- what a language device imports
DEVICE_WITHOUT_TORCHVISION = r"""
import sys

import potara_flower.client_app, potara_flower.server_app, potara_harness.lm  # installed torchvision: not imported
print(sorted(m for m in sys.modules if m.split(".")[0] == "torchvision"))
sys.modules["torchvision"] = None  # as if not installed: importing it raises, find_spec says absent (transformers)
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from potara_flower import client_app
from potara_flower.task import ADAPTER, CONFIG
from potara_harness.config import TINY_LLAMA
from potara_harness.lm import tiny_model

for attr in ("_run_id", "_node_id", "_task_id"):
    setattr(TaskIdentity, attr, 1)
arch = {**TINY_LLAMA, **SMALL}
torch.save({"info": {"key": {"arch": arch}}, "state_dict": tiny_model(64, arch).state_dict()}, MODEL)
run = {**RUN, "out-dir": "unused"}
node = {"partition-id": 0, "num-partitions": 2, "task": "synthetic:pronoun", "model": MODEL, "threads": 1}
context = Context(1, 1, node, RecordDict(), run)
setup = client_app.setup(Message(RecordDict({CONFIG: ConfigRecord({})}), 1, "query"), context)
phi0 = setup.content[ADAPTER]
train = Message(RecordDict({ADAPTER: phi0, CONFIG: ConfigRecord({"round": 0})}), 1, "train")
reply = client_app.train(train, context)
print(setup.content[CONFIG]["num-examples"], reply.content["metrics"]["train-loss"] > 0)
"""


def test_a_language_device_needs_no_torchvision(tmp_path):
    """Importing the apps imports no torchvision (the vision model code is imported by the vision path only), and
    a language device then runs set-up and a training round where torchvision cannot be imported
    (sys.modules["torchvision"] = None: what an environment without it sees), so nothing on its path needs it.
    One subprocess, bounded in time."""
    import subprocess
    import sys

    script = (
        f"SMALL = {SMALL_LLAMA!r}\nMODEL = {str(tmp_path / 'tiny.pt')!r}\nRUN = {LANG!r}\n" + DEVICE_WITHOUT_TORCHVISION
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["[]", str(LANG["train"]), "True"], out.stdout
