"""The chaos tier: real peers, seeded faults, invariants checked at the end.

One gearmand; two gproxies (`g1` through a fault-injecting relay, never stopped; `g2`
stopped, killed and restarted); pygearman and Perl Gearman::Worker workers behind both,
failing as each job's script says; pygearman clients submitting foreground jobs (unique id
equal to the payload, empty, 63 bytes) and background jobs, at all three priorities, now and
then in a burst that backs the queue up, straight to gearmand. A seeded
injector kills workers, drains or kills `g2`, and resets connections in the relay. Every
attempt is recorded by its worker with a token that travels in its result, so each answer is
matched with the attempt that produced it. Then a calm phase compares gproxy's counters with
what the workers recorded, and a last phase restarts gearmand.

    python -m tests.chaos --seconds 60 --seed 1     # or: make chaos SECONDS=600 SEED=1

Modules: scripts.py (the jobs and what should come of them), world.py (the processes),
faults.py (the injector), history.py (the records, per job), checks.py (the invariants),
run.py (the phases and the report). tests/test_chaos.py runs a short seeded run in
`make test`.
"""
