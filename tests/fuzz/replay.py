"""Replaying a saved input (tests/fuzz/regressions/*.json, or a fuzz run's findings).

Each replay gets a fresh gearmand, a fresh fake gearmand (answering like gearmand, with no
attacks of its own) and a fresh gproxy with the file's `config`, plays the script, lets every
connection go, and holds the result to the same invariants as a fuzz run:

- the script's own `require` steps, and every connection's checks (checks.py);
- WARNING lines for bad input (close lines, retry connections lost for bad input) == the
  increase of gproxy_protocol_errors_total, per reason;
- no traceback and no ERROR record in gproxy's log; gproxy still running, and it exits 0;
- every close line names its peer;
- gproxy's open fds back to what they were before the script (its retry connections, which
  it keeps once it has needed one, counted apart), RSS within 10 MiB;
- the real gearmand still running;
- retry_reconnects and held_progress (retries.py) on gproxy's retry connections to the fake.

`config` keys: max_packet_size (default 65536), rss_bound (bytes), retry_functions (list).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from tests.fuzz import checks
from tests.fuzz.attacker import RETRY_FUNCTION, RetryHelper
from tests.fuzz.fake_gearmand import RETRY_FUNCTIONS, FakeGearmand
from tests.fuzz.monitor import (
    agreement,
    exception_line,
    read_log,
    resources,
    retry_losses,
)
from tests.fuzz.procs import REPO, Gproxy, RetrySettings, config_text
from tests.fuzz.retries import check_held_progress, check_reconnects, hold_ends
from tests.fuzz.script import Env, Player, Run, Script
from tests.gearmand import Gearmand

MiB = 1 << 20


@dataclass
class Replay:
    path: Path
    script: Script
    problems: list[str] = field(default_factory=list)
    run: Run | None = None
    log: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        head = f"{'PASS' if self.ok else 'FAIL'} {self.path.name}: {self.script.invariant or self.script.name}"
        return "\n".join([head, *(f"    {p}" for p in self.problems)])


def load(path: Path) -> Script:
    return Script.from_json(json.loads(path.read_text()))


def replay(path: Path, *, src: Path = REPO, workdir: Path | None = None) -> Replay:
    script = load(path)
    result = Replay(path, script)
    workdir = workdir or Path(tempfile.mkdtemp(prefix="gproxy-replay-"))
    gearmand = Gearmand(workdir / "gearmand").start()
    try:
        trio.run(_replay, result, gearmand, src, workdir)
    finally:
        gearmand.stop()
    return result


async def _replay(result: Replay, gearmand: Gearmand, src: Path, workdir: Path) -> None:
    script = result.script
    config = script.config
    max_size = int(config.get("max_packet_size", 65536))
    fake = FakeGearmand(0, max_size, attack_rate=0.0, retry_attack_rate=0.0)
    fake.retry_scripted = any(s["op"] == "accept" and s.get("retry") for s in script.steps)
    problems = result.problems
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        functions = tuple(config.get("retry_functions", (RETRY_FUNCTION, *RETRY_FUNCTIONS)))
        gproxy = Gproxy(workdir / "gproxy", config_text([gearmand.address, fake.address], max_packet_size=max_size,
                                                        retry=RetrySettings(functions=functions)), src=src)
        await trio.to_thread.run_sync(gproxy.start)
        helper = RetryHelper(gearmand.address)
        nursery.start_soon(helper.run)
        env = Env(gproxy.listen(gearmand.address), gproxy.listen(fake.address), gearmand.address, gproxy, fake, max_size)
        try:
            before = await trio.to_thread.run_sync(resources, gproxy)
            run = await Player(env, script, time_limit=float(config.get("time_limit", 60))).play()
            result.run = run
            fake.close_all()
            after = await _settled(gproxy, before)
            observed_until = time.time()
            if not gproxy.alive():
                problems.append("gproxy keeps running: it exited")
            if gearmand.proc is None or gearmand.proc.poll() is not None:
                problems.append("gearmand keeps running: it died (see its log)")
        finally:
            nursery.cancel_scope.cancel()
    code = await trio.to_thread.run_sync(gproxy.stop)
    text = gproxy.log_text()
    result.log = text
    log = read_log(text)
    upstreams = {"A": "{}:{}".format(*gearmand.address), "B": "{}:{}".format(*fake.address)}
    index = checks.CloseIndex.of(log.closes)
    digested = checks.digest(run, max_size)
    lines = checks.assign_lines([digested], index, upstreams)
    problems += checks.check_run(digested, lines, 0)
    delta = {r: after.protocol_errors.get(r, 0) - before.protocol_errors.get(r, 0) for r in after.protocol_errors}
    unnamed = sum(1 for c in log.closes if c.level == "WARNING" and c.protocol_reason is None
                  and not c.reason.startswith(("gearmand unreachable", "gproxy cannot open")))
    problems += [f"log_metric: {m}" for m in agreement(delta, log.warnings_by_reason, retry_losses(log)[1], unnamed)]
    problems += [f"clean_log: traceback: {exception_line(t)}" for t in log.tracebacks]
    problems += [f"clean_log: {line}" for line in log.errors]
    if code != 0:
        problems.append(f"clean_log: gproxy exited {code}")
    problems += [f"named_peers: a close line names no peer: peer {c.peer}: {c.reason}" for c in index.unnamed]
    # gproxy keeps a retry connection once it has needed one (it connects again after a
    # loss): those are counted apart, as the fuzz run counts them.
    retry = int(after.upstream_connections - before.upstream_connections)
    if after.fds != before.fds + retry:
        problems.append(f"resources: gproxy's fds {before.fds} -> {after.fds}"
                        + (f" (its retry connections: {retry:+d})" if retry else ""))
    rss_bound = int(config.get("rss_bound", 10 * MiB))
    if after.rss > before.rss + rss_bound:
        problems.append(f"resources: gproxy's RSS {before.rss / MiB:.1f} -> {after.rss / MiB:.1f} MiB")
    problems += [f"retry_reconnects: {d}" for d in check_reconnects(fake.retry_connections).details]
    progress = check_held_progress(fake.retry_connections, fake.jobs, hold_ends(text), observed_until)
    problems += [f"held_progress: {d}" for d in progress.details]
    if after.worker_connections or after.held:
        problems.append(f"resources: {after.worker_connections:g} worker connections and {after.held:g} held jobs left")


async def _settled(gproxy: Gproxy, before: object, timeout: float = 25.0):  # type: ignore[no-untyped-def]
    deadline = trio.current_time() + timeout
    while True:
        now = await trio.to_thread.run_sync(resources, gproxy)
        if (now.worker_connections == 0 and now.held == 0) or trio.current_time() >= deadline:
            await trio.sleep(0.3)
            return await trio.to_thread.run_sync(resources, gproxy)
        await trio.sleep(0.1)


def replay_files(paths: list[Path], *, src: Path = REPO) -> bool:
    ok = True
    for path in paths:
        result = replay(path, src=src)
        print(result.describe(), flush=True)
        ok = ok and result.ok
    return ok
