"""The load-balancing policy rendered as a complete, runnable `nginx.conf` for local mode.

The second rendering of `components.policies.balancing.LoadBalancingConfig` (the first is the
controller's annotations, `balancing.ingress_annotations`); both read the same policy object
and the same derived values, so what local mode measures is what the cluster runs.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Literal

from components.policies import affinity
from components.policies import model_routing as routing
from components.policies.balancing import (
    _NEXT_UPSTREAM,
    API_PREFIX,
    CLIENT_BODY_TIMEOUT_SECONDS,
    HEALTH_PATH,
    SERVER_ADMISSION_DEFAULT,
    UPSTREAM_NAME,
    LoadBalancingConfig,
    lb_method_directive,
    read_timeout_seconds,
    send_timeout_seconds,
)

_HOST_LABEL = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?$")
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_./+-]+$")  # no spaces, quotes, ';', '{', '}', '$', '#'

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
    return f"return {status} '{routing.error_body(message, kind, None, code)}';"


def nginx_conf(
    policy: LoadBalancingConfig,
    upstreams: Sequence[str] | Mapping[str, Sequence[str]],
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
    models_created: int = 0,
) -> str:
    """A complete nginx.conf that runs without root: every writable path inside `prefix`.

    `upstreams` are the replicas' `host:port`; a bare port for `listen` binds 127.0.0.1.
    Several models: a mapping of served name -> its replicas' addresses, the first model being
    the default; nginx then routes by the body's `model` (components/policies/model_routing.py),
    each model with its own upstream and the policy's method, and answers GET /v1/models with
    every model (`models_created`: the cards' `created`). One entry renders exactly the
    single-model nginx.conf.
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
    routes, groups = _model_groups(upstreams)
    servers = [address for group in groups for address in group]
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
        "# Rendered by components/policies/balancing.py (local mode); edit the loadBalancing section,",
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
    if routes is not None:
        lines += ["", *routing.route_maps(routes)]
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
    keepalive = [
        f"        keepalive {policy.keepalive_connections};",
        # Below the servers' own idle timeout, so NGINX closes first.
        f"        keepalive_timeout {policy.keepalive_timeout_seconds}s;",
    ] if policy.keepalive_connections > 0 else []
    upstream_lines = partial(_upstream_blocks, method=method, server_params=server_params,
                             spill_params=spill_params, keepalive=keepalive,
                             bounded=policy.bounded)
    if routes is None:
        lines += upstream_lines(UPSTREAM_NAME, "llm_upstream", affinity.SPILL_UPSTREAM, servers)
    else:
        for name, upstream, group in zip(routes.names, routes.upstreams, groups):
            lines += ["", f"    # {name}"]
            lines += upstream_lines(upstream, upstream, f"{upstream}_spill", group)[1:]
        lines += ["", *routing.unknown_upstream()]
    limits = [
        "            # Connections one client address may hold (connection_limits).",
        f"            limit_conn llm_conn_per_client {per_client};",
        "            limit_conn_status 429;",
        "            error_page 429 = @llm_too_many;",
    ]
    rate_lines = [
        "",
        f"            limit_req zone=llm_rate burst={rate.burst} nodelay;",
        "            limit_req_status 429;",
    ] if rate is not None else []
    lines += [
        "",
        "    server {",
        *_listen_lines(bind, tls_certificate, tls_key),
        f"        client_max_body_size {policy.client_max_body_size};",
        # Every accepted body stays in one memory buffer (allocated at the body's size, not
        # this one): a body written to a temporary file (nginx's default beyond 8-16k) reaches
        # the replica in a second small write that waits ~40 ms for a delayed ACK (measured:
        # docs/load-balancing.md, "Request bodies"); and $request_body (the body key, the model)
        # exists only while the body is in memory.
        f"        client_body_buffer_size {policy.client_max_body_size};",
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
    ]
    if routes is None:
        lines += [
            f"        location {API_PREFIX} {{",
            *limits,
            # NGINX's own 502 only (proxy_intercept_errors is off): every replica at its bound.
            *([f"            error_page 502 = {affinity.SPILL_LOCATION};"] if policy.bounded
              else []),
            "",
            f"            proxy_pass http://{UPSTREAM_NAME};",
            *proxy,
            *rate_lines,
            "        }",
        ]
        if policy.bounded:
            lines += [
                "",
                f"        location {affinity.SPILL_LOCATION} {{",
                f"            proxy_pass http://{affinity.SPILL_UPSTREAM};",
                *proxy,
                "        }",
            ]
    else:
        lines += routing.api_locations(routes, _local_target(
            routes, limits, proxy, rate_lines, bounded=policy.bounded,
            auth_timeout=policy.connect_timeout_seconds, created=models_created))
    lines += [
        "    }",
        "}",
        "",
    ]
    return "\n".join(lines)


def _model_groups(
    upstreams: Sequence[str] | Mapping[str, Sequence[str]],
) -> tuple[routing.ModelRoutes | None, list[list[str]]]:
    """(the routes, None for one model; each model's validated replica addresses)."""
    if isinstance(upstreams, Mapping):
        if not upstreams:
            raise ValueError("nginx_conf needs at least one model")
        names = [str(name) for name in upstreams]
        groups = [list(addresses) for addresses in upstreams.values()]
        for name, addresses in zip(names, groups):
            if isinstance(addresses, str) or not addresses:
                raise ValueError(f"model {name!r} needs a list of at least one upstream address")
        if len(groups) == 1:  # one model: no routing, the single-model nginx.conf
            return None, [[_upstream_address(a) for a in groups[0]]]
        routes = routing.ModelRoutes(tuple(names))
    else:
        if isinstance(upstreams, str) or not upstreams:
            raise ValueError("nginx_conf needs at least one upstream address")
        routes, groups = None, [list(upstreams)]
    return routes, [[_upstream_address(a) for a in group] for group in groups]


def _upstream_blocks(name: str, zone: str, spill: str, servers: Sequence[str], *,
                     method: str | None, server_params: str, spill_params: str,
                     keepalive: list[str], bounded: bool) -> list[str]:
    """One model's upstream block, and its spill upstream with session_hash_bounded."""
    lines = [
        "",
        f"    upstream {name} {{",
        # A shared zone: every worker sees the same in-flight counts and failure marks, so
        # least_conn compares real load instead of one worker's share of it.
        f"        zone {zone} 64k;",
    ]
    if method is not None:
        # Balancing methods must precede `keepalive` in the block (nginx docs).
        lines.append(f"        {method}")
    lines += [f"        server {address} {server_params};" for address in servers]
    lines += keepalive
    lines.append("    }")
    if bounded:
        lines += [
            "",
            "    # Every replica at its bound (nginx: \"no live upstreams\", 502): the request goes",
            "    # to the least busy replica instead, unbounded (components/policies/affinity.py).",
            f"    upstream {spill} {{",
            f"        zone {spill} 64k;",
            "        least_conn;",
            *(f"        server {address} {spill_params};" for address in servers),
            *keepalive,
            "    }",
        ]
    return lines


def _local_target(routes: routing.ModelRoutes, limits: list[str], proxy: list[str],
                  rate_lines: list[str], *, bounded: bool, auth_timeout: int,
                  created: int) -> routing.RoutingTarget:
    """Local mode's rendering of the model-routing policy (components/policies/model_routing.py):
    an upstream per model, the connection and rate limits, the first model's replicas checking
    the API key before /v1/models, and a bounded model's spill for its own replicas."""
    route = routing.ROUTE_VARIABLE
    if bounded:
        unrouted = (
            "            # Every replica of the model at its bound: its unbounded least_conn spill.",
            f"            proxy_pass http://${{{route.lstrip('$')}}}_spill;",
            *proxy,
        )
    else:
        unrouted = ("            return 502;",)
    return routing.RoutingTarget(
        upstreams=routes.upstreams,
        proxy=tuple(proxy),
        guards=tuple(limits),
        rate=tuple(rate_lines),
        key_check=(
            f"            proxy_pass http://{routes.upstreams[0]}{routing.MODELS_PATH};",
            "            proxy_method GET;",
            "            proxy_pass_request_body off;",
            '            proxy_set_header Content-Length "";',
            "            proxy_http_version 1.1;",
            '            proxy_set_header Connection "";',
            "            proxy_set_header X-Request-ID $llm_request_id;",
            f"            proxy_connect_timeout {auth_timeout}s;",
            f"            proxy_read_timeout {auth_timeout}s;",
        ),
        known_unrouted=unrouted,
        models_created=created,
    )
