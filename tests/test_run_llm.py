"""run_llm.py end to end on a micro problem; its peft export loads in peft with equal logits; each mistake of a
command line is one line naming its cause, before any download or pre-training."""

import contextlib
import http.server
import io
import json
import os
import shutil
import socket
import threading
import warnings

import pytest
import torch
from conftest import script_errors
from obstacles import paths_of, planted_cases, recorded_writes, snapshot, unprivileged

pytest.importorskip("transformers")

import run_llm
from lora import add_lora, load_lora_state_dict, lora_state_dict
from potara import merge_adapters
from potara_guards.safe_files import UnsafeFile
from potara_harness import lm, peft_export


def test_peft_export_loads_in_peft_with_equal_logits(tmp_path, small_llama, randomize_lora):
    peft = pytest.importorskip("peft")
    model = small_llama()
    add_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    randomize_lora(model, seed=1)
    A = lora_state_dict(model)
    randomize_lora(model, seed=2)
    B = lora_state_dict(model)
    base_dir = str(tmp_path / "base")
    peft_export.save_tiny_base(model, base_dir)
    adapters = {"ab": merge_adapters(A, B, 0.3, "ab"), "delta": merge_adapters(A, B, 0.3, "delta")}  # rank 4, 8
    peft_export.export_peft(
        str(tmp_path / "peft"), adapters, scaling=2.0, targets=["q_proj", "v_proj"], base_model=base_dir
    )
    from transformers import AutoModelForCausalLM

    x = torch.randint(3, 259, (2, 11))
    for name, state in adapters.items():
        load_lora_state_dict(model, state, allow_rank_change=True)
        base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager").eval()
        with torch.no_grad():
            ours, plain = model(x).logits, base(x).logits
            theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft" / name)).eval()(x).logits
        assert (ours - plain).abs().max() > 1e-3  # the adapter matters, so equality below is not trivial
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


MICRO = [
    "--clients",
    "2",
    "--rounds",
    "2",
    "--local-steps",
    "2",
    "--pretrain-steps",
    "10",
    "--train",
    "24",
    "--val",
    "8",
    "--test",
    "8",
    "--synthetic-examples",
    "40",
    "--local-train-steps",
    "3",
    "--finetune-steps",
    "2",
    "--fisher-samples",
    "8",
    "--batch-size",
    "8",
    "--grid-step",
    "0.5",
    "--snapshots",
    "1",
    "--no-progress",
    "--threads",
    "1",
]


def test_micro_end_to_end_run(tmp_path):
    out = str(tmp_path / "run")
    results = run_llm.main(
        MICRO + ["--out", out, "--cache-dir", str(tmp_path / "cache"), "--export-peft", str(tmp_path / "peft")]
    )
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved["clients"] == ["sentiment", "duplicate"] and os.path.exists(os.path.join(out, "results.md"))
    for m in ("local", "fedit", "fedit_ft", "uniform", "fisher", "fedsa", "grid_val", "potara_ab", "potara_delta"):
        for acc in saved["methods"][m]["per_client"].values():
            assert 0 <= acc <= 1
    for c in saved["per_client"].values():
        assert 0 <= c["lam_potara"] <= 1
    arch = lm.TINY_LLAMA  # every layer: q and v, each A (r x d) and B (d x r), float32; default r = 8
    adapter_bytes = arch["num_hidden_layers"] * 2 * 2 * (8 * arch["hidden_size"]) * 4
    assert saved["adapter"]["bytes"] == adapter_bytes
    assert saved["methods"]["fedit"]["bytes"] == 2 * 2 * 2 * adapter_bytes  # rounds x clients x both ways
    assert saved["methods"]["local"]["bytes"] == 0
    assert saved["config"]["reference"]["chance"] == {"sentiment": 0.5, "duplicate": 0.5}
    md = open(os.path.join(out, "results.md")).read()
    assert "Pre-trained model, no adapter" in md
    command = " ".join(
        [
            "python",
            "run_llm.py",
            *MICRO,
            "--out",
            out,
            "--cache-dir",
            str(tmp_path / "cache"),
            "--export-peft",
            str(tmp_path / "peft"),
        ]
    )
    assert md.startswith("Data: SYNTHETIC TASKS (not FLAN)") and "sentiment, duplicate" in md.split("\n")[0]
    assert f"Command: `{command}`" in md.split("| method |")[0] and saved["config"]["command"] == command
    assert sorted(os.listdir(tmp_path / "peft")) == ["base_model", "duplicate", "federated", "sentiment"]
    assert results["methods"]["potara_ab"]["mean"] == saved["methods"]["potara_ab"]["mean"]
    again = run_llm.main(MICRO + ["--out", out, "--cache-dir", str(tmp_path / "cache"), "--resume"])  # from checkpoint
    assert {m: r["per_client"] for m, r in again["methods"].items()} == {
        m: r["per_client"] for m, r in results["methods"].items()
    }


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "/nonexistent/dir"], "--data /nonexistent/dir: no such folder"),
        (["--rounds", "0"], "argument --rounds: must be an integer in [1, 100,000]"),
        (["--clients", "9"], "only 8 tasks"),
        (["--model", "/nonexistent/model"], "--model /nonexistent/model: no such folder"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        run_llm.main(argv + ["--cache-dir", str(tmp_path), "--out", str(tmp_path / "o"), "--pretrain-steps", "1"])
    text = str(e.value.code) if e.value.code not in (None, 2) else capsys.readouterr().err
    assert message in text and len(text.strip().splitlines()[-1]) > 0


# ----------------------------------------------------------------------------- the first minutes: each mistake
class _Stopped(BaseException):
    """Raised where FedIT would begin (BaseException: no handler of the script's turns it into an exit code)."""


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """--out of a run stopped where FedIT begins (checkpoint.pt written, nothing trained; pre-training skipped):
    --rounds 2 and the default --snapshots (4), as a user who then asks for --rounds 3 --resume left it."""
    from potara_harness import pipeline

    out = tmp_path_factory.mktemp("stopped") / "run"

    def stop(*args, **kwargs):
        raise _Stopped

    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.setattr(lm, "pretrain_tiny", lambda *args, **kwargs: {})
        mp.setattr(pipeline, "federated_training", stop)
        threads = torch.get_num_threads()
        with pytest.raises(_Stopped):
            run_llm.main(
                [
                    "--rounds",
                    "2",
                    "--synthetic-examples",
                    "40",
                    "--train",
                    "24",
                    "--val",
                    "8",
                    "--test",
                    "8",
                    "--out",
                    str(out),
                    "--cache-dir",
                    str(out.parent / "cache"),
                    "--threads",
                    "1",
                ]
            )
        torch.set_num_threads(threads)
    assert (out / "checkpoint.pt").is_file()
    return out


class _NoSuchRepository(http.server.BaseHTTPRequestHandler):
    """What the Hugging Face Hub answers a HEAD of <name>/resolve/main/config.json for a model that does not exist
    (or that it does not show this user): 401, X-Error-Code RepoNotFound."""

    def do_HEAD(self):
        self.send_response(401)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("X-Error-Message", "Repository not found")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def hub():
    """{"answers": the endpoint of a Hub that knows no model, "unreachable": one where nothing listens}."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NoSuchRepository)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.socket() as s:  # a port nothing listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    yield {"answers": f"http://127.0.0.1:{server.server_address[1]}", "unreachable": f"http://127.0.0.1:{closed}"}
    server.shutdown()


ONLINE = {"HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None}  # whatever this process was given (test_potara)
LINEAR = "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"  # a Llama's nn.Linear names
MISTAKES = {  # name: (arguments, environment, what the one line says); {run}: a stopped run, {tasks}: 12 examples
    "a model name on no Hub": (
        ["--model", "nonexistent-model-xyz"],
        {"HF_ENDPOINT": "answers", **ONLINE},
        "error: --model nonexistent-model-xyz: no such model on the Hugging Face Hub and no such local folder",
    ),
    "a model name, the Hub unreachable": (
        ["--model", "nonexistent-model-xyz"],
        {"HF_ENDPOINT": "unreachable", **ONLINE},
        "error: --model nonexistent-model-xyz: not a local folder, not in the Hugging Face cache",
    ),
    "a model name, offline": (
        ["--model", "nonexistent-model-xyz"],
        {"HF_HUB_OFFLINE": "1"},
        "error: --model nonexistent-model-xyz: not a local folder and not in the Hugging Face cache",
    ),
    "a model path": (["--model", "/nonexistent/model"], {}, "error: --model /nonexistent/model: no such folder"),
    "a target module": (
        ["--targets", "q_proj", "foo_proj"],
        {},
        "error: --targets foo_proj: no nn.Linear module of the model is named foo_proj or ends in .foo_proj (LoRA "
        f"wraps nn.Linear layers); its nn.Linear modules end in {LINEAR}",
    ),
    "a number that is no number": (["--clients", "abc"], {}, "argument --clients: must be an integer in [1, 100,000]"),
    "a number out of range": (["--clients", "0"], {}, "argument --clients: must be an integer in [1, 100,000]"),
    "split sizes, synthetic tasks": (
        ["--train", "1000"],
        {},
        "error: --data synthetic: each task holds --synthetic-examples 600 examples, fewer than --train 1000",
    ),
    "split sizes, a task file": (
        ["--data", "{tasks}"],
        {},
        "error: task t: 12 distinct examples, fewer than --train 200 + --val 50 + --test 100",
    ),
    "a task folder": (["--data", "/nonexistent/tasks"], {}, "error: --data /nonexistent/tasks: no such folder"),
    "a resume with other rounds": (
        ["--out", "{run}", "--rounds", "3", "--resume", "--synthetic-examples", "40", "--train", "24", "--val", "8"]
        + ["--test", "8"],
        {},
        "checkpoint.pt was written by a run with other rounds (2 there, 3 now); rerun with the same arguments",
    ),
    "a directory where a part goes": (
        ["--out", "{run}-dir-part"],
        {},
        "-dir-part: adapters/local-0000.pt in it is not a regular file (a directory): move it away",
    ),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_each_mistake_is_one_line_naming_its_cause_before_any_work(mistake, stopped_run, hub, tmp_path):
    """run_llm.py in a fresh process with nothing cached (an empty --cache-dir and Hugging Face cache): each
    mistake is exit 2 and one line on stderr naming it, no Hugging Face warning, log line or traceback before it,
    nothing downloaded or pre-trained. --model nonexistent-model-xyz said the split sizes were too large, then
    (after a Hugging Face warning) that it could not be loaded; --targets foo_proj failed after pre-training (268 s
    on the first run) listing 20 module names; --clients abc and 0 gave two ranges; --rounds 3 --resume named
    rounds and snapshots. (Its time to the error is measured, not asserted: under a second for the checks made
    before torch loads, a few seconds after.)"""
    args, env, says = MISTAKES[mistake]
    tasks = tmp_path / "tasks"
    write_task(tasks, "t", [{"prompt": f"q{i}", "answer": "a"} for i in range(12)])
    dir_part = tmp_path / "run-dir-part"  # a run folder whose adapters/local-0000.pt is a directory
    shutil.copytree(stopped_run, dir_part)
    (dir_part / "adapters" / "local-0000.pt").mkdir(parents=True)
    cache, hf_cache = tmp_path / "cache", tmp_path / "hf-cache"
    run = stopped_run if mistake == "a resume with other rounds" else tmp_path / "run"
    argv = ["--out", str(tmp_path / "out"), *[a.format(run=run, tasks=tasks) for a in args]]
    argv += ["--cache-dir", str(cache), "--threads", "1", "--no-progress"]
    env = {"HF_HUB_CACHE": str(hf_cache), **{k: hub.get(v, v) if v else v for k, v in env.items()}}
    status, lines = script_errors("run_llm.py", argv, env)
    assert status == 2 and len(lines) == 1 and says in lines[0], (mistake, lines)
    assert "snapshots" not in lines[0] and not cache.exists() and not hf_cache.exists(), (mistake, lines)


def test_damaged_pretrain_cache_is_rebuilt(tmp_path, capsys):
    cache = tmp_path / "cache"
    first = run_llm.main(MICRO + ["--out", str(tmp_path / "a"), "--cache-dir", str(cache)])
    (cached,) = [p for p in cache.iterdir() if p.name.startswith("tiny-llama-")]
    cached.write_bytes(cached.read_bytes()[:100])  # truncated by a crash or a full disk
    capsys.readouterr()
    second = run_llm.main(MICRO + ["--out", str(tmp_path / "b"), "--cache-dir", str(cache)])
    assert "unusable" in capsys.readouterr().out
    assert {m: r["per_client"] for m, r in second["methods"].items()} == {
        m: r["per_client"] for m, r in first["methods"].items()
    }


# ----------------------------------------------------------------------------- adversarial inputs
def write_task(folder, name, rows):
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def last_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


def test_data_checks_come_before_the_model_is_loaded_or_pretrained(tmp_path, capsys):
    """Too few examples and answers longer than --max-len: exit 2 in one line, with nothing pre-trained or loaded."""
    cache = tmp_path / "cache"
    base = ["--cache-dir", str(cache), "--out", str(tmp_path / "o"), "--threads", "1", "--no-progress"]
    with pytest.raises(SystemExit) as e:  # the synthetic tasks: counted before torch loads
        run_llm.main(base + ["--train", "1000"])
    assert e.value.code == 2 and (
        "--data synthetic: each task holds --synthetic-examples 600 examples, fewer than --train 1000 + --val 50 + "
        "--test 100" in last_error(capsys)
    )
    data = tmp_path / "tasks"
    write_task(data, "t", [{"prompt": f"q{i}", "answer": "a"} for i in range(12)])
    with pytest.raises(SystemExit) as e:  # a task file: counted before a model is built or pre-trained
        run_llm.main(base + ["--data", str(data)])
    assert e.value.code == 2 and last_error(capsys) == (
        "error: task t: 12 distinct examples, fewer than --train 200 + --val 50 + --test 100"
    )
    write_task(data, "t", [{"prompt": f"q{i}", "answer": "a" * (30 if i == 3 else 1)} for i in range(12)])
    with pytest.raises(SystemExit) as e:
        run_llm.main(base + ["--data", str(data), "--train", "4", "--val", "4", "--test", "4", "--max-len", "20"])
    assert e.value.code == 2
    assert (
        last_error(capsys) == f"error: t: answer '{'a' * 30}' needs 34 tokens with its prompt, more than --max-len 20: "
        "use --max-len 34 or more"
    )
    write_task(data, "t", [{"prompt": f"q{i}", "answer": "a"} for i in range(12)])  # fits --max-len 8 ...
    with pytest.raises(SystemExit) as e:  # ... but the tiny model's pre-training corpus does not
        run_llm.main(base + ["--data", str(data), "--max-len", "8", "--train", "4", "--val", "4", "--test", "4"])
    assert e.value.code == 2 and "the public pre-training corpus: answer" in last_error(capsys)
    assert not cache.exists()  # nothing was pre-trained


def test_bad_jsonl_exits_2_with_file_and_line(tmp_path, capsys):
    data = tmp_path / "tasks"
    write_task(data, "t", [{"prompt": "p", "answer": "a"}] * 3)
    with open(data / "t.jsonl", "ab") as f:
        f.write(b'{"prompt": "\\ud800", "answer": "a"}\n')
    with pytest.raises(SystemExit) as e:
        run_llm.main(
            ["--data", str(data), "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"), "--threads", "1"]
        )
    assert (
        e.value.code == 2
        and last_error(capsys)
        == f"error: {data / 't.jsonl'}:4: 'prompt' is not valid Unicode (surrogates not allowed at character 0)"
    )


def test_a_tokenizer_without_eos_is_one_line(tmp_path, capsys):
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    folder = tmp_path / "model"
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))
    tok.save_pretrained(str(folder))
    small = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    LlamaConfig(vocab_size=2, **small).save_pretrained(str(folder))  # a model folder, its --targets q_proj v_proj
    (folder / "model.safetensors").write_bytes(b"")  # never read: the tokenizer is refused first
    with pytest.raises(SystemExit) as e:
        run_llm.main(
            [
                "--model",
                str(folder),
                "--train",
                "4",
                "--val",
                "2",
                "--test",
                "2",
                "--out",
                str(tmp_path / "o"),
                "--threads",
                "1",
            ]
        )
    assert e.value.code == 2
    assert last_error(capsys) == "error: the model's tokenizer has no eos token: answers could not be terminated"


def test_export_task_names_that_would_clash_are_refused_up_front(tmp_path, capsys):
    data = tmp_path / "tasks"
    for name in ("federated", "other"):
        write_task(data, name, [{"prompt": "p", "answer": "a"}] * 12)
    with pytest.raises(SystemExit) as e:
        run_llm.main(
            [
                "--data",
                str(data),
                "--export-peft",
                str(tmp_path / "peft"),
                "--out",
                str(tmp_path / "o"),
                "--cache-dir",
                str(tmp_path / "c"),
                "--threads",
                "1",
            ]
        )
    assert e.value.code == 2 and "--export-peft: a task named 'federated' would share a folder" in last_error(capsys)
    assert not (tmp_path / "c").exists()


def test_folder_export_is_atomic(tmp_path):
    folder = tmp_path / "peft" / "client0"
    peft_export.write_folder_atomically(
        str(folder), lambda f: os.makedirs(f) or open(os.path.join(f, "x"), "w").write("old")
    )

    def dies_halfway(f):
        os.makedirs(f)
        open(os.path.join(f, "x"), "w").write("half")
        raise KeyboardInterrupt  # e.g. Ctrl-C or a full disk in the middle of writing

    with pytest.raises(KeyboardInterrupt):
        peft_export.write_folder_atomically(str(folder), dies_halfway)
    assert os.listdir(tmp_path / "peft") == ["client0"] and (folder / "x").read_text() == "old"  # old one, no debris
    peft_export.write_folder_atomically(
        str(folder), lambda f: os.makedirs(f) or [open(os.path.join(f, n), "w").write("new") for n in ("x", "y")]
    )
    assert sorted(os.listdir(folder)) == ["x", "y"] and os.listdir(tmp_path / "peft") == ["client0"]


def test_export_never_replaces_what_it_did_not_write(tmp_path):
    """export_peft(dir, {"victim": ...}) removed dir/victim/notes.txt."""
    out = tmp_path / "peft"
    (out / "victim").mkdir(parents=True)
    (out / "victim" / "notes.txt").write_text("precious")
    (out / "afile").write_text("precious")
    (out / "elsewhere").mkdir()
    os.symlink("elsewhere", out / "alink")
    state = {
        "model.layers.0.self_attn.q_proj.lora_A": torch.ones(2, 4),
        "model.layers.0.self_attn.q_proj.lora_B": torch.zeros(4, 2),
    }
    for name, why in (
        ("victim", "holds 'notes.txt', which no export writes"),
        ("afile", r"is not a directory \(a regular file\)"),
        ("alink", "is a symbolic link"),
    ):
        with pytest.raises(UnsafeFile, match=why):
            peft_export.export_peft(str(out), {name: state}, 2.0, ["q_proj"], "base")
    assert (out / "victim" / "notes.txt").read_text() == "precious" and (out / "afile").read_text() == "precious"
    assert sorted(os.listdir(out)) == ["afile", "alink", "elsewhere", "victim"]  # no debris either
    peft_export.export_peft(str(out), {"c0": state}, 2.0, ["q_proj"], "base")
    peft_export.export_peft(str(out), {"c0": state}, 2.0, ["q_proj"], "base")  # an earlier export's folder: replaced
    assert sorted(os.listdir(out / "c0")) == sorted(peft_export.ADAPTER_FILES)


@pytest.mark.parametrize(
    "task, export, why",
    [
        ("victim", "peft", "--export-peft {peft}: victim in it holds 'notes.txt', which no export writes"),
        (
            "checkpoint.pt",
            "out",
            "--export-peft is --out: a task named 'checkpoint.pt' would replace the run's checkpoint.pt",
        ),
        ("x" * 244, "peft", "gives no usable task name (it is longer than 200 bytes)"),
        ("a\u202etxt", "peft", "holds the character U+202E"),
    ],
)
def test_export_problems_are_refused_before_any_work(tmp_path, capsys, task, export, why):
    """A task file checkpoint.pt.jsonl with --export-peft = --out turned the checkpoint into an adapter folder; a
    244-byte task name failed with a bare OSError after all the training."""
    data, peft, out = tmp_path / "tasks", tmp_path / "peft", tmp_path / "out"
    (peft / "victim").mkdir(parents=True)
    (peft / "victim" / "notes.txt").write_text("precious")
    for name in (task, "other"):
        write_task(data, name, [{"prompt": "p", "answer": "a"}] * 12)
    with pytest.raises(SystemExit) as e:
        run_llm.main(
            [
                "--data",
                str(data),
                "--export-peft",
                str(peft if export == "peft" else out),
                "--out",
                str(out),
                "--cache-dir",
                str(tmp_path / "c"),
                "--threads",
                "1",
                "--train",
                "4",
                "--val",
                "2",
                "--test",
                "2",
            ]
        )
    assert e.value.code == 2 and why.format(peft=peft) in last_error(capsys)
    assert not (tmp_path / "c").exists() and not out.exists()  # nothing trained, nothing left
    assert (peft / "victim" / "notes.txt").read_text() == "precious"


class _SplitsSeen(BaseException):
    """Raised by the stand-in run_experiment with the splits the demo built (BaseException: no handler of the
    script's turns it into an exit code)."""


def test_the_demos_validation_splits_are_not_flagged_as_training_data(tmp_path, monkeypatch):
    """run_llm.py's own splits at its defaults (the tiny model, the synthetic tasks, 8 clients): no validation
    sample is a training sample, so the held-out check names no client; the same splits read on their training
    samples name every client (the check can fail)."""
    import data
    from potara_harness import lm, pipeline

    def stop(model, splits, *args, **kwargs):
        raise _SplitsSeen(splits)

    monkeypatch.setattr(lm, "pretrain_tiny", lambda *args, **kwargs: {})  # the splits do not depend on it
    monkeypatch.setattr(pipeline, "run_experiment", stop)
    with pytest.raises(_SplitsSeen) as seen:
        run_llm.main(["--model", "tiny", "--data", "synthetic", "--out", str(tmp_path / "run"), "--no-progress"])
    splits = seen.value.args[0]
    assert len(splits) == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert data.warn_held_out_overlap(splits) == []
    with pytest.warns(UserWarning):
        assert data.warn_held_out_overlap(splits, "train") == [s.name for s in splits]


# ----------------------------------------------------------------------------- every obstacle in the folders it writes
@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(world, out, peft, files): the --out and --export-peft folders a real micro run wrote (its cache in world),
    and every file path it wrote in each, recorded as it wrote them ({"--out": ..., "--export-peft": ...})."""
    world = tmp_path_factory.mktemp("llm-world")
    threads = torch.get_num_threads()
    with contextlib.redirect_stdout(io.StringIO()), recorded_writes(world / "run") as out_files:
        with recorded_writes(world / "peft") as peft_files:
            run_llm.main(micro_argv(world / "run", world / "peft", world / "cache"))
    torch.set_num_threads(threads)
    return world, world / "run", world / "peft", {"--out": out_files, "--export-peft": peft_files}


def micro_argv(out, peft, cache) -> list[str]:
    return MICRO + ["--out", str(out), "--export-peft", str(peft), "--cache-dir", str(cache), "--threads", "1"]


def test_every_obstacle_in_the_out_and_export_folders_is_one_line_before_any_work(written, tmp_path, capsys):
    """run_llm.py on the trees a real run wrote, one obstacle at one path of either (tests/obstacles.py): exit 2,
    one error line naming the flag, the folder and the path, no traceback, nothing outside changed, the planted
    folder as it was. --out: its files and part folders (run_folder's checks); --export-peft: every task's,
    federated's and base_model's folder and file (peft_export.export_target_problem). Among them a directory at
    each file path the run wrote in either, as it wrote them (obstacles.recorded_writes)."""
    world, out_tree, peft_tree, files = written
    assert sorted(p for p in paths_of(peft_tree) if p.count("/") == 1 and p.endswith("/") and p != "./") == [
        "base_model/",
        "duplicate/",
        "federated/",
        "sentiment/",
    ]
    done = []
    for flag, tree in (("--out", out_tree), ("--export-peft", peft_tree)):
        for case in planted_cases(tree, tmp_path / flag.strip("-")):
            planted_in, rel, kind = case.folder, case.rel, case.kind
            out = planted_in if flag == "--out" else planted_in.parent / "out"  # a new --out: no run to resume
            peft = planted_in if flag == "--export-peft" else planted_in.parent / "peft"
            with pytest.raises(SystemExit) as e:
                unprivileged(run_llm.main, micro_argv(out, peft, world / "cache"))
            err = capsys.readouterr().err
            errors = [line for line in err.splitlines() if "error:" in line]
            assert e.value.code == 2 and len(errors) == 1 and "Traceback" not in err, (flag, rel, kind, err)
            name = rel.rstrip("/").split("/")[0] if rel != "./" else ""
            assert f"{flag} {planted_in}" in errors[0] and name in errors[0], (flag, rel, kind, errors)
            after = {k: v for k, v in snapshot(planted_in).items() if k != ".lock"}
            assert after == {k: v for k, v in case.planted.items() if k != ".lock"}, (flag, rel, kind)
            done.append((flag, rel, kind))
        directories = {rel for f, rel, kind in done if f == flag and kind == "directory"}
        assert files[flag] and directories >= files[flag], (flag, files[flag] - directories)  # each path written
    assert len(done) > 4 * 10 + 1 + 4 * 4 + 4 * 10 + 1, len(done)
