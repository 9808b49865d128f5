"""The suite's real federations (a SuperLink and SuperNodes on 127.0.0.1), each run in a thread of its own from
the session's start while the other tests run. A real federation is mostly processes starting (a ClientApp
process per message, each importing torch and flwr) and waits on Flower's own clocks (a SuperNode pulls every
3 s, a dead one is declared after two 30 s heartbeats). Their processes run at niceness NICE: the session's
tests, one thread, keep one core, and the federations take the other and whatever the tests leave (here the
three took ~205 s of wall time beside the rest of the suite, ~110 s at most one by one). A helper module, not a
test module.

    register("kill", prepare_kill, run_kill)      # a test module, at import
    @pytest.mark.federation("kill")
    def test_kill(federation_result): ...         # conftest.py's fixture: run_kill's return value

prepare(folder) -> (federation, made) runs in the main thread before any test (anything touching torch's global
state or os.environ: a backbone file, an in-process reference run, the LocalFederation, which copies the
environment); run(federation, folder, made) runs in the thread and only starts processes and reads files.
conftest.py starts the federations whose tests are selected (pytest_collection_finish) and puts their tests
last, a test waits for its own result (the thread's exception re-raised there), and every federation is stopped
by its processes' pids when its run ends and again when the session ends.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

SCENARIOS: dict[str, tuple[Callable, Callable]] = {}  # name -> (prepare(folder), run(federation, folder, made))
WAIT_SECONDS = 600.0  # a test waits at most this long for its federation
NICE = 10  # the federations' processes yield to the session's tests (one thread) and take the other core


def register(name: str, prepare: Callable, run: Callable) -> None:
    SCENARIOS[name] = (prepare, run)


class Background:
    """The threads that run the selected scenarios, one each, and what each one ended with."""

    def __init__(self, names: list[str], folder_of: Callable[[str], Path]):
        self.folders = {name: folder_of(name) for name in names}
        self.prepared = {name: SCENARIOS[name][0](self.folders[name]) for name in names}  # main thread
        self.federations = {name: federation for name, (federation, _) in self.prepared.items()}
        for federation in self.federations.values():
            federation.nice = NICE  # before it starts anything
        self.done = {name: threading.Event() for name in names}
        self.results: dict[str, tuple[bool, object]] = {}
        for name in names:
            threading.Thread(target=self._run, args=(name,), name=f"federation-{name}", daemon=True).start()

    def _run(self, name: str) -> None:
        federation, made = self.prepared[name]
        try:
            self.results[name] = (True, SCENARIOS[name][1](federation, self.folders[name], made))
        except BaseException as e:  # re-raised in the test that asks for it
            self.results[name] = (False, e)
        finally:
            federation.stop()
            self.done[name].set()

    def result(self, name: str):
        """The scenario's return value (its folder is `folders[name]`), or its exception raised here."""
        if not self.done[name].wait(WAIT_SECONDS):
            raise TimeoutError(f"the {name} federation did not end within {WAIT_SECONDS:g} s")
        ok, value = self.results[name]
        if not ok:
            raise value
        return value

    def stop(self) -> None:
        """Every federation's processes, by their pids (also those of a run the session interrupted)."""
        for federation in self.federations.values():
            federation.stop(grace=5)
