"""Load-balancing policy: the single source of truth for the `loadBalancing` section.

One frozen model (`LoadBalancingConfig`) and two renderers that must agree:

* `ingress_annotations` -> the F5 NGINX Ingress Controller's `nginx.org/*` annotations
  (cluster mode; never `nginx.ingress.kubernetes.io/*`, never snippets);
* `nginx_conf` -> a complete, runnable `nginx.conf` for local mode (components/policies/nginx_conf.py).

Why per-request, load-aware balancing: an LLM request holds a replica for seconds to minutes
and requests differ by orders of magnitude in cost, so round robin piles work onto whichever
replica drew the long generations. `least_conn` (with a shared `zone`, so every worker sees the
same counts) sends each request to the replica with the fewest requests in flight.

The retry rule (see `_NEXT_UPSTREAM`): a request moves to another replica only when the first
one refused the connection, failed before answering, or answered 502/503 - and nginx itself
never passes a request on once any byte reached the client. `timeout` is deliberately absent:
a slow generation must not be re-run on a second replica.

See docs/load-balancing.md for the reasoning behind every setting.
"""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import Field, field_validator

from components.config.sections import Section
from components.policies import affinity
from components.policies.affinity import BODY_KEY_VARIABLE

UPSTREAM_SERVER_KEEPALIVE_SECONDS = 5
"""Idle keep-alive timeout of the upstream servers (uvicorn's and vLLM's default: 5 s).

NGINX must drop an idle upstream connection before the server does, or it may send a request
on a connection the server is closing at that very moment.
"""

LbMethod = Literal[
    "round_robin", "least_conn", "random_two_least_conn", "session_hash", "session_hash_bounded"
]
SessionKey = Literal["header", "body"]

UPSTREAM_NAME = "llm"
"""Name of the upstream block in the local-mode nginx.conf."""

HEALTH_PATH = "/nginx-health"
"""Local-mode readiness path answered by NGINX itself (200), never proxied."""

API_PREFIX = "/v1/"
"""The only path prefix NGINX passes to the replicas; everything else is answered 404 by NGINX
(engines serve unauthenticated routes beside the API, e.g. vLLM's /tokenize and /metrics)."""

SERVER_ADMISSION_DEFAULT = 32 + 128
"""Requests one server replica admits at once with its defaults (LLM_MAX_CONCURRENCY 32 running
+ LLM_MAX_QUEUE 128 waiting); beyond that it answers 429 itself."""

CLIENT_BODY_TIMEOUT_SECONDS = 10
"""Longest pause NGINX allows between two reads of a request header or body (nginx: 60 s).
Chat bodies are small and sent at once; a client trickling bytes only holds a connection."""

# Header names become part of an nginx variable ($http_x_session_id): letters, digits and '-'
# only. Underscores are excluded on purpose: nginx drops headers containing them by default
# (underscores_in_headers off), so a hash on such a header would silently never match.
_HEADER_NAME = re.compile(r"^[A-Za-z0-9]+(-[A-Za-z0-9]+)*$")
_SIZE = re.compile(r"^\d+[kKmM]?$")  # nginx size syntax, as the controller validates it


# --- the stack configuration section -------------------------------------------------------


class RateLimit(Section):
    requests_per_second: int = Field(ge=1, le=100_000)
    """Sustained requests per second allowed from one client address."""
    burst: int = Field(0, ge=0, le=100_000)
    """Requests above the rate accepted at once before answering 429."""


class LoadBalancingConfig(Section):
    method: LbMethod = "least_conn"
    """How NGINX picks a replica: round_robin, least_conn (fewest requests in flight),
    random_two_least_conn (the controller's default) or session_hash (consistent hash on
    `sessionHeader`, for prefix-cache reuse) or session_hash_bounded (the same hash, but a
    replica with `boundFactor` x its slots in flight is skipped for the next one on the ring).
    least_conn is the default in both regimes: measured best on CPU sim replicas (round robin
    1.98x its p99 at 80% load), and in the GPU regime (h200-llama8b, 2 replicas x
    max_num_seqs 128, modelled) it keeps the tail near saturation (round robin 1.45x its p99
    at 95% load, 0.91x at 80%; two NGINX instances cost it 1.01x):
    [docs/load-balancing.md, Which regime are you in](docs/load-balancing.md#which-regime-are-you-in). session_hash_bounded suits multi-turn chats."""
    session_header: str = Field("X-Session-ID", min_length=1, max_length=64)
    """Request header hashed by session_hash; requests without it are spread round robin."""
    session_key: SessionKey = "header"
    """What the session methods hash: `header` (sessionHeader) or `body` (the first
    sessionBodyBytes bytes of the request body: turns of one chat share their beginning).
    `body` is local-mode only: the ingress controller cannot derive a key from the body."""
    session_body_bytes: int = Field(256, ge=16, le=4096)
    """With sessionKey `body`: how many leading body bytes form the key."""
    bound_factor: float = Field(1.25, gt=0, le=16)
    """session_hash_bounded: requests in flight per replica, as a multiple of the replica's
    slots, before the hash skips it (nginx `max_conns`, per NGINX instance). 1.25 measured best
    (sessions at 80% load, docs/load-balancing.md): 91-97% of session_hash's cache hits and a
    lower median, with 0.4% of requests finding every replica at its bound; 1.0 kept 76% of the
    hits and 4.4% found every replica full (the controller's 502 in the cluster); 1.5 kept 94%
    but its p99 was 1.34x least_conn's. At 1.25 the p99 is 1.09x least_conn's over three traces
    pooled (1.63x on another), and keyless requests (round robin within the bound) fare worse
    than under least_conn. In the GPU regime (modelled) no factor from 1.0 to 2.0 binds at
    80-95% load (128 sequence slots per replica): the bounded hash keeps all of
    session_hash's hits with a p99 0.91x least_conn's at 80%: [docs/load-balancing.md, Which regime are you in](docs/load-balancing.md#which-regime-are-you-in)."""
    per_token_seconds: float = Field(0.1, gt=0, le=60)
    """Time budget per output token; read and send timeouts are maxOutputTokens times this.
    0.1 is 2.2x the slowest generation in the GPU regime (46.4 ms per output token at 95% load,
    modelled; 205 s for prod's 2048 tokens against 95 s needed) and covers the CPU regime's
    decode steps (38 ms at a full batch of 8): [docs/load-balancing.md, Which regime are you in](docs/load-balancing.md#which-regime-are-you-in)."""
    timeout_floor_seconds: int = Field(60, ge=1, le=86_400)
    """Lower bound of the read and send timeouts, whatever the token budget gives. 60 s is
    over 100x the longest wait for a first token in the GPU regime (0.53 s at 95% load,
    modelled) and 3.8x the CPU regime's (15.7 s at 80%): [docs/load-balancing.md, Which regime are you in](docs/load-balancing.md#which-regime-are-you-in)."""
    connect_timeout_seconds: int = Field(5, ge=1, le=75)
    """Time to establish a connection to a replica (nginx caps it at about 75 s)."""
    client_max_body_size: str = "1m"
    """Largest request body accepted (nginx size: 512k, 1m, 8M); larger gets 413."""
    keepalive_connections: int = Field(32, ge=0, le=65_536)
    """Idle upstream connections each NGINX worker keeps open; 0 disables reuse."""
    keepalive_timeout_seconds: int = Field(4, ge=1)
    """How long an idle upstream connection is kept; must stay below the servers' own 5 s."""
    max_fails: int = Field(1, ge=0, le=100)
    """Failed attempts within `failTimeoutSeconds` that mark a replica unavailable; 0 never."""
    fail_timeout_seconds: int = Field(10, ge=1, le=3_600)
    """Window for counting failures, and how long a failed replica is then skipped."""
    retry_tries: int = Field(2, ge=1, le=10)
    """Replicas tried per request, the first included; 1 disables retries."""
    retry_window_seconds: int = Field(10, ge=1, le=3_600)
    """Retries happen only this long after a request starts: enough for refusals and
    draining 503s, too short to re-run a generation that failed midway."""
    rate_limit: RateLimit | None = None
    """Per-client-address request rate limit; unset means no limit."""

    @field_validator("session_header")
    @classmethod
    def _header_name(cls, value: str) -> str:
        if not _HEADER_NAME.match(value):
            raise ValueError(
                "must be an HTTP header name of letters, digits and single '-' between "
                "them, e.g. 'X-Session-ID'"
            )
        return value

    @field_validator("client_max_body_size")
    @classmethod
    def _body_size(cls, value: str) -> str:
        if not _SIZE.match(value):
            raise ValueError(
                "must be an nginx size: digits with an optional k or m suffix, "
                "e.g. '512k' or '1m'"
            )
        return value

    @field_validator("keepalive_timeout_seconds")
    @classmethod
    def _below_server_keepalive(cls, value: int) -> int:
        if value >= UPSTREAM_SERVER_KEEPALIVE_SECONDS:
            raise ValueError(
                "must be below the upstream servers' own keep-alive "
                f"({UPSTREAM_SERVER_KEEPALIVE_SECONDS} s, uvicorn's default), "
                f"i.e. 1 to {UPSTREAM_SERVER_KEEPALIVE_SECONDS - 1}"
            )
        return value

    @property
    def session_variable(self) -> str:
        """The nginx variable holding `session_header`: X-Session-ID -> $http_x_session_id."""
        return "$http_" + self.session_header.lower().replace("-", "_")

    @property
    def key_variable(self) -> str:
        """The nginx variable the session methods hash (header, or the body-prefix map)."""
        return BODY_KEY_VARIABLE if self.session_key == "body" else self.session_variable

    @property
    def bounded(self) -> bool:
        return self.method == "session_hash_bounded"


# --- derived values --------------------------------------------------------------------------


def read_timeout_seconds(policy: LoadBalancingConfig, max_output_tokens: int) -> int:
    """Longest silence NGINX tolerates while reading from a replica.

    A non-streaming request sends nothing until the whole generation is done, so the budget is
    the full generation: max_output_tokens x per_token_seconds, never below the floor.
    """
    if max_output_tokens < 1:
        raise ValueError(f"max_output_tokens must be at least 1, got {max_output_tokens}")
    # round() first: 600 x 0.1 is 60.000000000000007 in floating point, and ceil would say 61.
    budget = math.ceil(round(max_output_tokens * policy.per_token_seconds, 6))
    return max(policy.timeout_floor_seconds, budget)


def send_timeout_seconds(policy: LoadBalancingConfig, max_output_tokens: int) -> int:
    """Same budget as reading: a replica busy generating may not read the next request bytes."""
    return read_timeout_seconds(policy, max_output_tokens)


_NEXT_UPSTREAM = "error http_502 http_503 non_idempotent"
"""When a request may move to another replica.

* `error`: connection refused or reset before a response header arrived (a replica gone or
  still starting). `http_502`/`http_503`: the replica (or its sidecar) is failing or draining;
  both are answered before generation starts.
* `non_idempotent`: the API is POST, which nginx otherwise never retries. Safe here because
  nginx never passes a request on once any byte was sent to the client, and the three cases
  above mean the first replica produced no output for it.
* no `timeout`: a slow generation must not be started a second time on another replica.

The remaining risk - a replica that dies midway through a non-streaming generation (`error`)
gets the request replayed - is bounded by `retryWindowSeconds` (proxy_next_upstream_timeout).
"""


def lb_method_value(policy: LoadBalancingConfig, key: str | None = None) -> str:
    """The method as `nginx.org/lb-method` spells it (also the nginx directive, bar round robin).
    `key`: the hashed variable, `policy.key_variable` unless given."""
    hashed = f"hash {key or policy.key_variable} consistent"
    return {
        "round_robin": "round_robin",
        "least_conn": "least_conn",
        "random_two_least_conn": "random two least_conn",
        "session_hash": hashed,
        "session_hash_bounded": hashed,
    }[policy.method]


def lb_method_directive(policy: LoadBalancingConfig) -> str | None:
    """The upstream-block directive for the method; None for round robin (nginx's default)."""
    if policy.method == "round_robin":
        return None
    return lb_method_value(policy) + ";"


# --- (a) F5 NGINX Ingress Controller annotations --------------------------------------------

# Which annotations, and which values, the pinned controller reads is upstream fact, kept with
# its source in tests/contracts/data/nginx-ingress-controller-<version>.json and checked there.
SNIPPET_ANNOTATIONS = frozenset({"nginx.org/location-snippets", "nginx.org/server-snippets"})
"""Raw-config annotations; this module never emits them (they need snippets enabled)."""


def ingress_annotations(policy: LoadBalancingConfig, max_output_tokens: int, *,
                        replica_slots: int | None = None,
                        controller_replicas: int = 1) -> dict[str, str]:
    """The `nginx.org/*` annotations that apply `policy` on the F5 NGINX Ingress Controller.

    `replica_slots` (the engine's maxConcurrency) and `controller_replicas` size
    session_hash_bounded's `nginx.org/max-conns` (per controller pod). What the controller
    cannot express (`affinity.cluster_gaps`: a body-derived key, the fallback upstream) is
    rendered in its closest correct form: the header key, and max-conns without a fallback.

    Not expressible through documented annotations, so the controller keeps its own behaviour:
    upstream `keepalive_timeout` (nginx default 60 s: the Deployment raises the engines' own
    keep-alive above it, engines.SERVER_KEEPALIVE_SECONDS, and the `error ... non_idempotent`
    retry covers the rest) and `proxy_request_buffering` (on, as here). Do not set
    `nginx.org/use-cluster-ip`: with one ClusterIP upstream the method and retries do nothing.
    """
    read = read_timeout_seconds(policy, max_output_tokens)
    annotations = {
        # The controller cannot hash the body: the header key is the closest correct form.
        "nginx.org/lb-method": lb_method_value(policy, policy.session_variable),
        # The controller parses booleans with Go's strconv.ParseBool; its docs spell "True".
        "nginx.org/proxy-buffering": "False",
        "nginx.org/proxy-read-timeout": f"{read}s",
        "nginx.org/proxy-send-timeout": f"{send_timeout_seconds(policy, max_output_tokens)}s",
        "nginx.org/proxy-connect-timeout": f"{policy.connect_timeout_seconds}s",
        "nginx.org/client-max-body-size": policy.client_max_body_size,
        # Bodies stay in memory up to the limit (see nginx_conf: a body in a temporary file
        # costs ~40 ms more per request).
        "nginx.org/client-body-buffer-size": policy.client_max_body_size,
        # The controller adds `proxy_set_header Connection "";` itself when keepalive > 0.
        "nginx.org/keepalive": str(policy.keepalive_connections),
        "nginx.org/max-fails": str(policy.max_fails),
        "nginx.org/fail-timeout": f"{policy.fail_timeout_seconds}s",
        "nginx.org/proxy-next-upstream": _NEXT_UPSTREAM,
        "nginx.org/proxy-next-upstream-tries": str(policy.retry_tries),
        "nginx.org/proxy-next-upstream-timeout": f"{policy.retry_window_seconds}s",
    }
    if policy.bounded:
        bound = affinity.max_conns(policy, replica_slots, controller_replicas)
        annotations["nginx.org/max-conns"] = str(bound)
    if policy.rate_limit is not None:
        annotations |= {
            "nginx.org/limit-req-rate": f"{policy.rate_limit.requests_per_second}r/s",
            "nginx.org/limit-req-key": "${binary_remote_addr}",
            "nginx.org/limit-req-burst": str(policy.rate_limit.burst),
            # Burst requests go through at once rather than being paced: a queued request
            # would sit in NGINX holding a client connection while the replicas idle.
            "nginx.org/limit-req-no-delay": "true",
            "nginx.org/limit-req-reject-code": "429",
        }
    return annotations
