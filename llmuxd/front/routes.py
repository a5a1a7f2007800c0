"""Which model a request needs and what the front answers itself. Pure: no sockets.

A request is one of: the front's own (`/health`, `/metrics`, `GET /v1/models`), a model's
(`POST /v1/...` by the JSON body's "model", `/upstream/NAME/PATH`), or an
error. vLLM's development endpoints (sleep, wake, RPC, weight updates, LoRA
loading, profiling...) answer to whoever reaches them, and llmuxd runs as root
on a GPU box: so a path passes only when it is on vLLM's public list, after
percent-decoding, and a path with dot segments, empty segments or escapes that
decode to "/" never passes at all.
"""

from __future__ import annotations

import functools
import json
import re
import time
from dataclasses import dataclass
from urllib.parse import unquote

from .. import states as S

# vLLM's public API (vllm/entrypoints/openai/api_server.py and serve/*): exact paths,
# and the prefixes under which everything is public but the few names below.
PUBLIC_PATHS = frozenset({"/health", "/ping", "/version", "/metrics", "/load", "/tokenize",
                          "/detokenize", "/pooling", "/classify", "/score", "/rerank",
                          "/invocations"})
PUBLIC_PREFIXES = ("/v1/", "/v2/")
# Reachable under /v1 when vLLM runs with VLLM_ALLOW_RUNTIME_LORA_UPDATING: they load
# code and weights from paths the client names.
BLOCKED_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
_SAFE_PATH = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@/-]*")


@dataclass(frozen=True)
class Reply:
    """An answer the front gives itself."""
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Route:
    """A request for a model: where it goes and what it carries."""
    model: str          # catalog name
    target: str         # path and query on the model's server
    body: bytes


FRONT_HEALTH = "health"
FRONT_MODELS = "models"
FRONT_METRICS = "metrics"   # llmuxd's own; a model's is /upstream/NAME/metrics

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
          429: "rate_limit_error", 502: "upstream_error", 503: "service_unavailable"}


def error(status: int, message: str, retry_after: float | None = None) -> Reply:
    """OpenAI's error shape: {"error": {"message", "type", "code"}}."""
    body = {"error": {"message": message, "type": _TYPES.get(status, "api_error"),
                      "param": None, "code": status}}
    headers = [("Content-Type", "application/json")]
    if retry_after is not None:
        headers.append(("Retry-After", str(max(1, int(retry_after + 0.999)))))
    if status == 401:
        headers.append(("WWW-Authenticate", "Bearer"))
    return Reply(status, json.dumps(body).encode(), tuple(headers))


def json_reply(status: int, obj) -> Reply:
    return Reply(status, json.dumps(obj).encode(), (("Content-Type", "application/json"),))


@functools.lru_cache(maxsize=256)  # pure; clients send the same few targets over and over
def split_target(target: str) -> tuple[str, str] | None:
    """(decoded path, "?query" or "") of a request target, or None when the path could
    mean something else to the server than to us."""
    path, sep, query = target.partition("?")
    if not path.startswith("/") or not _SAFE_PATH.fullmatch(path.replace("%", "")):
        return None
    if re.search(r"%(?![0-9A-Fa-f]{2})", path):
        return None
    decoded = unquote(path)
    if "%" in decoded or "\\" in decoded or any(ord(c) < 0x21 or ord(c) > 0x7e for c in decoded):
        return None  # double encoding, or bytes that are not a plain path
    segments = decoded.split("/")[1:]
    if any(seg in ("", ".", "..") for seg in segments[:-1]) or segments[-1] in (".", ".."):
        return None
    return decoded, (sep + query)


def is_public(path: str) -> bool:
    if path in BLOCKED_PATHS:
        return False
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES) and path not in PUBLIC_PREFIXES


_names: tuple = (None, {})  # (catalog, its names): a catalog is replaced, never changed


def names_of(catalog) -> dict[str, str]:
    """Every name a client may send -> the catalog name. Built once per catalog, not
    once per request."""
    global _names
    if _names[0] is catalog:
        return _names[1]
    names = {}
    for name, spec in catalog.models.items():
        names[name] = name
        for alias in spec.aliases:
            names.setdefault(alias, name)
    _names = (catalog, names)
    return names


def route(method: str, target: str, body: bytes, catalog):
    """FRONT_HEALTH, FRONT_MODELS, a Route or an error Reply."""
    split = split_target(target)
    if split is None:
        return error(400, "malformed request path")
    path, query = split
    if path == "/health":
        return FRONT_HEALTH
    if path == "/metrics":
        if method not in ("GET", "HEAD"):
            return error(405, f"{method} /metrics: only GET is allowed")
        return FRONT_METRICS
    if path == "/v1/models" or path.startswith("/v1/models/"):
        if method not in ("GET", "HEAD"):
            return error(405, f"{method} {path}: only GET is allowed")
        return FRONT_MODELS
    if path.startswith("/upstream/"):
        name, _, rest = path[len("/upstream/"):].partition("/")
        model = names_of(catalog).get(unquote(name))
        if model is None:
            return error(404, f"unknown model {name!r} (GET /v1/models lists them)")
        if not is_public("/" + rest):
            return error(404, f"/{rest} is not reachable through llmux")
        return Route(model, target[len("/upstream/") + len(target.split("/")[2]):] or "/", body)
    if not path.startswith("/v1/") or not is_public(path):
        return error(404, f"{path} is not reachable through llmux (/v1/... by \"model\", "
                          "/upstream/NAME/... for the rest of vLLM's API)")
    if method != "POST":
        return error(405, f"{method} {path}: use POST with a JSON body naming the \"model\" "
                          "(or /upstream/NAME/...)")
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return error(400, "the body must be JSON (an object with a \"model\")")
    if not isinstance(request, dict) or not isinstance(request.get("model"), str):
        return error(400, "the body must be a JSON object with a string \"model\"")
    model = names_of(catalog).get(request["model"])
    if model is None:
        return error(404, f"The model `{request['model']}` does not exist (GET /v1/models "
                          "lists them).")
    return Route(model, target, body)


def models_list(catalog, runtimes, path: str) -> Reply:
    """GET /v1/models (every catalog model, with its state) or /v1/models/ID."""
    now = int(time.time())
    cards = {}
    for name, spec in catalog.models.items():
        rt = runtimes.get(name)
        cards[name] = {"id": name, "object": "model", "created": now, "owned_by": "llmux",
                       "root": spec.model, "aliases": list(spec.aliases),
                       "state": rt.state if rt else S.STOPPED, "sleep_level": spec.sleep_level}
    if path == "/v1/models":
        return json_reply(200, {"object": "list", "data": list(cards.values())})
    wanted = names_of(catalog).get(unquote(path[len("/v1/models/"):]))
    if wanted is None:
        return error(404, f"The model `{path[len('/v1/models/'):]}` does not exist.")
    return json_reply(200, cards[wanted])
