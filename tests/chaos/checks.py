"""The invariants a chaos run must keep, each checked on the finished History with a figure.

A check that names jobs ("offenders") gets their timelines printed when it fails. What a
fault may excuse is decided by History.touches(): an extra run of a job, a run beyond
max_attempts, a run after the job's answer, a final answer that came early (a retryable
failure before the last attempt, a WORK_FAIL with no failed attempt) are explained when a
fault touched the job during its life; an answer that no attempt of the job produced is
never explained.
"""

from __future__ import annotations

import math

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from tests.chaos.history import History, JobHistory, exception_text, token_of
from tests.chaos.scripts import FUNCTIONS, ON_FAIL, outcome_of
from tests.chaos.world import Samples, metric

RSS_BOUND_KIB = 20 * 1024
CHAOS_PHASES = ("warmup", "chaos")
OUTCOMES = ("complete", "fail", "exception")
REASONS = ("exception", "fail", "worker_hint", "disconnect")


@dataclass(slots=True)
class Check:
    name: str
    ok: bool
    figure: str
    offenders: list[tuple[str, str]] = field(default_factory=list)
    """(job id, what is wrong); their timelines are printed when the check fails."""
    notes: list[str] = field(default_factory=list)
    """Other lines to print when it fails (log lines, counter differences)."""

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.name}: {self.figure}"


def _causes(history: History, h: JobHistory, start: float | None = None, end: float | None = None) -> list[str]:
    return sorted({f.kind for f in history.explaining(h, start, end)})


def answered_once(history: History) -> Check:
    fg = [h for h in history.jobs.values() if not h.job.bg]
    counts = Counter(min(len(h.answers), 2) for h in fg)
    offenders = [(h.job.id, f"{len(h.answers)} answers") for h in fg if len(h.answers) > 1]
    offenders += [(h.job.id, "no answer") for h in fg if not h.answers]
    return Check("every foreground job answered exactly once", not offenders,
                 f"{counts[1]} of {len(fg)} answered once, {counts[0]} never, {counts[2]} more than once", offenders)


def none_lost(history: History) -> Check:
    offenders = []
    for h in history.jobs.values():
        if h.handle is None:
            offenders.append((h.job.id, f"never accepted by gearmand ({h.client_error or 'no JOB_CREATED'})"))
        elif not h.job.bg and not h.answers and (h.client_error or not (h.status_at_deadline or {}).get("known")):
            offenders.append((h.job.id, f"unanswered and gone from gearmand ({h.client_error or h.status_at_deadline})"))
    return Check("no job lost", not offenders,
                 f"{len(history.jobs) - len(offenders)} of {len(history.jobs)} accepted and answered or still known",
                 offenders)


def none_hung(history: History, bound: float) -> Check:
    fg = [h for h in history.jobs.values() if not h.job.bg]
    offenders = [(h.job.id, f"unanswered after {bound:g}s, gearmand still has it ({h.status_at_deadline})")
                 for h in fg if not h.answers and h.handle is not None and (h.status_at_deadline or {}).get("known")]
    latencies = [(h.answer.t - h.submitted_t, h.job.id) for h in fg if h.answer is not None]
    slowest = max(latencies, default=(0.0, "-"))
    return Check(f"no foreground job hung past {bound:g}s", not offenders,
                 f"{len(offenders)} hung; slowest answer {slowest[0]:.2f}s ({slowest[1]})", offenders)


def _final(history: History, h: JobHistory, attempt_n: int, action: str) -> bool:
    """Would gproxy end the job with this attempt's outcome (without faults)?"""
    _, reason = outcome_of(h.job.fn, action)
    return reason is None or attempt_n >= history.max_attempts


def background_executed(history: History) -> Check:
    bg = [h for h in history.jobs.values() if h.job.bg]
    offenders = []
    for h in bg:
        if not h.attempts:
            offenders.append((h.job.id, "never ran"))
            continue
        last = h.attempts[-1]
        if last.t_end is None:
            if not _causes(history, h):
                offenders.append((h.job.id, f"its last attempt {last.token} never ended"))
        elif not _final(history, h, last.n, last.action) and not _causes(history, h, end=math.inf):
            # (A fault after its last run may have ended it early: a retry connection reset
            # while the last attempt's retry job waited in gearmand counts that attempt, as
            # it may have run, and then gproxy gives the job up; no worker ever ran it.)
            offenders.append((h.job.id, f"its last attempt {last.token} ended {last.out}, which gproxy retries"))
    runs = sum(len(h.attempts) for h in bg)
    return Check("every background job executed", not offenders,
                 f"{len(bg) - len(offenders)} of {len(bg)} ran to a final outcome ({runs} runs)", offenders)


def answers_match(history: History) -> Check:
    """Each answer is the outcome of an attempt of that job that really ended that way."""
    offenders, kinds, excused = [], Counter(), 0
    for h in history.jobs.values():
        answer = h.answer
        if h.job.bg or answer is None:
            continue
        kinds[answer.type] += 1
        hard, soft = None, None
        if answer.type in ("complete", "exception"):
            text = (answer.data or "") if answer.type == "complete" else exception_text(answer.data or "")
            token = token_of(text)
            attempt = history.tokens.get(token or "")
            if attempt is None:
                hard = f"the answer {answer.type} {answer.data!r} names no attempt"
            elif attempt.job != h.job.id:
                hard = f"the answer carries token {token} of job {attempt.job}"
            elif (attempt.out, attempt.data) != (answer.type, text):
                hard = f"attempt {token} ended {attempt.out} {attempt.data!r}; the client got {answer.type} {text!r}"
            elif attempt.t > answer.t:
                hard = f"attempt {token} started after the answer"
            elif not _final(history, h, attempt.n, attempt.action):
                soft = f"retryable failure of attempt {attempt.n} ({token}) answered before attempt {history.max_attempts}"
        else:
            fails = [a for a in h.attempts if a.out == "fail"]
            if not fails:
                soft = "WORK_FAIL, but no attempt failed plainly"
            elif h.job.fn in ON_FAIL and all(a.n < history.max_attempts for a in fails):
                soft = f"WORK_FAIL of a retryable attempt before attempt {history.max_attempts}"
        if soft is not None and _causes(history, h):
            excused += 1
            soft = None
        if hard or soft:
            offenders.append((h.job.id, hard or soft or ""))
    total = sum(kinds.values())
    return Check("every answer matches an attempt that ended that way", not offenders,
                 f"{total - len(offenders)} of {total} answers (complete {kinds['complete']}, exception "
                 f"{kinds['exception']}, fail {kinds['fail']}); {excused} early answers explained by faults",
                 offenders)


def updates_match(history: History) -> Check:
    offenders, total = [], 0
    for h in history.jobs.values():
        for text, t in h.data:
            total += 1
            token = token_of(text)
            attempt = history.tokens.get(token or "")
            if attempt is None or attempt.job != h.job.id:
                offenders.append((h.job.id, f"WORK_DATA {text!r} is not from an attempt of this job"))
            elif text != f"data {attempt.n} #{token}" or not attempt.action.startswith("stream+"):
                offenders.append((h.job.id, f"WORK_DATA {text!r} was sent after attempt {token} ended (`{attempt.action}`)"))
            elif h.answer is not None and t > h.answer.t:
                offenders.append((h.job.id, f"WORK_DATA {text!r} arrived after the answer"))
    return Check("every streamed update comes from a running attempt of its job", not offenders,
                 f"{total - len(offenders)} of {total} WORK_DATA", offenders)


def _extra_runs(history: History, jobs: list[JobHistory]) -> tuple[Counter[str], int, int, list[tuple[str, str]]]:
    causes: Counter[str] = Counter()
    runs = n_jobs = 0
    offenders = []
    for h in jobs:
        extra = len(h.attempts) - h.expected.attempts
        if extra <= 0:
            continue
        runs += extra
        n_jobs += 1
        why = _causes(history, h)
        if not why:
            offenders.append((h.job.id, f"{len(h.attempts)} runs, {h.expected.attempts} without faults, no fault touched it"))
        for kind in why:
            causes[kind] += 1
    return causes, runs, n_jobs, offenders


def extra_runs(history: History) -> Check:
    jobs = history.in_phase(*CHAOS_PHASES)
    causes, runs, n_jobs, offenders = _extra_runs(history, jobs)
    return Check("runs beyond each job's fault-free count explained by a fault", not offenders,
                 f"{runs} extra runs in {n_jobs} jobs; causes (jobs): {_fmt(causes) or 'none'}; "
                 f"{len(offenders)} unexplained", offenders)


def beyond_max_attempts(history: History) -> Check:
    offenders, causes, jobs = [], Counter(), 0
    for h in history.jobs.values():
        if len(h.attempts) <= history.max_attempts:
            continue
        jobs += 1
        why = _causes(history, h)
        if not why:
            offenders.append((h.job.id, f"{len(h.attempts)} runs (max_attempts {history.max_attempts}), no fault touched it"))
        causes.update(why)
    return Check(f"runs beyond max_attempts ({history.max_attempts}) explained", not offenders,
                 f"{jobs} jobs ran more often; causes: {_fmt(causes) or 'none'}; {len(offenders)} unexplained", offenders)


def reruns_after_answer(history: History) -> Check:
    offenders, causes, n = [], Counter(), 0
    for h in history.jobs.values():
        if h.job.bg:
            done = next((a for a in h.attempts if a.t_end is not None and _final(history, h, a.n, a.action)), None)
            settled = None if done is None else done.t_end
        else:
            settled = h.answer.t if h.answer else None
        if settled is None:
            continue
        for a in h.attempts:
            if a.t <= settled:
                continue
            n += 1
            why = _causes(history, h, h.submitted_t, a.t)
            if not why:
                offenders.append((h.job.id, f"attempt {a.n} ({a.token}) started {a.t - settled:.2f}s after the final outcome"))
            causes.update(why)
    return Check("re-runs after a final answer explained", not offenders,
                 f"{n} re-runs; causes: {_fmt(causes) or 'none'}; {len(offenders)} unexplained", offenders)


def clean_logs(problems: list[str], files: int) -> Check:
    return Check("no traceback or ERROR line in any gproxy log", not problems,
                 f"{len(problems)} such lines in {files} log files", notes=problems[:40])


def gauges_zero(readings: dict[str, dict[str, float]]) -> Check:
    bad = {when: values for when, values in readings.items() if any(v != 0 for v in values.values())}
    shown = "; ".join(f"{when}: " + ", ".join(f"{k} {v:g}" for k, v in values.items()) for when, values in readings.items())
    return Check("gauges back to 0 (jobs running and held)", not bad, shown)


def rss_flat(samples: list[tuple[float, str, int]], bound: int = RSS_BOUND_KIB) -> Check:
    warm = [kib for _, phase, kib in samples if phase == "warmup"]
    calm = [kib for _, phase, kib in samples if phase == "calm"]
    if not warm or not calm:
        return Check("RSS of the long-lived gproxy flat", False, f"missing samples (warm-up {len(warm)}, calm {len(calm)})")
    before, after = warm[-1], max(calm)
    peak = max(kib for _, _, kib in samples)
    return Check(f"RSS of the long-lived gproxy flat (within +{bound // 1024} MiB)", after - before <= bound,
                 f"after warm-up {before / 1024:.1f} MiB, calm phase {after / 1024:.1f} MiB "
                 f"({(after - before) / 1024:+.1f} MiB), peak {peak / 1024:.1f} MiB")


def drains_exit_0(history: History) -> Check:
    stops = [f for f in history.faults if f.kind == "term_gproxy"]
    bad = [f for f in stops if not f.detail.startswith("exit 0 ")]
    return Check("every SIGTERMed gproxy drained and exited 0", not bad,
                 f"{len(stops) - len(bad)} of {len(stops)}: " + ", ".join(f.detail for f in stops),
                 notes=[history.describe_fault(f) for f in bad])


PYGEARMAN_CONNECTION_LOSS = ("in _get_handler_for_job", "Unable to release job lock")
"""How pygearman 0.2.6 dies when its connection closes while a job sends its result (it
then sends WORK_FAIL on the connection it has just dropped): a bug of the library's, which
a direct gearmand connection that breaks provokes as well."""
CUTS_CONNECTIONS = frozenset({"reset_burst", "reset_worker_link", "kill_gproxy", "term_gproxy", "gearmand_restart"})
CUT_TO_DEATH = 2.0
"""Seconds from a fault that cut a worker's connection to its death being seen (the
supervisor looks every 0.2 s)."""


def workers_died_only_when_killed(history: History, exits: list[dict[str, Any]]) -> Check:
    """A worker that died is a failure, unless it is pygearman's own crash on a connection
    that a fault had just cut (counted and named, not hidden)."""
    deaths = {f.pid: f for f in history.faults if f.kind == "worker_died"}
    unexplained, explained = [], Counter[str]()
    for e in exits:
        death, cause = deaths.get(e["pid"]), None
        if death is not None and any(mark in e.get("log", "") for mark in PYGEARMAN_CONNECTION_LOSS):
            cause = next((f for f in history.faults if f.kind in CUTS_CONNECTIONS
                          and (f.gproxy == death.gproxy or f.kind == "gearmand_restart")
                          and death.t - CUT_TO_DEATH <= f.t <= death.t), None)
        if cause is None:
            unexplained.append(e)
        else:
            explained[cause.kind] += 1
    figure = f"{len(unexplained)} unexpected exits"
    if explained:
        figure += (f"; {sum(explained.values())} pygearman workers died of the library's connection-loss bug "
                   f"right after a fault cut their connection: " + ", ".join(f"{k} {n}" for k, n in sorted(explained.items())))
    return Check("no worker process died unless killed", not unexplained, figure,
                 notes=[f"pid {e['pid']} rc {e['rc']}: {e.get('log', '')}" for e in unexplained])


def calm_exact(history: History) -> Check:
    """No faults: every job runs exactly its script's attempts and ends as expected."""
    offenders = []
    jobs = history.in_phase("calm")
    for h in jobs:
        exp = h.expected
        if len(h.attempts) != exp.attempts:
            offenders.append((h.job.id, f"{len(h.attempts)} runs, expected {exp.attempts}"))
            continue
        got = h.attempts[-1].out if h.job.bg else (h.answer.type if h.answer else None)
        if got != exp.outcome:
            offenders.append((h.job.id, f"ended {got}, expected {exp.outcome}"))
        elif not h.job.bg and h.answer is not None and h.answer.type != "fail":
            token = token_of(h.answer.data if h.answer.type == "complete" else exception_text(h.answer.data or ""))
            attempt = history.tokens.get(token or "")
            if attempt is None or attempt.n != exp.attempts:
                offenders.append((h.job.id, f"answered by {token}, not by attempt {exp.attempts}"))
    return Check("calm phase: every job ran and ended exactly as scripted", not offenders,
                 f"{len(jobs) - len(offenders)} of {len(jobs)} jobs, {sum(len(h.attempts) for h in jobs)} runs", offenders)


def calm_counters(history: History, deltas: dict[str, Samples], dead_letters: int) -> Check:
    """gproxy's counters over the calm phase against what the workers and clients recorded:
    each job counts at the gproxy behind which its first attempt ran (which holds it),
    each attempt at the gproxy behind which it ran."""
    expected: dict[str, Counter[tuple[str, ...]]] = defaultdict(Counter)
    exhausted_total = 0
    for h in history.in_phase("calm"):
        if not h.attempts:
            continue
        first, last = h.attempts[0], h.attempts[-1]
        holder, fn = first.gproxy or "?", h.job.fn
        outcome = last.out if h.job.bg else (h.answer.type if h.answer else "none")
        expected[holder][("gproxy_jobs_total", fn, outcome or "none")] += 1
        if len(h.attempts) > 1:
            expected[holder][("gproxy_jobs_total", fn, "retried")] += 1
        for a in h.attempts[:-1]:
            expected[holder][("gproxy_retries_total", fn, outcome_of(fn, a.action)[1] or "none")] += 1
        if outcome_of(fn, last.action)[1] is not None:  # the last one was retryable: exhausted
            expected[holder][("gproxy_retries_exhausted_total", fn)] += 1
            expected[holder][("gproxy_jobs_total", fn, "dead_lettered")] += 1
            exhausted_total += 1
        for a in h.attempts:
            expected[a.gproxy or "?"][("gproxy_attempt_duration_seconds_count", fn)] += 1
    notes, compared = [], 0
    for gproxy, samples in sorted(deltas.items()):
        for fn in FUNCTIONS:
            keys: list[tuple[tuple[str, ...], float]] = []
            for outcome in (*OUTCOMES, "retried", "dead_lettered"):
                keys.append((("gproxy_jobs_total", fn, outcome), metric(samples, "gproxy_jobs_total", function=fn, outcome=outcome)))
            for reason in REASONS:
                keys.append((("gproxy_retries_total", fn, reason), metric(samples, "gproxy_retries_total", function=fn, reason=reason)))
            keys.append((("gproxy_retries_exhausted_total", fn), metric(samples, "gproxy_retries_exhausted_total", function=fn)))
            keys.append((("gproxy_attempt_duration_seconds_count", fn),
                         metric(samples, "gproxy_attempt_duration_seconds_count", function=fn)))
            for key, got in keys:
                compared += 1
                want = expected[gproxy][key]
                if got != want:
                    notes.append(f"{gproxy} {key[0]}{{{', '.join(key[1:])}}}: gproxy {got:g}, recorded {want}")
        extra = {k: v for k, v in expected[gproxy].items() if k[-1] == "none"}
        notes += [f"{gproxy} {k}: {v} jobs with no outcome label" for k, v in extra.items()]
    if dead_letters != exhausted_total:
        notes.append(f"dead letters queued in gearmand: {dead_letters}, exhausted jobs recorded: {exhausted_total}")
    jobs = sum(c[("gproxy_jobs_total", fn, o)] for c in expected.values() for fn in FUNCTIONS for o in OUTCOMES)
    return Check("calm phase: every gproxy counter equals what workers and clients recorded", not notes,
                 f"{compared} counter values of 2 gproxies over {jobs} jobs; {dead_letters} dead letters "
                 f"for {exhausted_total} exhausted jobs; {len(notes)} differences", notes=notes)


def restart_phase(history: History, result: dict[str, Any]) -> Check:
    jobs = history.in_phase("restart")
    answered = [h for h in jobs if h.job.bg or (h.answer is not None and h.answer.type == h.expected.outcome)]
    served = sorted({a.gproxy or "?" for h in jobs for a in h.attempts})
    ok = (result.get("survived") and result.get("ready") and len(answered) == len(jobs) and len(jobs) > 0
          and {"g1", "g2"} <= set(served))
    figure = (f"gproxy pids kept: {result.get('survived')}, /readyz 200: {result.get('ready')}, "
              f"workers back in {result.get('reregistered', '?')}s, {len(answered)} of {len(jobs)} jobs answered "
              f"as expected, served behind {', '.join(served) or 'none'}")
    offenders = [(h.job.id, "not answered as expected") for h in jobs if h not in answered]
    return Check("gearmand restart: both gproxies survive and serve again", bool(ok), figure, offenders,
                 notes=result.get("notes", []))


def harness_ok(errors: list[str]) -> Check:
    return Check("harness: every fault injected as planned", not errors, f"{len(errors)} injector errors", notes=errors)


def unknown_attempts(history: History) -> Check:
    return Check("every worker run belongs to a submitted job", not history.unknown_records,
                 f"{len(history.unknown_records)} runs of unknown jobs",
                 notes=[str(r) for r in history.unknown_records[:20]])


def _fmt(counter: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counter.most_common())
