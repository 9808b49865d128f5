"""The Flower ServerApp of Potara: FedIT across real processes, then Potara on every client.
Declared in pyproject.toml ([tool.flwr.app.components]); started by `flwr run . <connection>` against
a running SuperLink (docs/flower.md).

    1. setup: wait for num-clients SuperNodes; ask each who it is (partition-id k, n_k, backbone hash,
       phi_0). Partition ids must be 0..K-1 once each; every client must hold the same backbone file
       and build the same phi_0, and n_k must be the run config's `train` (else the run stops with a
       one-line reason). n_k is then fixed: it is client k's FedAvg weight in every round.
    2. rounds t = 0..R-1, each the in-process fed.run_fedit's round, with messages instead of calls:
         S_t, drop-outs = fed.sample_clients(seed, t, K, clients-per-round, drop-prob)
         send phi^t to every k in S_t (float32 ArrayRecord); k answers fed.local_update's reply
         phi^{t+1} = fed.server_round(...): every reply validated (potara_guards.updates.reply_problem), the
         accepted ones averaged by fed.fedavg in partition order, whatever order the replies arrived in
       A client that answers with an error, an unreadable reply (another n_k than set-up's included),
       nothing within round-timeout, or whose node the SuperLink reports dead (replies.ask) is recorded
       in the round's "failed" (with its reason) and counted as dropped: it never vanishes, and the
       round goes on with the others. Before each round a missing client may rejoin (rejoin).
       checkpoint.pt (checkpoint.RunState, atomic) after every round; resume=true continues it.
    3. personalise: send phi_R to every client; each trains phi_L, runs Potara on its own validation
       split and returns its test accuracies, a, b, c and lam (client_app.personalize). Its timeout is
       personalize-timeout (AppConfig.final_timeout: by default round-timeout scaled by the step's work);
       each record is checked (replies.check_evaluation) and a bad one is that client's failure.
    0. out-dir: checked and locked as the scripts' --out (run_folder.out_dir_problem, run_lock) before any
       message is sent: a planted link, a folder where a file goes or another run holding it is one line.
    4. out-dir/results.json and results.md with the in-process pipeline's fields (report.write_outputs),
       plus "flower": wire bytes (npy-serialised arrays with their keys) and wall time per stage. A client
       missing from them is named in one log line (missing_lines) and in results.md, with the others' results;
       the run ends finished:completed (missing_lines says why not failed).

bytes_down / bytes_up in the history are fed.run_fedit's (numel * element_size of the adapters sent);
wire_bytes_* add Flower's serialisation (npy headers, keys) to them; message envelopes are not counted.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import time
from dataclasses import asdict, dataclass, field

import torch
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.serverapp import Grid, ServerApp

from fed import FedState, sample_clients, server_round, state_bytes
from potara_flower.replies import ask, check_evaluation, short, train_reply
from potara_flower.task import (
    ADAPTER,
    CONFIG,
    EVALUATE,
    SETUP,
    SETUP_SHA256,
    TIMINGS,
    TRAIN,
    from_record,
    record_bytes,
    to_record,
    unflatten,
)
from potara_guards.tensor_checks import check_tensors
from potara_guards.updates import reply_problem
from potara_harness.checkpoint import RunState, fed_dict, load_state, save_state
from potara_harness.config import AppConfig, update_bound
from potara_harness.report import (
    METHOD_LABELS,
    collect_results,
    mean,
    sent_bytes,
    write_outputs,
)
from potara_harness.run_folder import RunFolderError, out_dir_problem, run_lock

app = ServerApp()


@dataclass
class Roster:
    """The federation: client k (partition id k) is SuperNode node_ids[k], named names[k], with n_k examples.
    n_k is fixed at set-up: it is client k's FedAvg weight in every round (a train reply with another count fails).
    strangers: nodes that answered a rejoin query with something unusable (not asked again)."""

    node_ids: list[int]
    names: list[str]
    num_examples: list[int]
    backbone_sha256: str
    strangers: set = field(default_factory=set)

    def index_of(self, node_id: int) -> int | None:
        return self.node_ids.index(node_id) if node_id in self.node_ids else None


def identity(cfg: AppConfig, reply) -> tuple[int, int, str, dict]:
    """A set-up reply -> (partition id k, n_k, backbone sha256, phi_0); ValueError/KeyError/TypeError if malformed.
    n_k must be the run config's `train`: every partition holds exactly that many training images
    (data.split_client), so a client cannot claim a larger FedAvg weight than its share."""
    c = reply.content[CONFIG]
    k, n_k, sha = c["partition-id"], c["num-examples"], c["backbone-sha256"]
    if type(k) is not int or not 0 <= k < cfg.num_clients:
        raise ValueError(f"partition-id {short(k, 40)} is not in 0..{cfg.num_clients - 1}")
    if type(n_k) is not int or n_k != cfg.train:
        raise ValueError(f"num-examples {short(n_k, 40)} is not the run config's train = {cfg.train}")
    if not isinstance(sha, str):
        raise ValueError("backbone-sha256 is not a string")
    return k, n_k, sha, from_record(reply.content[ADAPTER])


def connect(grid: Grid, cfg: AppConfig) -> tuple[Roster, dict[str, torch.Tensor]]:
    """Wait for num-clients SuperNodes, then ask each who it is; the roster in partition order and phi_0."""
    deadline = time.time() + cfg.connect_timeout
    while len(nodes := sorted(grid.get_node_ids())) < cfg.num_clients:
        if time.time() > deadline:
            raise RuntimeError(
                f"only {len(nodes)} of num-clients={cfg.num_clients} SuperNodes connected within "
                f"connect-timeout={cfg.connect_timeout:g} s"
            )
        time.sleep(1.0)
    replies, failed = ask(grid, nodes, SETUP, lambda n: RecordDict({CONFIG: ConfigRecord({})}), cfg.round_timeout)
    if failed:
        raise RuntimeError("setup failed: " + "; ".join(f"node {n}: {why}" for n, why in failed.items()))
    info = {}
    for n, r in replies.items():  # untrusted: any malformed reply stops the set-up with one line
        try:
            info[n] = identity(cfg, r)
        except Exception as e:
            raise RuntimeError(f"setup failed: node {n}: unreadable reply ({type(e).__name__}: {short(e)})") from None
    by_partition = {part: n for n, (part, *_) in info.items()}
    if sorted(by_partition) != list(range(cfg.num_clients)) or len(by_partition) != len(nodes):
        raise RuntimeError(
            f"the SuperNodes' partition ids {sorted(i[0] for i in info.values())} are not "
            f"0..{cfg.num_clients - 1} once each (node config partition-id)"
        )
    node_ids = [by_partition[k] for k in range(cfg.num_clients)]
    phi0, sha = info[node_ids[0]][3], info[node_ids[0]][2]
    for k, n in enumerate(node_ids):
        if not same_model(info[n], sha, phi0):
            raise RuntimeError(
                f"client{k} holds another backbone file or builds another phi_0 than client0: "
                "every SuperNode needs the same backbone file and the same run config"
            )
    roster = Roster(node_ids, [f"client{k}" for k in range(cfg.num_clients)], [info[n][1] for n in node_ids], sha)
    return roster, phi0


def same_model(info: tuple, sha: str, phi0: dict) -> bool:
    """Whether a client's set-up identity has the backbone hash `sha` and builds phi0 bitwise."""
    phi = info[3]
    check_tensors(phi, phi0, what=f"partition {info[0]}'s phi_0 (against client0's)")
    return info[2] == sha and all(torch.equal(phi[key], v) for key, v in phi0.items())


def rejoin(grid: Grid, cfg: AppConfig, roster: Roster, phi0: dict) -> None:
    """Before a round and the final step: a client whose SuperNode is no longer online may come back as a new
    node (a restarted SuperNode without a registered key gets a new node id; one with a key keeps its id and
    needs nothing). Nodes online but not in the roster are asked who they are (set-up's query, once each); one
    that is a missing client (same partition id, n_k, backbone and phi_0) takes its place. Nothing is sent
    while every client's node is online: a run without failures exchanges exactly the same messages."""
    online = set(grid.get_node_ids())
    gone = {k for k, n in enumerate(roster.node_ids) if n not in online}
    new = sorted(online - set(roster.node_ids) - roster.strangers)
    if not gone or not new:
        return
    replies, failed = ask(grid, new, SETUP, lambda n: RecordDict({CONFIG: ConfigRecord({})}), cfg.round_timeout)
    for n, why in failed.items():
        print(f"node {n} (not in the federation) did not say who it is: {why}")
    for n, r in replies.items():
        try:
            k, n_k, *_ = info = identity(cfg, r)
            ok = k in gone and n_k == roster.num_examples[k] and same_model(info, roster.backbone_sha256, phi0)
        except Exception as e:
            k, ok = f"unreadable reply ({type(e).__name__}: {short(e)})", False
        if ok:
            print(f"{roster.names[k]} rejoined as node {n} (was node {roster.node_ids[k]})")
            roster.node_ids[k] = n
            gone.discard(k)
        else:
            print(f"node {n} is not a missing client of this run (partition {k}): ignored")
    roster.strangers.update(n for n in new if n not in roster.node_ids)


def fingerprint(cfg: AppConfig, roster: Roster, phi0: dict) -> str:
    """What the checkpointed adapter depends on: the training settings, the backbone, phi_0 and the clients."""
    training = {
        k: v
        for k, v in asdict(cfg).items()
        if k
        in (
            "num_clients",
            "rounds",
            "local_steps",
            "clients_per_round",
            "lr",
            "batch_size",
            "rank",
            "lora_alpha",
            "seed",
            "preset",
            "data",
            "synthetic_per_class",
            "partition",
            "alpha",
            "public",
            "train",
            "val",
            "test",
            "drop_prob",
            "max_update_norm",
        )
    }
    training.pop("rounds")  # more rounds continue a finished run
    training.update(experiment_settings(cfg))
    phi = hashlib.sha256(b"".join(phi0[k].numpy().tobytes() for k in sorted(phi0))).hexdigest()
    return json.dumps(
        {"flower": training, "backbone": roster.backbone_sha256, "phi0": phi, "clients": roster.num_examples},
        sort_keys=True,
    )


def experiment_settings(cfg: AppConfig) -> dict:
    """The language experiment's settings that shape its adapter, for the fingerprint: the experiment itself, max-len
    (it cuts the prompts), synthetic-examples (it draws the synthetic tasks) and targets; none for the vision
    experiment, whose fingerprint (and so its checkpoints) stays as it was. The model is in the fingerprint by its
    hash (the set-up's backbone-sha256, which a language client computes over its model file or folder)."""
    if cfg.experiment != "language":
        return {}
    return {
        "experiment": cfg.experiment,
        "max_len": cfg.max_len,
        "synthetic_examples": cfg.synthetic_examples,
        "targets": cfg.target_modules,
    }


def fedit_round(grid: Grid, cfg: AppConfig, roster: Roster, fed: FedState, t: int) -> None:
    """Round t (module docstring, step 2); updates `fed` in place. A reply is parsed whole (adapter, n_k equal to
    set-up's, finite loss and timings) before it is kept: it is either averaged or failed, never both."""
    t0, K = time.time(), len(roster.node_ids)
    selected, dropped = sample_clients(cfg.seed, t, K, cfg.per_round, cfg.drop_prob)
    record = to_record(fed.global_state)
    content = lambda n: RecordDict(
        {
            ADAPTER: record,
            CONFIG: ConfigRecord(
                {"round": t, "drop": roster.index_of(n) in dropped, SETUP_SHA256: roster.backbone_sha256}
            ),
        }
    )
    answers, failed = ask(grid, [roster.node_ids[k] for k in selected], TRAIN, content, cfg.round_timeout)
    failures = [{"client": roster.names[roster.index_of(n)], "reason": why} for n, why in failed.items()]
    replies, wire_up, seconds = {}, 0, {}
    for n, r in answers.items():
        k = roster.index_of(n)
        if k in dropped:
            continue  # a simulated drop-out: it received phi^t and sent nothing back
        try:
            reply, took, size = train_reply(r, roster.num_examples[k], TIMINGS)
        except Exception as e:  # an unreadable reply: recorded, never raised, nothing of it kept
            failures.append({"client": roster.names[k], "reason": f"unreadable reply: {type(e).__name__}: {short(e)}"})
            continue
        replies[k], seconds[roster.names[k]], wire_up = reply, took, wire_up + size
    outcome = server_round(
        t, fed.global_state, selected, replies, roster.names, update_bound(cfg.max_update_norm), problem=reply_problem
    )
    fed.global_state, fed.round = outcome.global_state, t + 1
    fed.history.append(
        {
            **outcome.history,
            "failed": sorted(failures, key=lambda f: f["client"]),
            "wire_bytes_down": record_bytes(record) * len(selected),
            "wire_bytes_up": wire_up,
            "seconds": time.time() - t0,
            "client_seconds": dict(sorted(seconds.items())),
        }
    )


def personalize_all(grid: Grid, cfg: AppConfig, roster: Roster, G: dict) -> tuple[dict, list]:
    """Step 3: every client's checked evaluation ({name: tree}, replies.check_evaluation), and the clients that
    failed (no reply within personalize-timeout, an error, a record that is not an evaluation's)."""
    record = to_record(G)
    content = lambda n: RecordDict({ADAPTER: record, CONFIG: ConfigRecord({SETUP_SHA256: roster.backbone_sha256})})
    answers, failed = ask(grid, roster.node_ids, EVALUATE, content, cfg.final_timeout)
    out, bad = {}, [{"client": roster.names[roster.index_of(n)], "reason": why} for n, why in failed.items()]
    for n, r in answers.items():
        name = roster.names[roster.index_of(n)]
        try:  # untrusted: one client's record must not erase or poison the others' results
            out[name] = check_evaluation(unflatten(r.content[CONFIG]), cfg.grid_step)
        except Exception as e:
            bad.append({"client": name, "reason": f"unreadable reply: {type(e).__name__}: {short(e)}"})
    return out, sorted(bad, key=lambda f: f["client"])


def collect_server_results(
    cfg: AppConfig,
    context: Context,
    roster: Roster,
    fed: FedState,
    phi0: dict,
    evals: dict,
    eval_failed: list,
    timing: dict,
) -> dict:
    """report.collect_results for the methods that ran (no FedSA-LoRA, curve at round R only), plus what only a
    deployment has: the run config, the roster, wire bytes and the clients that failed."""
    names = [n for n in roster.names if n in evals]
    if not names:
        raise RuntimeError("no client returned its personalisation results: " + json.dumps(eval_failed))
    methods = [m for m in METHOD_LABELS if all(m in evals[n]["acc"] for n in names)]
    acc = {m: {n: float(evals[n]["acc"][m]) for n in names} for m in methods}
    curve = [
        {"round": 0, "bytes": 0, "fedit": None, "potara": None, "local": mean(acc["local"].values())},
        {
            "round": fed.round,
            "bytes": sent_bytes(fed.history),
            "fedit": mean(acc["fedit"].values()),
            "potara": mean(acc["potara_ab"].values()),
        },
    ]
    config = {
        "engine": "flower",
        "run_config": dict(context.run_config),
        "backbone_sha256": roster.backbone_sha256,
        "num_examples": dict(zip(roster.names, roster.num_examples)),
    }
    # outside FedIT's history (as in the pipeline, not charged to any method): phi_0 from every client at
    # set-up, phi_R to every client for the Potara step
    wire = {
        "wire_bytes": record_bytes(to_record(phi0)),
        "setup_bytes_up": state_bytes(phi0) * len(roster.names),
        "final_bytes_down": state_bytes(phi0) * len(roster.names),
    }
    fallbacks = [{"client": n, "reason": r} for n in names for r in evals[n].get("fallbacks", [])]
    statistics = [{"client": n, "what": w} for n in names for w in evals[n].get("bad-statistics", [])]
    return collect_results(
        config,
        cfg.pipeline_config(),
        names,
        acc,
        {n: evals[n]["record"] for n in names},
        curve,
        phi0,
        fed.history,
        None,
        fallbacks,
        statistics,
        timing,
        adapter_extra=wire,
        faults_extra={"personalization_failed": eval_failed},
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = AppConfig.from_run_config(context.run_config)
    out_dir = os.path.abspath(cfg.out_dir)
    problem = out_dir_problem(out_dir, "out-dir")  # the scripts' checks of --out, before any round
    if problem:
        raise RunFolderError(problem)
    with run_lock(out_dir, "out-dir"):  # the scripts' lock: a run_cifar.py run holding this folder is never overwritten
        run(grid, context, cfg, out_dir)


def run(grid: Grid, context: Context, cfg: AppConfig, out_dir: str) -> None:
    """The run, once out-dir is checked and locked: set-up, the rounds, the final step, the results."""
    ckpt = os.path.join(out_dir, "checkpoint.pt")
    timing, t0 = {}, time.time()
    roster, phi0 = connect(grid, cfg)
    timing["setup"], t0 = time.time() - t0, time.time()
    run_state = RunState(fingerprint(cfg, roster, phi0))
    if cfg.resume and os.path.exists(ckpt):
        # ResumeError (one line) if not this run's, or if any part is unsound for this federation
        run_state = load_state(
            ckpt, run_state.fingerprint, adapter=phi0, clients=roster.names, rounds=cfg.rounds, flower=True
        )
        print(f"resuming from {ckpt} at round {run_state.fedit['round']}")
    fed = run_state.fed_state("fedit") or FedState(0, dict(phi0), {n: {} for n in roster.names})
    check_tensors(fed.global_state, phi0, what=f"{ckpt}'s global adapter")
    for t in range(fed.round, cfg.rounds):
        rejoin(grid, cfg, roster, phi0)
        fedit_round(grid, cfg, roster, fed, t)
        run_state.fedit = fed_dict(fed)
        save_state(run_state, ckpt)
        h = fed.history[-1]
        print(
            f"round {t + 1}/{cfg.rounds}: {len(h['clients']) - len(h['dropped'])}/{len(h['clients'])} answered, "
            f"{len(h['rejected'])} rejected, {len(h['failed'])} failed, mean loss {h['mean_train_loss']}"
            + "".join(f"\n  {f['client']} failed: {f['reason']}" for f in h["failed"])
        )
    timing["fedit"], t0 = time.time() - t0, time.time()
    rejoin(grid, cfg, roster, phi0)
    evals, eval_failed = personalize_all(grid, cfg, roster, fed.global_state)
    timing["personalize"] = time.time() - t0
    results = collect_server_results(cfg, context, roster, fed, phi0, evals, eval_failed, timing)
    # this ServerApp process's peak resident memory (Linux reports KiB): what a server holds for K clients
    results["server_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    write_outputs(results, out_dir)
    print(f"results in {out_dir}/results.json")
    for line in missing_lines(eval_failed, len(roster.names), out_dir):
        print(line)


def missing_lines(eval_failed: list, num_clients: int, out_dir: str) -> list[str]:
    """One log line per client missing from the final results: its name, its reason, where the others' are.

    The run still ends finished:completed. It did what a federated run does when a device is lost: every round
    went on with the others and every client that answered got its results. A missing client is an outcome, kept
    in results.json (faults.personalization_failed) and results.md (faults:). Raising instead would give
    finished:failed, but flwr 1.42 logs every exception the ServerApp raises with its traceback ("ServerApp raised
    an exception", exit code 201), so the operator would read a crash where there is none."""
    others = num_clients - len(eval_failed)
    whose = "the other client's" if others == 1 else f"the other {others} clients'"
    return [
        f"MISSING {f['client']}: {' '.join(str(f['reason']).split())}; {whose} results are in "
        f"{out_dir}/results.md (and results.json)"
        for f in eval_failed
    ]
