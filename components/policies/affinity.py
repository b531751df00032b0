"""Bounded-load session affinity: the pieces `session_hash_bounded` adds to the balancing policy.

A consistent hash on a session key keeps a conversation on one replica, so its prefix cache is
reused; a hot session (or an unlucky ring) could pile work onto that replica. NGINX OSS bounds
it with `max_conns` on every `server`: the consistent hash
(`ngx_http_upstream_get_chash_peer` in `ngx_http_upstream_hash_module.c`, nginx 1.22.1) skips a
peer whose in-flight count reached `max_conns` and walks on along the ring (the next point),
up to 20 points; after that it falls back to weighted round robin, which also skips full peers.
When every peer is full, the round robin finds none, nginx logs "no live upstreams" and the
request ends with 502 (the facts, with their source lines, are in
tests/contracts/data/nginx-1.22.1.json).

So local mode catches that 502 (only NGINX's own: `proxy_intercept_errors` stays off, so a
replica's 502 is never caught) and passes the request to a second upstream over the same
replicas with `least_conn` and no bound: load-aware, never lost, never a bare 502. The ingress
controller cannot express that fallback (one upstream per Ingress path, no snippets); there the
closest correct form is the same hash and `nginx.org/max-conns`, and a request arriving while
every replica is at its bound gets the controller's 502. `cluster_gaps` says so.

`max_conns` counts per NGINX instance (per worker group sharing the upstream `zone`): with K
instances (controller pods) a replica may hold K x the bound, so the cluster bound is divided by
the controller's replica count.
"""

from __future__ import annotations

import math
from typing import Protocol


class SessionPolicy(Protocol):
    """What affinity reads of the balancing policy (`LoadBalancingConfig` has it); a Protocol,
    so this module does not import the policy that imports it."""

    @property
    def method(self) -> str: ...
    @property
    def session_key(self) -> str: ...
    @property
    def session_header(self) -> str: ...
    @property
    def session_body_bytes(self) -> int: ...
    @property
    def bound_factor(self) -> float: ...
    @property
    def bounded(self) -> bool: ...

BODY_KEY_VARIABLE = "$llm_session_body_key"
"""nginx variable holding the first `sessionBodyBytes` bytes of the request body (local mode)."""
SPILL_UPSTREAM = "llm_spill"
"""Local mode: the unbounded least_conn upstream a request goes to when every replica is full."""
SPILL_LOCATION = "@llm_spill"


def max_conns(policy: SessionPolicy, replica_slots: int | None,
              nginx_instances: int = 1) -> int:
    """The `max_conns` of each replica for one NGINX instance: `boundFactor` x the replica's
    slots, shared out over `nginx_instances` (at least 1)."""
    if replica_slots is None:
        raise ValueError(
            "loadBalancing.method session_hash_bounded needs the replicas' slots (the engine's "
            "maxConcurrency) to set its bound; set model.maxConcurrency"
        )
    if replica_slots < 1:
        raise ValueError(f"replica_slots must be at least 1, got {replica_slots}")
    if nginx_instances < 1:
        raise ValueError(f"nginx_instances must be at least 1, got {nginx_instances}")
    return max(1, math.ceil(round(policy.bound_factor * replica_slots / nginx_instances, 6)))


def cluster_gaps(policy: SessionPolicy) -> list[str]:
    """What the ingress controller cannot express of `policy`, and what it renders instead."""
    gaps = []
    if policy.method in ("session_hash", "session_hash_bounded") and policy.session_key == "body":
        gaps.append(
            "loadBalancing.sessionKey: 'body' cannot be expressed by the NGINX Ingress "
            "Controller (a key derived from the request body needs a snippet); the Ingress "
            f"hashes the {policy.session_header} header instead. Allowed there: 'header'."
        )
    if policy.bounded:
        gaps.append(
            "loadBalancing.method: session_hash_bounded's fallback upstream (least_conn when "
            "every replica is at its bound) cannot be expressed by the NGINX Ingress "
            "Controller; the Ingress sets nginx.org/max-conns, so a request arriving while "
            "every replica is at its bound gets the controller's 502. Keep boundFactor high "
            "enough that this means overload."
        )
    return gaps


def body_key_map(policy: SessionPolicy) -> list[str]:
    """http-level nginx lines defining `BODY_KEY_VARIABLE`.

    `$request_body` is set only while the whole body sits in one memory buffer, so the caller
    also sets `client_body_buffer_size` to the largest body; a body written to a temp file gives
    an empty key, and nginx's hash then spreads that request round robin.
    """
    n = policy.session_body_bytes
    return [
        "    # Session key from the body: its first bytes (model, system prompt, first turn) are",
        "    # the same for every turn of one chat. (?s): a body may contain newlines.",
        f"    map $request_body {BODY_KEY_VARIABLE} {{",
        f'        "~(?s)^(?<llm_body_head>.{{1,{n}}})" $llm_body_head;',
        '        default "";',
        "    }",
    ]
