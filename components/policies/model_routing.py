"""Routing by the request's `model` field: one policy, two nginx renderings.

OpenAI clients name the model in the JSON body (`{"model": "...", ...}`), so whatever routes by
it has to read the body first. Two targets do, with stock nginx and no extra module:

- **local mode** (`nginx_conf` with several models, components/policies/nginx_conf.py): one
  upstream per model, the request proxied to its model's replicas;
- **the Gateway path's model router** (`router_conf`, deployed by components/resources/
  gateway.py): an nginx in front of NGINX Gateway Fabric, which cannot match on the body at the
  pinned versions. It hands the model on as `X-Gateway-Model-Name` (each model's HTTPRoute
  matches it exactly) and the path as `X-Forwarded-Path` (the endpoint picker reads the API
  from it; NGINX Gateway Fabric's shim does not pass the path on). Both are what the Inference
  Extension's body-based router would set, which only Istio and GKE can call (docs/gateway.md).

What the policy owns, the same in both (`ModelRoutes`, `body_maps`, `api_locations`):

1. **Read the body first.** `proxy_pass http://$llm_route;` evaluates its variables before the
   proxy module reads the body, so a `map` on `$request_body` alone would always see an empty
   body; and a map's value is cached for the request, so whatever reads it first fixes it. The
   mirror module reads the whole body in the precontent phase (before the content phase, where
   proxy_pass runs) when `mirror` and `mirror_request_body on` are set; its one subrequest goes
   to an internal location that answers 204 at once. The body must stay in memory for
   `$request_body` to exist: `client_body_buffer_size` is set to `client_max_body_size` (larger
   bodies are refused 413 anyway).
2. **Find the top-level `model` member.** A PCRE (`model_member_pattern`) walks the top-level
   object member by member, each value matched whole by a recursive JSON-value subpattern, so
   `"model"` inside a message, a nested object or an escaped string never counts; JSON
   whitespace, any key order, escaped quotes and `\\uXXXX`-escaped keys are handled, and of
   repeated keys the last one wins (as Python's `json`, which the server uses, and vLLM's
   parser). Every loop is possessive and every member atomic, so the match is linear in the
   body; `(*LIMIT_HEAP=...)` caps the memory nesting may take (far above the server's own depth
   limit, 32).
3. **Map the value to a route** (`value_map`): each served name matches in every JSON spelling
   of it (`\\/`, `\\u0041`), so the comparison is on the decoded string.

Decisions, in the order the value maps check them:

* a string naming a served model -> that model's route (local: its upstream, `upstream_name(i)`;
  router: the Gateway, with the model's served name in the header);
* any other string -> 404 in OpenAI's error shape (`param: model`, `code: model_not_found`)
  naming the served models (`unknown_model_return`). nginx can only answer it from a named
  location: the request goes to `UNKNOWN_UPSTREAM`, whose one server is `down`, nginx's own 502
  ("no live upstreams", logged at error level with the upstream name) is sent to
  `UNROUTED_LOCATION` by `error_page`, which answers the 404;
* no `model` member, a value that is not a string, or a body that is not a JSON object -> the
  first model, whose replicas answer exactly as in single-model mode (the server and vLLM
  require `model` as a string and report malformed JSON themselves).

`GET /v1/models` lists every model (`models_list_return`). Local mode first lets the first
model's replicas check the API key (`auth_request`); the router answers it at once (it holds no
key; the Gateway's model servers check it on every other request).

The facts each step relies on, with their source lines, are in
tests/contracts/data/nginx-1.22.1.json (local mode's Debian nginx: `proxyPassVariablesBeforeBody`,
`mirrorReadsBodyFirst`, `mapRegexErrorIsDefault`, ...) and nginx-unprivileged-1.29.8.json (the
router's image: the same code at 1.29.8, and the modules its package is built with).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from components.policies.balancing import (
    LoadBalancingConfig,
    read_timeout_seconds,
    send_timeout_seconds,
)

SERVED_NAME_MAX = 128
SERVED_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,%d}$" % (SERVED_NAME_MAX - 1))
"""Served names routing accepts: Hugging Face ids, paths, `name:tag`, up to 128 characters.
Nothing that nginx would read as a variable or a quote (`$`, `'`, `"`, `\\`), no spaces: a name
becomes part of a regular expression, an nginx string, a header value and JSON."""
NGINX_TOKEN_MAX = 4095
"""nginx reads one configuration parameter into a 4096-byte buffer (NGX_CONF_BUFFER)."""
BODY_HEAP_KIB = 64
"""PCRE2 heap the body match may use per request (`(*LIMIT_HEAP=...)`): about 130 levels of
nesting, four times what the server accepts. A deeper body is not matched and goes to the
first model, whose server refuses it; nginx logs the PCRE error at alert level."""

ROUTE_VARIABLE = "$llm_route"
"""The upstream a request goes to (a model's, or `UNKNOWN_UPSTREAM`)."""
MODEL_VALUE_VARIABLE = "$llm_model_value"
"""The JSON text of the body's top-level `model` value, empty when there is none."""
MODEL_VARIABLE = "$llm_model"
"""The router's: the served name of the model a request goes to (empty for an unknown one)."""
REQUESTED_VARIABLE = "$llm_requested_model"
"""An unknown model's name as the client sent it (JSON string content, escapes kept)."""
UNKNOWN_UPSTREAM = "llm_unknown_model"
BODY_READER = "/_llm_read_body"
UNROUTED_LOCATION = "@llm_unrouted"
MODELS_PATH = "/v1/models"
MODELS_LOCATION = "@llm_models"
AUTH_LOCATION = "/_llm_auth"
UNAUTHORIZED_LOCATION = "@llm_unauthorized"
OWNED_BY = "llm-serving"
"""`owned_by` of every model card, as the server's own /v1/models says."""


def upstream_name(index: int) -> str:
    """Local mode's upstream block of the `index`-th model (in the order given)."""
    return f"llm_model_{index}"


@dataclass(frozen=True)
class ModelRoutes:
    """The served names of the models behind one endpoint, the first being the default."""

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError("model routing needs at least one served model name")
        for name in self.names:
            check_served_name(name)
        repeated = sorted({n for n in self.names if self.names.count(n) > 1})
        if repeated:
            raise ValueError(f"served model names repeat: {', '.join(repeated)}; each model "
                             "needs its own name")

    @property
    def upstreams(self) -> tuple[str, ...]:
        """Local mode's upstream per model."""
        return tuple(upstream_name(i) for i in range(len(self.names)))


def check_served_name(name: str) -> str:
    if not isinstance(name, str) or not SERVED_NAME.match(name):
        raise ValueError(
            f"served model name {name!r} cannot be routed by the request's model field: use "
            f"1 to {SERVED_NAME_MAX} letters, digits and '.', '_', ':', '/', '@', '+', '-', "
            "starting with a letter or digit"
        )
    return name


# --- patterns ---------------------------------------------------------------------------------

_WS = r"[ \t\n\r]*+"
"""JSON whitespace (RFC 8259): PCRE's \\s would also take \\f and \\v."""
_STRING = r'"(?:[^"\\\x00-\x1f]++|\\(?:["\\/bfnrt]|u[0-9A-Fa-f]{4}))*+"'
"""A JSON string literal: no raw control characters, only JSON's escapes."""
_NUMBER = r"-?+(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?+(?:[eE][-+]?+[0-9]++)?+"
_VALUE = "(?&llm_json_value)"


def json_string_pattern(text: str) -> str:
    """PCRE matching the content of any JSON string literal that decodes to `text` (ASCII):
    each character as itself or as `\\uXXXX` (hex in either case), `/` also as `\\/`."""
    parts = []
    for char in text:
        if not char.isascii() or char in '"\\' or not char.isprintable():
            raise ValueError(f"{text!r}: only printable ASCII other than quote and backslash "
                             "is supported")
        spellings = [re.escape(char)]
        if char == "/":
            spellings.append(r"\\/")
        hex_digits = "".join(f"[{h}{h.upper()}]" if h.isalpha() else h
                             for h in f"{ord(char):04x}")
        spellings.append(r"\\u" + hex_digits)
        parts.append("(?:" + "|".join(spellings) + ")")
    return "".join(parts)


def model_member_pattern() -> str:
    """PCRE over a whole request body: matches a JSON object and captures, as
    `llm_model_json`, the JSON text of its last top-level `model` member's value (unset when
    the object has none); matches nothing that is not one JSON object."""
    value = (
        "(?<llm_json_value>(?>" + _STRING + "|" + _NUMBER
        # Python's json (the server's parser) also reads these three.
        + "|true|false|null|NaN|-?Infinity"
        + r"|\[" + _WS + "(?:" + _VALUE + _WS + "(?:," + _WS + _VALUE + _WS + r")*+)?+\]"
        + r"|\{" + _WS + "(?:" + _STRING + _WS + ":" + _WS + _VALUE + _WS
        + "(?:," + _WS + _STRING + _WS + ":" + _WS + _VALUE + _WS + r")*+)?+\}))"
    )
    key = '"' + json_string_pattern("model") + '"'
    member = ("(?>" + key + _WS + ":" + _WS + "(?<llm_model_json>" + _VALUE + "))"
              + "|(?>" + _STRING + _WS + ":" + _WS + _VALUE + ")")
    return (
        f"(*LIMIT_HEAP={BODY_HEAP_KIB})" + r"\A(?(DEFINE)" + value + ")"
        + _WS + r"\{" + _WS
        # Members, each followed by a comma and another member, or by the closing brace.
        + "(?:(?:" + member + ")" + _WS + "(?:," + _WS + r"(?!\})|(?=\})))*+"
        + r"\}" + _WS + r"\z"
    )


def nginx_string(text: str, what: str) -> str:
    """`text` as one double-quoted nginx parameter (nginx unescapes \\\\ and \\")."""
    quoted = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if len(quoted.encode()) > NGINX_TOKEN_MAX:
        raise ValueError(f"{what} renders to {len(quoted.encode())} bytes, more than one nginx "
                         f"parameter holds ({NGINX_TOKEN_MAX}); use a shorter name")
    return quoted


# --- answers ------------------------------------------------------------------------------------


def _served_list(routes: ModelRoutes) -> str:
    return ", ".join(f"`{name}`" for name in routes.names)


def error_body(message: str, kind: str, param: str | None, code: str) -> str:
    """An OpenAI-style error body for an nginx `return` (single-quoted: no `'` in message)."""
    if "'" in message:
        raise ValueError(f"error message {message!r} may not contain a single quote")
    param_json = "null" if param is None else json.dumps(param)
    return ('{"error":{"message":"' + message + '","type":"' + kind + '","param":'
            + param_json + ',"code":"' + code + '"}}')


def unknown_model_message(routes: ModelRoutes, requested: str) -> str:
    """The 404's message for a model that is not served."""
    return (f"The model `{requested}` does not exist; this endpoint serves "
            f"{_served_list(routes)}.")


def unknown_model_return(routes: ModelRoutes, requested: str = REQUESTED_VARIABLE) -> str:
    """The `return` answering a model that is not served: 404, naming every served model and
    the one asked for (`requested`: an nginx variable holding JSON string content)."""
    body = error_body(unknown_model_message(routes, requested), "invalid_request_error",
                      "model", "model_not_found")
    return f"return 404 '{body}';"


def unauthorized_return() -> str:
    """401 for /v1/models when the replicas refused the key (auth_request keeps no body)."""
    body = error_body("Incorrect or missing API key. Send `Authorization: Bearer <key>`.",
                      "invalid_request_error", None, "invalid_api_key")
    return f"return 401 '{body}';"


def api_only_return() -> str:
    """404 for any path outside the API."""
    body = error_body("Not found: this endpoint serves only /v1/.", "invalid_request_error",
                      None, "not_found")
    return f"return 404 '{body}';"


def models_list(routes: ModelRoutes, created: int = 0) -> dict[str, object]:
    """What GET /v1/models answers: one OpenAI model card per served model."""
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": OWNED_BY}
        for name in routes.names]}


def models_list_return(routes: ModelRoutes, created: int = 0) -> str:
    body = json.dumps(models_list(routes, created), separators=(",", ":"))
    return f"return 200 '{body}';"


# --- the shared nginx pieces ----------------------------------------------------------------------


def body_map() -> list[str]:
    """http-level lines defining `MODEL_VALUE_VARIABLE` from the (mirror-read) body."""
    return [
        "    # Routing by the body's top-level \"model\" member (components/policies/",
        "    # model_routing.py). $request_body exists once the mirror module has read the body.",
        f"    map $request_body {MODEL_VALUE_VARIABLE} {{",
        "        " + nginx_string("~" + model_member_pattern(), "the model member pattern")
        + " $llm_model_json;",
        '        default "";',
        "    }",
    ]


def value_map(routes: ModelRoutes, variable: str, per_model: Sequence[str], unknown: str,
              default: str) -> list[str]:
    """http-level map from the body's model value to `variable`: `per_model[i]` for the i-th
    served name (in any JSON spelling), `unknown` for another string, `default` otherwise.
    An unknown string also sets `REQUESTED_VARIABLE`."""
    if len(per_model) != len(routes.names):
        raise ValueError("value_map: one value per model")
    lines = [f"    map {MODEL_VALUE_VARIABLE} {variable} {{"]
    for name, value in zip(routes.names, per_model):
        pattern = '~^"' + json_string_pattern(name) + r'"\z'
        lines.append(f"        {nginx_string(pattern, f'served model name {name!r}')} "
                     f"{value};  # {name}")
    requested = REQUESTED_VARIABLE.lstrip("$")
    lines += [
        "        " + nginx_string(f'~^"(?<{requested}>.*)"\\z', "the unknown-model pattern")
        + f" {unknown};",
        f"        default {default};",
        "    }",
    ]
    return lines


def route_maps(routes: ModelRoutes, upstreams: Sequence[str] | None = None) -> list[str]:
    """http-level lines defining `MODEL_VALUE_VARIABLE` and `ROUTE_VARIABLE`: a served name
    (in any JSON spelling) -> its upstream (`upstreams`, local mode's `routes.upstreams` by
    default); another string -> `UNKNOWN_UPSTREAM`, answered 404; no model, or not a string ->
    the first model's."""
    upstreams = tuple(upstreams if upstreams is not None else routes.upstreams)
    return [
        *body_map(),
        "",
        "    # A served name (in any JSON spelling) -> its upstream; another string -> 404;",
        "    # no model, or not a string -> the first model, whose replicas answer as ever.",
        *value_map(routes, ROUTE_VARIABLE, upstreams, UNKNOWN_UPSTREAM, upstreams[0]),
    ]


@dataclass(frozen=True)
class RoutingTarget:
    """What one rendering puts around the shared routing; each target's renderer builds one
    (local mode: `nginx_conf._local_target`; the router: `router_conf`)."""

    upstreams: tuple[str, ...]
    """Where each model's requests go (`proxy_pass http://<upstream>`), in the models' order."""
    proxy: tuple[str, ...]
    """The directives that go with proxy_pass: headers, buffering, timeouts, retries."""
    guards: tuple[str, ...] = ()
    """Directives at the top of each API location (connection limits)."""
    rate: tuple[str, ...] = ()
    """limit_req directives at the end of each API location."""
    key_check: tuple[str, ...] | None = None
    """The directives of the internal location that checks the API key (auth_request) before
    GET /v1/models is answered; None: the list is answered at once."""
    known_unrouted: tuple[str, ...] = ("            return 502;",)
    """What nginx's own 502 for a served model (no live server) does."""
    models_created: int = 0
    """`created` of the model cards /v1/models lists."""


def api_locations(routes: ModelRoutes, target: RoutingTarget) -> list[str]:
    """The server-level locations that route the API by the body's model: GET /v1/models, /v1/
    (read the body, proxy to `ROUTE_VARIABLE`), the body reader and the 404 for an unknown
    model. Needs `route_maps` (or `body_map` and a `value_map` for `ROUTE_VARIABLE`) at http
    level and `client_body_buffer_size` = `client_max_body_size` in the server."""
    route = ROUTE_VARIABLE
    lines = [f"        location = {MODELS_PATH} {{", *target.guards]
    if target.key_check is not None:
        lines += [
            "            # The first model's replicas check the API key; then nginx lists every model.",
            "            # (A named location: `return` here would answer before the check.)",
            f"            auth_request {AUTH_LOCATION};",
            f"            error_page 401 = {UNAUTHORIZED_LOCATION};",
            f"            try_files /.llm-models-list {MODELS_LOCATION};",
            *target.rate,
            "        }",
            "",
            f"        location = {AUTH_LOCATION} {{",
            "            internal;",
            *target.key_check,
            "        }",
            "",
            f"        location {MODELS_LOCATION} {{",
            "            default_type application/json;",
            "            " + models_list_return(routes, target.models_created),
            "        }",
            "",
            f"        location {UNAUTHORIZED_LOCATION} {{",
            "            default_type application/json;",
            "            " + unauthorized_return(),
            "        }",
        ]
    else:
        lines += [
            *target.rate,
            "            default_type application/json;",
            "            " + models_list_return(routes, target.models_created),
            "        }",
        ]
    lines += [
        "",
        "        location /v1/ {",
        *target.guards,
        "            # nginx's own 502 (proxy_intercept_errors is off): an unknown model, or no live",
        "            # replica of a known one.",
        f"            error_page 502 = {UNROUTED_LOCATION};",
        "",
        f"            # proxy_pass evaluates {route} before it reads the body: the mirror module reads",
        "            # the whole body first (its one subrequest is answered 204 at once).",
        f"            mirror {BODY_READER};",
        "            mirror_request_body on;",
        f"            proxy_pass http://{route};",
        *target.proxy,
        *target.rate,
        "        }",
        "",
        f"        location = {BODY_READER} {{",
        "            internal;",
        "            return 204;",
        "        }",
        "",
        f"        location {UNROUTED_LOCATION} {{",
        "            default_type application/json;",
        f"            if ({route} = {UNKNOWN_UPSTREAM}) {{",
        "                " + unknown_model_return(routes),
        "            }",
        *target.known_unrouted,
        "        }",
    ]
    return lines


def unknown_upstream() -> list[str]:
    """The upstream an unknown model's requests go to: no live server, so nginx's own 502."""
    return [
        "    # Requests for a model that is not served (model_routing.py): no live server, so",
        f"    # nginx's own 502 goes to {UNROUTED_LOCATION}, which answers 404.",
        f"    upstream {UNKNOWN_UPSTREAM} {{",
        "        server 127.0.0.1:1 down;",
        "    }",
    ]


# --- the Gateway path's model router ------------------------------------------------------------

MODEL_HEADER = "X-Gateway-Model-Name"
"""The header the Inference Extension's body-based router sets from the body's `model`
(tests/contracts/data/gateway-api-inference-extension-1.5.0.json, bbr.defaultPlugins) and the
HTTPRoutes match."""
PATH_HEADER = "X-Forwarded-Path"
"""One of the headers the endpoint picker takes the API path from (requestHandling.pathDetection)."""

ROUTER_PORT = 8080
"""Plain HTTP (the image's unprivileged port)."""
ROUTER_TLS_PORT = 8443
ROUTER_NOT_FOUND_PORT = 8081
"""The server the Gateway's catch-all route sends requests no HTTPRoute matched to; it also
answers the pods' probes on ROUTER_HEALTH_PATH (the API port may redirect everything to HTTPS)."""
ROUTER_HEALTH_PATH = "/router-health"
ROUTER_TLS_DIR = "/etc/llm-router/tls"
"""Where the router's pod mounts the TLS Secret (`tls.crt`, `tls.key`)."""
ROUTER_WRITABLE_DIR = "/tmp"
"""The only writable path of the router's pod (pid file, temp files)."""
GATEWAY_UPSTREAM = "gateway"


@dataclass(frozen=True)
class RouterPlan:
    """Everything the router's nginx.conf is rendered from."""

    models: tuple[str, ...]
    """Served names, in the stack's order (the first is the default model)."""
    gateway_host: str
    """The Gateway's data-plane Service (cluster DNS name)."""
    gateway_port: int
    policy: LoadBalancingConfig
    max_output_tokens: int
    """The longest output budget of the models (sets the read timeout)."""
    tls: bool = False
    listen_port: int = ROUTER_PORT
    not_found_port: int = ROUTER_NOT_FOUND_PORT
    writable_dir: str = ROUTER_WRITABLE_DIR
    user: str | None = None
    """`user` directive; None in the pod (it runs unprivileged), root for a test run as root."""
    routes: ModelRoutes = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "routes", ModelRoutes(tuple(self.models)))


def router_conf(plan: RouterPlan) -> str:
    """The router's nginx.conf: the routing policy with the Gateway as every model's upstream
    and the model named in `MODEL_HEADER`."""
    lb, routes = plan.policy, plan.routes
    read = read_timeout_seconds(lb, plan.max_output_tokens)
    send = send_timeout_seconds(lb, plan.max_output_tokens)
    rate = lb.rate_limit
    header_variable = f"$http_{MODEL_HEADER.lower().replace('-', '_')}"
    target = RoutingTarget(
        upstreams=(GATEWAY_UPSTREAM,) * len(routes.names),
        proxy=(
            "            proxy_http_version 1.1;",
            '            proxy_set_header Connection "";',
            "            proxy_set_header Host $host;",
            # The served name as the routes spell it, whatever the client sent in the header.
            f"            proxy_set_header {MODEL_HEADER} {MODEL_VARIABLE};",
            f"            proxy_set_header {PATH_HEADER} $request_uri;",
            "            proxy_buffering off;",
            f"            proxy_connect_timeout {lb.connect_timeout_seconds}s;",
            f"            proxy_read_timeout {read}s;",
            f"            proxy_send_timeout {send}s;",
        ),
        rate=(
            f"            limit_req zone=llm_clients burst={rate.burst} nodelay;",
            "            limit_req_status 429;",
        ) if rate is not None else (),
    )
    lines = [
        "# Rendered from the stack configuration (components/policies/model_routing.py).",
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
        "",
        *route_maps(routes, target.upstreams),
        "",
        "    # The served name each model's HTTPRoute matches in the header.",
        *value_map(routes, MODEL_VARIABLE, routes.names, '""', routes.names[0]),
        "",
        "    # A request no HTTPRoute matched (the catch-all route): its header, if a name.",
        f"    map {header_variable} $llm_unmatched {{",
        f"        '~^(?<llm_unmatched_name>{SERVED_NAME.pattern[1:-1]})$' $llm_unmatched_name;",
        '        default "(none)";',
        "    }",
    ]
    if rate is not None:
        lines.append(f"    limit_req_zone $binary_remote_addr zone=llm_clients:10m "
                     f"rate={rate.requests_per_second}r/s;")
    lines += [
        "",
        f"    upstream {GATEWAY_UPSTREAM} {{",
        f"        server {plan.gateway_host}:{plan.gateway_port};",
        f"        keepalive {max(lb.keepalive_connections, 1)};",
        f"        keepalive_timeout {lb.keepalive_timeout_seconds}s;",
        "    }",
        "",
        *unknown_upstream(),
        "",
        "    server {",
        f"        listen {plan.listen_port};",
    ]
    if plan.tls:
        lines += [
            f"        listen {ROUTER_TLS_PORT} ssl;",
            f"        ssl_certificate {ROUTER_TLS_DIR}/tls.crt;",
            f"        ssl_certificate_key {ROUTER_TLS_DIR}/tls.key;",
            "        ssl_protocols TLSv1.2 TLSv1.3;",
        ]
    lines += [
        f"        client_max_body_size {lb.client_max_body_size};",
        "        # The whole body in one memory buffer: $request_body is empty otherwise.",
        f"        client_body_buffer_size {lb.client_max_body_size};",
    ]
    if plan.tls:
        lines.append("        if ($scheme = http) { return 308 https://$host$request_uri; }")
    lines += [
        "",
        *api_locations(routes, target),
        "",
        "        location / {",
        "            default_type application/json;",
        "            " + api_only_return(),
        "        }",
        "    }",
        "",
        "    server {",
        f"        listen {plan.not_found_port};",
        f"        location = {ROUTER_HEALTH_PATH} {{ return 200 'ok'; }}",
        "        location / {",
        "            default_type application/json;",
        "            " + unknown_model_return(routes, "$llm_unmatched"),
        "        }",
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"
