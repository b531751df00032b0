"""Load-balancing policy: the single source of truth for the `loadBalancing` section.

One frozen model (`LoadBalancingConfig`) and two renderers that must agree:

* `ingress_annotations` -> the F5 NGINX Ingress Controller's `nginx.org/*` annotations
  (cluster mode; never `nginx.ingress.kubernetes.io/*`, never snippets);
* `nginx_conf` -> a complete, runnable `nginx.conf` for local mode.

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

import ipaddress
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from components import affinity
from components.affinity import BODY_KEY_VARIABLE
from components.sections import Section

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
_HOST_LABEL = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?$")
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_./+-]+$")  # no spaces, quotes, ';', '{', '}', '$', '#'


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
    least_conn is the default because it measured best, with one NGINX and with two
    (docs/load-balancing.md); session_hash_bounded suits multi-turn chats."""
    session_header: str = Field("X-Session-ID", min_length=1, max_length=64)
    """Request header hashed by session_hash; requests without it are spread round robin."""
    session_key: SessionKey = "header"
    """What the session methods hash: `header` (sessionHeader) or `body` (the first
    sessionBodyBytes bytes of the request body: turns of one chat share their beginning).
    `body` is local-mode only: the ingress controller cannot derive a key from the body."""
    session_body_bytes: int = Field(256, ge=16, le=4096)
    """With sessionKey `body`: how many leading body bytes form the key."""
    bound_factor: float = Field(1.0, gt=0, le=16)
    """session_hash_bounded: requests in flight per replica, as a multiple of the replica's
    slots, before the hash skips it (nginx `max_conns`, per NGINX instance). 1.0 measured best:
    1.5 was never reached at 80% load and kept session_hash's hot spot."""
    per_token_seconds: float = Field(0.1, gt=0, le=60)
    """Time budget per output token; read and send timeouts are maxOutputTokens times this."""
    timeout_floor_seconds: int = Field(60, ge=1, le=86_400)
    """Lower bound of the read and send timeouts, whatever the token budget gives."""
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


# --- (b) local-mode nginx.conf ---------------------------------------------------------------


def _upstream_address(address: str) -> str:
    """Validate `host:port` (IPv4, [IPv6] or a DNS name) so nothing else reaches the config."""
    if not isinstance(address, str):
        raise ValueError(f"upstream address {address!r} must be a 'host:port' string")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65_535:
        raise ValueError(f"upstream address {address!r} must be 'host:port' with port 1-65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"upstream address {address!r}: {host} is not an IPv6 address") from None
        return address
    try:
        ipaddress.IPv4Address(host)
        return address
    except ValueError:
        pass
    labels = host.split(".")
    if len(host) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
        raise ValueError(
            f"upstream address {address!r} must be 'host:port' with an IPv4 address, "
            "a [bracketed] IPv6 address or a DNS name"
        )
    return address


def _listen(listen: str | int) -> str:
    """A port binds 127.0.0.1 only (local mode never listens on other interfaces)."""
    if isinstance(listen, bool):
        raise ValueError(f"listen {listen!r} must be a port or 'host:port'")
    if isinstance(listen, int):
        if not 1 <= listen <= 65_535:
            raise ValueError(f"listen port {listen} must be 1-65535")
        return f"127.0.0.1:{listen}"
    return _upstream_address(listen)


def _path(path: Path, what: str) -> str:
    text = str(path)
    if not _SAFE_PATH.match(text):
        raise ValueError(
            f"{what} {text!r} may contain only letters, digits and '_', '.', '/', '+', '-'"
        )
    return text


def connection_limits(admission_limit: int, keepalive_connections: int) -> tuple[int, int]:
    """(connections one client address may hold, worker_connections) for a set of replicas that
    admit ``admission_limit`` requests in total (running + queued).

    A client may hold a quarter more connections than the replicas admit (at least 16 more), so
    the replicas, not NGINX, refuse the first excess requests with their own 429 and Retry-After.
    An admitted request takes two connections (client and upstream); the third share leaves
    room to accept, answer 429 to and close connections beyond the cap instead of resetting
    them, plus the idle upstream keep-alive pool and a margin for health checks.
    """
    if admission_limit < 1:
        raise ValueError(f"admission_limit must be at least 1, got {admission_limit}")
    per_client = admission_limit + max(16, admission_limit // 4)
    worker_connections = max(1024, 3 * per_client + keepalive_connections + 32)
    return per_client, worker_connections


def _listen_lines(bind: str, certificate: Path | None, key: Path | None) -> list[str]:
    if certificate is None or key is None:
        return [f"        listen {bind};"]
    return [
        f"        listen {bind} ssl;",
        f"        ssl_certificate {_path(Path(certificate), 'tls_certificate')};",
        f"        ssl_certificate_key {_path(Path(key), 'tls_key')};",
        "        ssl_protocols TLSv1.2 TLSv1.3;",
    ]


def _json_error(status: int, message: str, code: str) -> str:
    """An nginx `return` answering an OpenAI-style error body (no quotes allowed in message)."""
    kind = "rate_limit_error" if status == 429 else "invalid_request_error"
    body = ('{"error":{"message":"' + message + '","type":"' + kind + '","param":null,'
            '"code":"' + code + '"}}')
    return f"return {status} '{body}';"


def nginx_conf(
    policy: LoadBalancingConfig,
    upstreams: Sequence[str],
    listen: str | int,
    max_output_tokens: int,
    *,
    prefix: Path | None = None,
    daemon: bool = False,
    worker_processes: int | Literal["auto"] = "auto",
    user: str | None = None,
    group: str | None = None,
    pid_path: Path | None = None,
    error_log_path: Path | None = None,
    access_log_path: Path | None = None,
    temp_dir: Path | None = None,
    admission_limit: int | None = None,
    client_body_timeout_seconds: int = CLIENT_BODY_TIMEOUT_SECONDS,
    replica_slots: int | None = None,
    nginx_instances: int = 1,
    tls_certificate: Path | None = None,
    tls_key: Path | None = None,
) -> str:
    """A complete nginx.conf that runs without root: every writable path inside `prefix`.

    `upstreams` are the replicas' `host:port`; a bare port for `listen` binds 127.0.0.1.
    Relative paths resolve against nginx's `-p` prefix; pass `prefix` to make them absolute.
    Run it with `nginx -p <prefix> -c <file>` (`daemon off` by default: a supervisor owns it).
    `user`/`group` matter only when nginx starts as root: its workers then run as that
    account, which must be able to write the temp paths (large request bodies); pass an
    unprivileged account and a `temp_dir` it owns (nginx creates the temp paths inside).
    Non-root nginx ignores them with a warning.

    Only `API_PREFIX` reaches the replicas, plus `HEALTH_PATH` answered by nginx itself.
    `admission_limit` is what the replicas admit in total (running + queued; the server's
    default `SERVER_ADMISSION_DEFAULT` per upstream when None): it sizes worker_connections and
    the per-client connection cap (`connection_limits`), so a flood is answered 429, not reset.
    `replica_slots` (each replica's LLM_MAX_CONCURRENCY) sets session_hash_bounded's bound,
    shared out over `nginx_instances` NGINX processes in front of the same replicas.
    `tls_certificate` and `tls_key` (PEM files) make the listener HTTPS only (TLS 1.2+).
    """
    if not upstreams:
        raise ValueError("nginx_conf needs at least one upstream address")
    servers = [_upstream_address(address) for address in upstreams]
    if len(set(servers)) != len(servers):
        raise ValueError(f"upstream addresses repeat: {list(upstreams)}")
    bind = _listen(listen)
    if worker_processes != "auto" and (
        not isinstance(worker_processes, int) or isinstance(worker_processes, bool)
        or not 1 <= worker_processes <= 1024
    ):
        raise ValueError(f"worker_processes must be 'auto' or 1-1024, got {worker_processes!r}")

    for what, account in (("user", user), ("group", group)):
        if account is not None and not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", account):
            raise ValueError(f"{what} {account!r} must be a Unix account name")
    if group is not None and user is None:
        raise ValueError("group needs user")
    if (tls_certificate is None) != (tls_key is None):
        raise ValueError("tls_certificate and tls_key go together")
    if not 1 <= client_body_timeout_seconds <= 3600:
        raise ValueError("client_body_timeout_seconds must be 1-3600, got "
                         f"{client_body_timeout_seconds}")
    admitted = admission_limit if admission_limit is not None else (
        SERVER_ADMISSION_DEFAULT * len(servers))
    per_client, worker_connections = connection_limits(admitted, policy.keepalive_connections)

    base = Path(_path(Path(prefix), "prefix")) if prefix is not None else Path(".")

    def inside(default: str, override: Path | None, what: str) -> str:
        return _path(override if override is not None else base / default, what)

    pid = inside("nginx.pid", pid_path, "pid_path")
    error_log = inside("error.log", error_log_path, "error_log_path")
    access_log = inside("access.log", access_log_path, "access_log_path")
    temp_base = Path(_path(Path(temp_dir), "temp_dir")) if temp_dir is not None else base
    temp = {name: _path(temp_base / f"{name}_temp", "temp_dir")
            for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}

    read = read_timeout_seconds(policy, max_output_tokens)
    send = send_timeout_seconds(policy, max_output_tokens)
    server_params = f"max_fails={policy.max_fails} fail_timeout={policy.fail_timeout_seconds}s"
    spill_params = server_params
    if policy.bounded:
        server_params += \
            f" max_conns={affinity.max_conns(policy, replica_slots, nginx_instances)}"
    body_key = policy.method in ("session_hash", "session_hash_bounded") \
        and policy.session_key == "body"
    method = lb_method_directive(policy)
    rate = policy.rate_limit

    lines = [
        "# Rendered by components/balancing.py (local mode); edit the loadBalancing section,",
        "# not this file.",
        f"daemon {'on' if daemon else 'off'};",
        f"worker_processes {worker_processes};",
        *([f"user {user}{' ' + group if group else ''};"] if user is not None else []),
        f"pid {pid};",
        f"error_log {error_log} warn;",
        # Two descriptors per connection at most (a temp file for a large body), plus logs.
        f"worker_rlimit_nofile {2 * worker_connections};",
        "",
        "events {",
        f"    # Sized from what the replicas admit ({admitted} requests): see connection_limits.",
        f"    worker_connections {worker_connections};",
        "}",
        "",
        "http {",
        f"    access_log {access_log};",
        # Temp paths default to compile-time locations under /var; keep every one private.
        f"    client_body_temp_path {temp['client_body']};",
        f"    proxy_temp_path {temp['proxy']};",
        f"    fastcgi_temp_path {temp['fastcgi']};",
        f"    uwsgi_temp_path {temp['uwsgi']};",
        f"    scgi_temp_path {temp['scgi']};",
        "    server_tokens off;",
        "    # A slow client may not hold a connection by trickling its request.",
        f"    client_header_timeout {client_body_timeout_seconds}s;",
        f"    client_body_timeout {client_body_timeout_seconds}s;",
        "    reset_timedout_connection on;",
        "    limit_conn_zone $binary_remote_addr zone=llm_conn_per_client:10m;",
        "",
        "    # Keep the client's X-Request-ID, or mint one, so logs join across hops.",
        "    map $http_x_request_id $llm_request_id {",
        "        default $http_x_request_id;",
        '        ""      $request_id;',
        "    }",
    ]
    if body_key:
        lines += ["", *affinity.body_key_map(policy)]
    if rate is not None:
        lines += [
            "",
            "    limit_req_zone $binary_remote_addr zone=llm_rate:10m"
            + f" rate={rate.requests_per_second}r/s;",
        ]
    # Everything a proxied request needs but the upstream; shared with the spill location.
    proxy = [
        "            proxy_http_version 1.1;",
        '            proxy_set_header Connection "";',
        "            proxy_set_header Host $host;",
        "            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "            proxy_set_header X-Forwarded-Proto $scheme;",
        "            proxy_set_header X-Request-ID $llm_request_id;",
        "",
        "            # Stream tokens as they come; an upstream's X-Accel-Buffering: yes must not",
        "            # turn buffering back on.",
        "            proxy_buffering off;",
        "            proxy_ignore_headers X-Accel-Buffering;",
        "            proxy_cache off;",
        "            # Request bodies stay buffered (nginx's default) on purpose: with unbuffered",
        "            # bodies nginx cannot retry once it began sending one, which would defeat",
        "            # the 503-while-draining retry below. Chat bodies are small.",
        "            proxy_request_buffering on;",
        "",
        f"            proxy_connect_timeout {policy.connect_timeout_seconds}s;",
        f"            proxy_read_timeout {read}s;",
        f"            proxy_send_timeout {send}s;",
        "",
        "            # Retry only where the first replica produced nothing: refused/reset",
        "            # connections and 502/503 (e.g. draining). No `timeout`: a slow generation",
        "            # is never started again elsewhere. `non_idempotent` is needed for POST;",
        "            # nginx never retries once any byte reached the client.",
        f"            proxy_next_upstream {_NEXT_UPSTREAM};",
        f"            proxy_next_upstream_tries {policy.retry_tries};",
        f"            proxy_next_upstream_timeout {policy.retry_window_seconds}s;",
    ]
    lines += [
        "",
        f"    upstream {UPSTREAM_NAME} {{",
        # A shared zone: every worker sees the same in-flight counts and failure marks, so
        # least_conn compares real load instead of one worker's share of it.
        "        zone llm_upstream 64k;",
    ]
    if method is not None:
        # Balancing methods must precede `keepalive` in the block (nginx docs).
        lines.append(f"        {method}")
    lines += [f"        server {address} {server_params};" for address in servers]
    keepalive = [
        f"        keepalive {policy.keepalive_connections};",
        # Below the servers' own idle timeout, so NGINX closes first.
        f"        keepalive_timeout {policy.keepalive_timeout_seconds}s;",
    ] if policy.keepalive_connections > 0 else []
    lines += keepalive
    lines.append("    }")
    if policy.bounded:
        lines += [
            "",
            "    # Every replica at its bound (nginx: \"no live upstreams\", 502): the request goes",
            "    # to the least busy replica instead, unbounded (components/affinity.py).",
            f"    upstream {affinity.SPILL_UPSTREAM} {{",
            f"        zone {affinity.SPILL_UPSTREAM} 64k;",
            "        least_conn;",
            *(f"        server {address} {spill_params};" for address in servers),
            *keepalive,
            "    }",
        ]
    lines += [
        "",
        "    server {",
        *_listen_lines(bind, tls_certificate, tls_key),
        f"        client_max_body_size {policy.client_max_body_size};",
        # $request_body (the body key) exists only while the body fits one memory buffer.
        *([f"        client_body_buffer_size {policy.client_max_body_size};"] if body_key else []),
        "        # Event streams must leave as they are produced; compression would batch them.",
        "        gzip off;",
        "",
        f"        location = {HEALTH_PATH} {{",
        "            access_log off;",
        "            default_type text/plain;",
        "            return 200 'ok';",
        "        }",
        "",
        "        # Only the OpenAI API is published; the engines' other routes stay private.",
        "        location / {",
        "            default_type application/json;",
        "            " + _json_error(404, "Not found: this endpoint serves only /v1/.",
                                     "not_found"),
        "        }",
        "",
        "        location @llm_too_many {",
        "            default_type application/json;",
        "            add_header Retry-After 1 always;",
        "            " + _json_error(429, "Too many requests or connections from this client; "
                                     "retry later.", "rate_limit_exceeded"),
        "        }",
        "",
        f"        location {API_PREFIX} {{",
        "            # Connections one client address may hold (connection_limits).",
        f"            limit_conn llm_conn_per_client {per_client};",
        "            limit_conn_status 429;",
        "            error_page 429 = @llm_too_many;",
        # NGINX's own 502 only (proxy_intercept_errors is off): every replica at its bound.
        *([f"            error_page 502 = {affinity.SPILL_LOCATION};"] if policy.bounded else []),
        "",
        f"            proxy_pass http://{UPSTREAM_NAME};",
        *proxy,
    ]
    if rate is not None:
        lines += [
            "",
            f"            limit_req zone=llm_rate burst={rate.burst} nodelay;",
            "            limit_req_status 429;",
        ]
    lines.append("        }")
    if policy.bounded:
        lines += [
            "",
            f"        location {affinity.SPILL_LOCATION} {{",
            f"            proxy_pass http://{affinity.SPILL_UPSTREAM};",
            *proxy,
            "        }",
        ]
    lines += [
        "    }",
        "}",
        "",
    ]
    return "\n".join(lines)
