"""The fuzz tier: gproxy fuzzed from both sides while a canary works (see README.md).

Modules, one job each:

    wire           the wire format, and the reference framer the checks hold gproxy to
    corpus         valid packets of every type, admin lines, and the mutators
    attacker       the worker side: attacks on route A (the real gearmand), as scripts
    fake_gearmand  the gearmand side: the fake behind route B, its attacks, episodes
    script         the replayable form of an input, and the player
    canary         the healthy pygearman worker and client next to the fuzz
    monitor        gproxy's RSS, fds, CPU and /metrics, and its log read back
    procs          gproxy as the command it ships as, with a config of the run's
    checks         what each connection must have seen
    runner         a fuzz run: phases, global checks, summary, saved findings
    replay         replaying a saved input (tests/fuzz/regressions)
    cli            `python -m tests.fuzz`
"""
