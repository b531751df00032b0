"""Fault drills in local mode: ``python -m bench faults [--quick] [--out DIR]``.

Starts one local cluster (3 sim replicas behind the real nginx, default balancing policy) and
runs six drills against it (the first four under open-loop streaming load) through nginx:

1. ``rolling-restart``: SIGTERM each replica in turn (it drains), start it again, wait until it
   is ready *and* back in nginx's rotation before the next one (like ``maxUnavailable: 1``).
2. ``crash``: SIGKILL one replica; only the requests in flight on it may fail (measured from its
   /metrics right before the kill); requests sent afterwards must all succeed; after
   ``start_replica`` it must serve again.
3. ``overload``: 3x the measured capacity for a bounded time: fast 429s with Retry-After,
   bounded replica RSS, admitted requests' p99 bounded by what the queue can hold.
4. ``nginx-reload``: ``reload_nginx(replicas=n + 1)`` under load: no failed request.
5. ``disconnect``: every slot busy with a long generation, then every client hangs up
   (non-streaming, then streaming): the slots must be free within 2 s.
6. ``flood``: 500 connections at once through nginx, each answered 200 or 429 (none reset),
   and a client stalling its request body is cut off after client_body_timeout.

A request succeeds only with status 200 and a stream that ended with ``data: [DONE]``; 429s are
counted apart (the expected answer in the overload drill, a failure elsewhere). Prints one line
per drill and a summary table; exits 1 when any drill misses its bar. The pure parts (counting,
bars, table) are separate from the drivers so tests can check them on synthetic data.

Modules: ``model`` (sim model, records, counting, bars: the pure parts), ``load`` (open-loop
load, replica introspection), ``drills`` (the drivers), ``disconnect`` (clients hanging up
mid-generation), ``report`` (Markdown), ``cli`` (``main``). This package re-exports them.
"""

from __future__ import annotations

from bench.faults.cli import main
from bench.faults.disconnect import (
    DisconnectBounds,
    PhaseResult,
    disconnect_checks,
    drill_disconnect,
)
from bench.faults.flood import drill_flood, flood_checks
from bench.faults.drills import (
    Plan,
    drill_crash,
    drill_overload,
    drill_reload,
    drill_rolling,
    measure_capacity,
)
from bench.faults.load import LoadRun, in_flight, run_load, scrape, served, wait_idle
from bench.faults.model import (
    MIB,
    Check,
    Counts,
    DrillModel,
    DrillResult,
    FaultRecord,
    OverloadBounds,
    count,
    crash_checks,
    exit_code,
    failed_after,
    overload_bounds,
    overload_checks,
    summary_table,
    zero_failure_checks,
)
from bench.faults.report import BEGIN, END, markdown, splice

__all__ = [
    "BEGIN", "END", "MIB", "Check", "Counts", "DisconnectBounds", "DrillModel", "DrillResult",
    "PhaseResult",
    "FaultRecord", "LoadRun", "OverloadBounds", "Plan", "count", "crash_checks",
    "disconnect_checks", "drill_crash", "drill_disconnect", "drill_overload", "drill_reload",
    "drill_rolling", "drill_flood", "flood_checks", "exit_code", "failed_after", "in_flight", "main", "markdown",
    "measure_capacity", "overload_bounds", "overload_checks", "run_load", "scrape", "served",
    "splice", "summary_table", "wait_idle", "zero_failure_checks",
]
