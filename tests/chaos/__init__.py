"""The chaos suite: a 3-server Ferrylink cluster on a 3-node RabbitMQ and PostgreSQL, under a
steady load of uploads through the edge, takes faults in turn (a service SIGKILLed, the
primary SIGKILLed, a primary-only process SIGSTOPped past its grant, a broker node
SIGKILLed, the primary cut off the network) and, after each, checks that every accepted file
reached the HTTP partner exactly once, that the transfer log and the tracking receiver agree,
that there was one primary per epoch and no primary-only work on two servers at once, and
that every service is ready again within a bound. It writes a JSON report.

    python -m tests.chaos [--long] [--mode passive] [--report PATH] [--seed N] [--keep]

Short mode (the default; tests/chaos/test_chaos.py runs it under pytest, marked `fault`):
each fault once. `--long`: three rounds, each in a random order (`--rounds N`).
"""
