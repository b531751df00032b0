"""Routing by the request's `model` field: several models behind one local-mode nginx.

OpenAI clients name the model in the JSON body (`{"model": "...", ...}`), so the router has to
read the body before it picks an upstream. Stock nginx can, with no extra module:

1. **Read the body first.** `proxy_pass http://$llm_route;` evaluates its variables before the
   proxy module reads the body, so a `map` on `$request_body` alone would always see an empty
   body. The mirror module reads the whole body in the precontent phase (before the content
   phase, where proxy_pass runs) when `mirror` and `mirror_request_body on` are set; its one
   subrequest goes to an internal location that answers 204 at once. The body must stay in
   memory for `$request_body` to exist: `client_body_buffer_size` is set to
   `client_max_body_size` (larger bodies are refused 413 anyway).
2. **Find the top-level `model` member.** A PCRE (`model_member_pattern`) walks the top-level
   object member by member, each value matched whole by a recursive JSON-value subpattern, so
   `"model"` inside a message, a nested object or an escaped string never counts; JSON
   whitespace, any key order, escaped quotes and `\\uXXXX`-escaped keys are handled, and of
   repeated keys the last one wins (as Python's `json`, which the server uses). Every loop is
   possessive and every member atomic, so the match is linear in the body; `(*LIMIT_HEAP=...)`
   caps the memory nesting may take (far above the server's own depth limit, 32).
3. **Map the value to an upstream** (`route_map`): each served name matches in every JSON
   spelling of it (`\\/`, `\\u0041`), so the comparison is on the decoded string.

Decisions, in the order the route map checks them:

* a string naming a served model -> that model's upstream (`upstream_name(i)`);
* any other string -> 404 in OpenAI's error shape (`param: model`, `code: model_not_found`)
  naming the served models (`unknown_model_return`). nginx can only answer it from a named
  location: the request goes to `UNKNOWN_UPSTREAM`, whose one server is `down`, nginx's own 502
  ("no live upstreams", logged at error level with the upstream name) is sent to
  `UNROUTED_LOCATION` by `error_page`, which answers the 404;
* no `model` member, a value that is not a string, or a body that is not a JSON object -> the
  first model's upstream, whose replicas answer exactly as in single-model mode (the server
  requires `model` as a string and reports malformed JSON itself).

`GET /v1/models` lists every model (`models_list_return`): the first model's replicas check
the API key (`auth_request`), then nginx answers the list itself.

The facts each step relies on, with their source lines, are in
tests/contracts/data/nginx-1.22.1.json (`proxyPassVariablesBeforeBody`, `mirrorReadsBodyFirst`,
`mapRegexErrorIsDefault`, ...).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

SERVED_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")
"""Served names local-mode routing accepts: Hugging Face ids, paths, `name:tag`. Nothing that
nginx would read as a variable or a quote (`$`, `'`, `"`, `\\`), no spaces."""
NGINX_TOKEN_MAX = 4095
"""nginx reads one configuration parameter into a 4096-byte buffer (NGX_CONF_BUFFER)."""
BODY_HEAP_KIB = 64
"""PCRE2 heap the body match may use per request (`(*LIMIT_HEAP=...)`): about 130 levels of
nesting, four times what the server accepts. A deeper body is not matched and goes to the
first model, whose server refuses it; nginx logs the PCRE error at alert level."""

ROUTE_VARIABLE = "$llm_route"
"""The upstream a request goes to (`upstream_name(i)` or `UNKNOWN_UPSTREAM`)."""
MODEL_VALUE_VARIABLE = "$llm_model_value"
"""The JSON text of the body's top-level `model` value, empty when there is none."""
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
    """The upstream block of the `index`-th model (in the order given)."""
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
        return tuple(upstream_name(i) for i in range(len(self.names)))


def check_served_name(name: str) -> str:
    if not isinstance(name, str) or not SERVED_NAME.match(name):
        raise ValueError(
            f"served model name {name!r} cannot be routed by local mode's nginx: use letters, "
            "digits and '.', '_', ':', '/', '@', '+', '-', starting with a letter or digit"
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


# --- renderings ---------------------------------------------------------------------------------


def route_maps(routes: ModelRoutes) -> list[str]:
    """http-level lines defining `MODEL_VALUE_VARIABLE` and `ROUTE_VARIABLE`."""
    lines = [
        "    # Routing by the body's top-level \"model\" member (components/policies/",
        "    # model_routing.py). $request_body exists once the mirror module has read the body.",
        f"    map $request_body {MODEL_VALUE_VARIABLE} {{",
        "        " + nginx_string("~" + model_member_pattern(), "the model member pattern")
        + " $llm_model_json;",
        '        default "";',
        "    }",
        "",
        "    # A served name (in any JSON spelling) -> its upstream; another string -> 404;",
        "    # no model, or not a string -> the first model, whose replicas answer as ever.",
        f"    map {MODEL_VALUE_VARIABLE} {ROUTE_VARIABLE} {{",
    ]
    for name, upstream in zip(routes.names, routes.upstreams):
        pattern = '~^"' + json_string_pattern(name) + r'"\z'
        lines.append(f"        {nginx_string(pattern, f'served model name {name!r}')} "
                     f"{upstream};  # {name}")
    requested = REQUESTED_VARIABLE.lstrip("$")
    lines += [
        "        " + nginx_string(f'~^"(?<{requested}>.*)"\\z', "the unknown-model pattern")
        + f" {UNKNOWN_UPSTREAM};",
        f"        default {routes.upstreams[0]};",
        "    }",
    ]
    return lines


def _served_list(routes: ModelRoutes) -> str:
    return ", ".join(f"`{name}`" for name in routes.names)


def error_body(message: str, kind: str, param: str | None, code: str) -> str:
    """An OpenAI-style error body for an nginx `return` (single-quoted: no `'` in message)."""
    if "'" in message:
        raise ValueError(f"error message {message!r} may not contain a single quote")
    param_json = "null" if param is None else json.dumps(param)
    return ('{"error":{"message":"' + message + '","type":"' + kind + '","param":'
            + param_json + ',"code":"' + code + '"}}')


def unknown_model_return(routes: ModelRoutes) -> str:
    """The `return` answering a model that is not served: 404, naming every served model."""
    message = (f"The model `{REQUESTED_VARIABLE}` does not exist; this endpoint serves "
               f"{_served_list(routes)}.")
    body = error_body(message, "invalid_request_error", "model", "model_not_found")
    return f"return 404 '{body}';"


def unauthorized_return() -> str:
    """401 for /v1/models when the replicas refused the key (auth_request keeps no body)."""
    body = error_body("Incorrect or missing API key. Send `Authorization: Bearer <key>`.",
                      "invalid_request_error", None, "invalid_api_key")
    return f"return 401 '{body}';"


def models_list(routes: ModelRoutes, created: int = 0) -> dict[str, object]:
    """What GET /v1/models answers: one OpenAI model card per served model."""
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": OWNED_BY}
        for name in routes.names]}


def models_list_return(routes: ModelRoutes, created: int = 0) -> str:
    body = json.dumps(models_list(routes, created), separators=(",", ":"))
    return f"return 200 '{body}';"
