"""The model router of the Gateway path: an nginx in front of NGINX Gateway Fabric that reads the
request's `model` field and hands it on as the header the HTTPRoutes match.

Why it exists (tests/contracts/data, docs/gateway.md): at the pinned versions NGINX Gateway Fabric
cannot match on the request body, and the Inference Extension's body-based router (an ext_proc
that copies `model` into `X-Gateway-Model-Name`) can be called only by Istio or GKE, not by
NGINX Gateway Fabric. So this nginx does what that router would: it reads the whole body (a
chat request is small), takes `model` from it with a regular expression over `$request_body`
(the same technique local mode's body-hash key uses, components/policies/affinity.py) and sets

- `X-Gateway-Model-Name: <model>`: each model's HTTPRoute matches it exactly;
- `X-Forwarded-Path: <the request's path>`: NGINX Gateway Fabric's endpoint-picker shim does
  not pass the path on, and without it the endpoint picker reads every request as
  /v1/completions and refuses chat requests (they would then bypass it).

It answers `GET /v1/models` itself with every model of the stack (no model server knows the
others), and a second server on `NOT_FOUND_PORT` answers the Gateway's catch-all route with an
OpenAI-style 404 naming the available models. It proxies unbuffered (streamed tokens go out as
they come), with the loadBalancing policy's timeouts, body limit and per-client rate limit.

Pure: the text of one nginx.conf, rendered into a ConfigMap by components/resources/gateway.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from components.policies.balancing import (
    LoadBalancingConfig,
    read_timeout_seconds,
    send_timeout_seconds,
)

MODEL_HEADER = "X-Gateway-Model-Name"
"""The header the Inference Extension's body-based router sets from the body's `model`
(tests/contracts/data/gateway-api-inference-extension-1.5.0.json, bbr.defaultPlugins) and the
HTTPRoutes match."""
PATH_HEADER = "X-Forwarded-Path"
"""One of the headers the endpoint picker takes the API path from (requestHandling.pathDetection)."""

LISTEN_PORT = 8080
"""Plain HTTP (the image's unprivileged port)."""
TLS_PORT = 8443
NOT_FOUND_PORT = 8081
"""The server the Gateway's catch-all route sends requests for unknown models to; it also
answers the pods' probes on HEALTH_PATH (the API port may redirect everything to HTTPS)."""
HEALTH_PATH = "/router-health"

TLS_DIR = "/etc/llm-router/tls"
"""Where the router's pod mounts the TLS Secret (`tls.crt`, `tls.key`)."""
WRITABLE_DIR = "/tmp"
"""The only writable path of the router's pod (pid file, temp files)."""

SERVED_NAME = re.compile(r"^[A-Za-z0-9._/:@+-]{1,128}$")
"""Served names the router can carry: they become an nginx string, a header value and JSON."""

# The body's top-level `model` string. A JSON string cannot hold an unescaped quote, so the
# pattern cannot match inside another string's text; it could match a nested object's "model"
# key placed before the top-level one (no OpenAI request body has one).
_MODEL_FIELD = r'"model"\s*:\s*"(?<llm_model_name>[^"\x5c]{1,128})"'
"""PCRE inside an nginx string: `\x5c` is the backslash (nginx would eat a doubled one)."""


@dataclass(frozen=True)
class RouterPlan:
    """Everything the router's nginx.conf is rendered from."""

    models: tuple[str, ...]
    """Served names, in the stack's order."""
    gateway_host: str
    """The Gateway's data-plane Service (cluster DNS name)."""
    gateway_port: int
    policy: LoadBalancingConfig
    max_output_tokens: int
    """The longest output budget of the models (sets the read timeout)."""
    tls: bool = False
    listen_port: int = LISTEN_PORT
    not_found_port: int = NOT_FOUND_PORT
    writable_dir: str = WRITABLE_DIR
    user: str | None = None
    """`user` directive; None in the pod (it runs unprivileged), root for a test run as root."""

    def __post_init__(self) -> None:
        bad = [m for m in self.models if not SERVED_NAME.match(m)]
        if not self.models or bad:
            raise ValueError(f"RouterPlan: 'models' needs served names matching "
                             f"{SERVED_NAME.pattern}, got {list(self.models)}")


def models_list(models: tuple[str, ...] | list[str]) -> dict:
    """The OpenAI `GET /v1/models` answer listing every model of the stack."""
    return {"object": "list",
            "data": [{"id": m, "object": "model", "owned_by": "llm-serving"} for m in models]}


def not_found_body(models: tuple[str, ...] | list[str], model: str) -> dict:
    """The OpenAI-style 404 for a model the stack does not serve (the server's wording)."""
    return {"error": {
        "message": f"The model `{model}` does not exist; available models: "
                   f"{', '.join(f'`{m}`' for m in models)}.",
        "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}


def _literal(value: dict) -> str:
    """JSON as an nginx single-quoted string; `$` would start a variable, so none may occur."""
    text = json.dumps(value, separators=(",", ":"))
    if "$" in text:
        raise ValueError("router: '$' cannot appear in a literal answer")
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def router_conf(plan: RouterPlan) -> str:
    """The router's nginx.conf."""
    lb = plan.policy
    read = read_timeout_seconds(lb, plan.max_output_tokens)
    send = send_timeout_seconds(lb, plan.max_output_tokens)
    # The unknown model's name goes into the 404 text: only a safe one is echoed.
    marker = "MODEL_PLACEHOLDER"
    not_found = _literal(not_found_body(plan.models, marker)).replace(marker, "$llm_unknown")
    rate = lb.rate_limit
    lines = [
        "# Rendered from the stack configuration (components/policies/model_router.py).",
        *([f"user {plan.user};"] if plan.user else []),
        "worker_processes auto;",
        f"pid {plan.writable_dir}/nginx.pid;",
        "error_log stderr warn;",
        "events { worker_connections 4096; }",
        "http {",
        f"    client_body_temp_path {plan.writable_dir}/client_temp;",
        f"    proxy_temp_path {plan.writable_dir}/proxy_temp;",
        f"    fastcgi_temp_path {plan.writable_dir}/fastcgi_temp;",
        f"    uwsgi_temp_path {plan.writable_dir}/uwsgi_temp;",
        f"    scgi_temp_path {plan.writable_dir}/scgi_temp;",
        "    access_log off;",
        "    server_tokens off;",
        "    # The body's model, once the body is read (proxy_set_header is evaluated then).",
        "    map $request_body $llm_model {",
        f"        '~{_MODEL_FIELD}' $llm_model_name;",
        '        default "";',
        "    }",
        f"    map $http_{MODEL_HEADER.lower().replace('-', '_')} $llm_unknown {{",
        f"        '~^(?<llm_unknown_name>{SERVED_NAME.pattern[1:-1]})$' $llm_unknown_name;",
        '        default "(none)";',
        "    }",
    ]
    if rate is not None:
        lines.append(f"    limit_req_zone $binary_remote_addr zone=llm_clients:10m "
                     f"rate={rate.requests_per_second}r/s;")
    lines += [
        "    upstream gateway {",
        f"        server {plan.gateway_host}:{plan.gateway_port};",
        f"        keepalive {max(lb.keepalive_connections, 1)};",
        f"        keepalive_timeout {lb.keepalive_timeout_seconds}s;",
        "    }",
        "    server {",
        f"        listen {plan.listen_port};",
    ]
    if plan.tls:
        lines += [
            f"        listen {TLS_PORT} ssl;",
            f"        ssl_certificate {TLS_DIR}/tls.crt;",
            f"        ssl_certificate_key {TLS_DIR}/tls.key;",
            "        ssl_protocols TLSv1.2 TLSv1.3;",
        ]
    lines += [
        f"        client_max_body_size {lb.client_max_body_size};",
        "        # The whole body in one memory buffer: $request_body is empty otherwise.",
        f"        client_body_buffer_size {lb.client_max_body_size};",
        "        client_body_in_single_buffer on;",
    ]
    if plan.tls:
        lines.append("        if ($scheme = http) { return 308 https://$host$request_uri; }")
    lines += [
        "        location = /v1/models {",
        "            default_type application/json;",
        f"            return 200 {_literal(models_list(plan.models))};",
        "        }",
        "        location /v1/ {",
    ]
    if rate is not None:
        lines += [
            f"            limit_req zone=llm_clients burst={rate.burst} nodelay;",
            "            limit_req_status 429;",
        ]
    lines += [
        "            proxy_pass http://gateway;",
        "            proxy_http_version 1.1;",
        '            proxy_set_header Connection "";',
        "            proxy_set_header Host $host;",
        f"            proxy_set_header {MODEL_HEADER} $llm_model;",
        f"            proxy_set_header {PATH_HEADER} $request_uri;",
        "            proxy_buffering off;",
        f"            proxy_connect_timeout {lb.connect_timeout_seconds}s;",
        f"            proxy_read_timeout {read}s;",
        f"            proxy_send_timeout {send}s;",
        "        }",
        "        location / {",
        "            default_type application/json;",
        "            return 404 '{\"error\":{\"message\":\"Not found: only the OpenAI API under "
        "/v1 is served.\",\"type\":\"invalid_request_error\",\"code\":\"not_found\"}}';",
        "        }",
        "    }",
        "    server {",
        f"        listen {plan.not_found_port};",
        f"        location = {HEALTH_PATH} {{ return 200 'ok'; }}",
        "        location / {",
        "            default_type application/json;",
        f"            return 404 {not_found};",
        "        }",
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"
