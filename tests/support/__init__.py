"""Helpers shared by the test suite and the benchmark scripts (one definition of each).

- :mod:`tests.support.poll`: ``wait_until`` (blocking, for synchronous code) and ``until`` /
  ``poll`` (awaited, for async tests: never a blocking sleep on the event loop).
- :mod:`tests.support.net`: loopback addresses and free ports.
- :mod:`tests.support.procs`: stopping a child process by its pid.
- :mod:`tests.support.daemon`: one real ``chatnode run`` process (:class:`Daemon`), the operator
  token, and a node's JSON endpoints and ``/metrics`` fetched over HTTP.
- :mod:`tests.support.cluster`: clusters of daemons and their membership views.
- :mod:`tests.support.harness`: the fault harness of the cluster tests (kill, pause, partition;
  writers, subscribers, checks), with ``await Harness.open(...)`` for async code.
- :mod:`tests.support.ws`: the one WebSocket protocol client, sign-up and log-in.
- :mod:`tests.support.rawws`: a bare WebSocket that never drains its socket (abuse tests).
- :mod:`tests.support.kafka`, :mod:`tests.support.pg`: a real Tansu broker, a real PostgreSQL.
- :mod:`tests.support.forwarder_child`, :mod:`tests.support.membership_sim`,
  :mod:`tests.support.views_data`: workloads shared by a test and a benchmark script.

The scripts under ``scripts/`` import only from here, never a test module (``test_*.py``,
``conftest.py``); ``scripts/soak_crdt.py`` is the exception by purpose (it runs the state
machines of tests/crdt).
"""
