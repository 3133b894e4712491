"""Admin API request bodies (strictly validated) and the OpenAPI document built from the same models."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from . import __version__
from .proxy import parse_target
from .records import MAX_REPLICAS, NAME_PATTERN, check_name, check_service_name

# Names are checked by the records' own rules (a message that says what is allowed); the pattern stays in
# the OpenAPI document for clients.
DeploymentName = Annotated[str, AfterValidator(check_name)]
ServiceName = Annotated[str, AfterValidator(check_service_name)]
_NAME = Field(json_schema_extra={"pattern": NAME_PATTERN.pattern},
              description="Deployment name: 1-63 letters, digits, '.', '_' or '-'.")
_REASON = Field(default="", max_length=1000, description="Why: goes into the history and the registry tags.")
_GENERATION = Field(
    default=None, ge=0, le=2**53, description="Apply only if the route still has this generation (else 409)."
)


class Strict(BaseModel):
    """No unknown fields, no type coercion."""

    model_config = ConfigDict(extra="forbid", strict=True)


def _check_url(url: str) -> None:
    """The shape the url field's pattern enforces, plus what the gateway needs to reach it."""
    if len(url) > 2000 or not _URL.fullmatch(url):
        raise ValueError(f"not an http://host[:port][/path] URL (letters, digits, '.', '-', IPv6 in brackets): {url!r}")
    parse_target(url)


def _check_urls(urls: list[str] | None) -> list[str] | None:
    """Every replica URL checked, none given twice."""
    if urls is not None:
        for url in urls:
            _check_url(url)
        if len({url.rstrip("/") for url in urls}) != len(urls):
            raise ValueError("a replica URL is given twice")
    return urls


_URL = re.compile(r"http://[A-Za-z0-9.\-\[\]:]+(/\S*)?")


class CreateDeployment(Strict):
    """A deployment served by a worker (``model_uri``) or by someone else (``url``)."""

    name: DeploymentName = _NAME
    model_uri: str | None = Field(
        default=None, min_length=1, max_length=2000, pattern=r"^(runs|models):/\S+$",
        description="runs:/<run_id>/<path>, models:/<name>/<version>, models:/<name>@<alias> or models:/m-<id>: a worker with --claim serves it.",
    )
    url: str | None = Field(
        default=None, max_length=2000, json_schema_extra={"pattern": f"^{_URL.pattern}$"},
        description="http://host:port of a model server run elsewhere (trusted as ready).",
    )
    urls: list[str] | None = Field(
        default=None, min_length=1, max_length=64,
        description="http://host:port of each replica of a model server run elsewhere: the gateway balances them.",
    )
    mlflow_name: str | None = Field(default=None, min_length=1, max_length=500, description="Registered model of an external server.")
    mlflow_version: str | None = Field(default=None, pattern=r"^\d{1,9}$", description="Its registered version.")
    replicas: int | None = Field(
        default=None, ge=1, le=MAX_REPLICAS,
        description="Model-server processes workers run for a model_uri deployment (default 1); the gateway balances them.",
    )
    min_ready: int | None = Field(
        default=None, ge=1, le=MAX_REPLICAS,
        description="Ready replicas needed before a switch may make it active (default: all of them).",
    )

    @field_validator("url")
    @classmethod
    def _reachable(cls, url: str | None) -> str | None:
        if url is not None:
            _check_url(url)
        return url

    @field_validator("urls")
    @classmethod
    def _all_reachable(cls, urls: list[str] | None) -> list[str] | None:
        return _check_urls(urls)

    @model_validator(mode="after")
    def _one_source(self) -> CreateDeployment:
        if sum(source is not None for source in (self.model_uri, self.url, self.urls)) != 1:
            raise ValueError("give exactly one of model_uri, url and urls")
        if self.model_uri is not None and (self.mlflow_name or self.mlflow_version):
            raise ValueError("mlflow_name/mlflow_version are resolved from model_uri by the worker")
        if self.model_uri is None and (self.replicas is not None or self.min_ready is not None):
            raise ValueError("replicas and min_ready are for a model_uri deployment; an external one has a replica per URL in urls")
        check_min_ready(self.replicas or 1, self.min_ready)
        return self


def check_min_ready(replicas: int, min_ready: int | None) -> None:
    """``ValueError`` unless ``min_ready`` (when set) is at most ``replicas``."""
    if min_ready is not None and min_ready > replicas:
        raise ValueError(f"min_ready ({min_ready}) cannot exceed replicas ({replicas})")


class ScaleDeployment(Strict):
    """Change how many replicas a deployment has: new ones warm up before they take requests, removed ones
    drain (no new requests; in-flight ones finish) before their servers stop. An external deployment
    takes a new list of URLs instead."""

    replicas: int | None = Field(default=None, ge=1, le=MAX_REPLICAS, description="Model-server processes wanted.")
    min_ready: int | None = Field(
        default=None, ge=1, le=MAX_REPLICAS,
        description="Ready replicas needed before a switch may make it active; null: all of them.",
    )
    urls: list[str] | None = Field(
        default=None, min_length=1, max_length=MAX_REPLICAS, description="An external deployment's replica URLs.",
    )
    reason: str = _REASON

    @field_validator("urls")
    @classmethod
    def _all_reachable(cls, urls: list[str] | None) -> list[str] | None:
        return _check_urls(urls)

    @model_validator(mode="after")
    def _something(self) -> ScaleDeployment:
        given = self.model_fields_set - {"reason"}
        if not given:
            raise ValueError("give replicas and/or min_ready (or urls, for an external deployment)")
        if "urls" in given and given != {"urls"}:
            raise ValueError("urls (an external deployment) goes alone: replicas and min_ready are for a model_uri deployment")
        if "urls" in given and self.urls is None:
            raise ValueError("urls cannot be null")
        if "replicas" in given and self.replicas is None:
            raise ValueError("replicas cannot be null")
        return self


class CanaryRequest(Strict):
    """Start a canary rollout of ``candidate``: each step's weight is held ``step_seconds`` and judged against
    the active deployment over the same seconds; every step passed promotes it, a breach aborts it."""

    candidate: DeploymentName = _NAME
    steps: list[float] = Field(min_length=1, max_length=20, description="Weights in percent, increasing, each in (0, 100].")
    step_seconds: float = Field(gt=0, le=7 * 86400, description="Seconds each step holds its weight (at least).")
    sticky_header: str | None = Field(
        default=None, min_length=1, max_length=100,
        description="A request header (e.g. X-User-Id) whose value keeps a user on one version for the whole rollout.",
    )
    max_error_rate_increase: float = Field(default=0.01, ge=0, le=1,
                                           description="Candidate failure rate allowed above the baseline's (0.01: 1 point).")
    max_latency_ratio: float = Field(default=1.5, ge=1, le=100, description="Candidate p99 allowed over the baseline's p99, as a ratio.")
    min_requests: int = Field(default=50, ge=1, le=10**7, description="Judged requests each side needs before the gate judges.")
    reason: str = _REASON


class CanaryAction(Strict):
    """Pause, resume, promote or abort the running canary."""

    reason: str = _REASON


class ShadowRequest(Strict):
    """Copy ``percent`` of the requests the active deployment answers to ``deployment`` and compare the answers."""

    deployment: DeploymentName = _NAME
    percent: float = Field(ge=0, le=100, description="Share of requests copied, in percent.")
    reason: str = _REASON


class SwitchRequest(Strict):
    """Make ``target`` active; the current active becomes ``previous`` and stays warm."""

    target: DeploymentName = _NAME
    expected_generation: int | None = _GENERATION
    reason: str = _REASON
    force: bool = Field(default=False, description="Switch even if the target is not ready.")


class RollbackRequest(Strict):
    """Make ``previous`` active again."""

    expected_generation: int | None = _GENERATION
    reason: str = _REASON
    force: bool = Field(default=False, description="Roll back even if previous is not ready.")


class GuardThresholds(Strict):
    """A service's own guard thresholds; each one given overrides the gateway's, null goes back to it."""

    enabled: bool | None = Field(default=None, description="Roll back automatically at all.")
    window_seconds: float | None = Field(default=None, gt=0, le=3600, description="Seconds of traffic judged.")
    error_rate: float | None = Field(default=None, gt=0, le=1, description="Model-failure rate that is a breach.")
    min_requests: int | None = Field(default=None, ge=1, le=10**9, description="Judged requests needed to judge.")
    p99_seconds: float | None = Field(default=None, gt=0, le=3600, description="p99 latency that is a breach.")
    bake_seconds: float | None = Field(default=None, gt=0, le=10**7, description="Seconds armed after a switch.")
    always: bool | None = Field(default=None, description="Armed at all times.")


class GuardRequest(Strict):
    """Pause or resume a service's guard (resuming also lifts a latch left by an automatic rollback),
    and/or set its own thresholds."""

    paused: bool | None = None
    reason: str = _REASON
    thresholds: GuardThresholds = Field(default_factory=GuardThresholds)

    @model_validator(mode="after")
    def _something(self) -> GuardRequest:
        if self.paused is None and not self.thresholds.model_fields_set:
            raise ValueError("give paused and/or thresholds")
        return self


class CreateService(Strict):
    """A new service: one stable endpoint (``/models/{name}/invocations``) for one model."""

    name: ServiceName = Field(json_schema_extra={"pattern": NAME_PATTERN.pattern},
                              description="Service name: 1-63 letters, digits, '.', '_' or '-'; not a reserved word.")
    guard: GuardThresholds = Field(default_factory=GuardThresholds)


class Alert(BaseModel):
    """One alert of an Alertmanager webhook notification (fields Turnout does not use are ignored)."""

    model_config = ConfigDict(extra="ignore")

    status: str
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    startsAt: str = ""  # noqa: N815 - Alertmanager's field name
    fingerprint: str = ""


class AlertmanagerPayload(BaseModel):
    """Alertmanager's webhook body, payload version 4."""

    model_config = ConfigDict(extra="ignore")

    version: str
    status: str = ""
    receiver: str = ""
    alerts: list[Alert] = Field(max_length=1000)


_ERROR = {
    "type": "object",
    "required": ["error_code", "message"],
    "properties": {"error_code": {"type": "string"}, "message": {"type": "string"}},
}


def _body(model: type[BaseModel]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}


def _responses(*codes: int) -> dict[str, Any]:
    text = {
        200: "Done.", 201: "Created.", 400: "Malformed JSON, unknown field or wrong type.", 401: "Missing or wrong bearer token.",
        403: "Browser request (Origin header) or non-loopback client without a configured token.",
        404: "Unknown service or deployment.", 409: "Refused: generation moved, target not ready, no previous, in use.",
        413: "Body too large.", 415: "Content-Type is not application/json.", 503: "The store (Redis) is unreachable.",
    }
    out: dict[str, Any] = {}
    for code in codes:
        schema = {"type": "object"} if code < 400 else {"$ref": "#/components/schemas/Error"}
        out[str(code)] = {"description": text[code], "content": {"application/json": {"schema": schema}}}
    return out


_READ = (200, 401, 403, 503)
_WRITE = (400, 401, 403, 404, 409, 413, 415, 503)


def _per_service(service_param: dict[str, Any] | None, suffix: str) -> dict[str, Any]:
    """The paths of one service's resources (the default service's without a parameter)."""
    def op(method: dict[str, Any]) -> dict[str, Any]:
        return {**method, "operationId": method["operationId"] + suffix}

    params = [service_param] if service_param else []
    name_param = {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "pattern": NAME_PATTERN.pattern}}
    not_found = (404,) if service_param else ()
    return {
        "/state": {"parameters": params, "get": op({"summary": "Route, deployments, guard", "operationId": "state",
                                                    "responses": _responses(*_READ, *not_found)})},
        "/deployments": {
            "parameters": params,
            "get": op({"summary": "Deployments", "operationId": "listDeployments", "responses": _responses(*_READ, *not_found)}),
            "post": op({"summary": "Create a deployment", "operationId": "createDeployment",
                        "requestBody": _body(CreateDeployment), "responses": _responses(201, *_WRITE)}),
        },
        "/deployments/{name}": {
            "parameters": [*params, name_param],
            "get": op({"summary": "One deployment", "operationId": "getDeployment", "responses": _responses(200, 400, 401, 403, 404, 503)}),
            "put": op({"summary": "Scale a deployment (replicas, min_ready; an external one's urls)", "operationId": "scaleDeployment",
                       "requestBody": _body(ScaleDeployment), "responses": _responses(200, 400, 401, 403, 404, 409, 413, 415, 503)}),
            "delete": op({
                "summary": "Delete a deployment (409 while active or previous, unless force=true)",
                "operationId": "deleteDeployment",
                "parameters": [{"name": "force", "in": "query", "required": False, "schema": {"type": "boolean"}},
                               {"name": "reason", "in": "query", "required": False, "schema": {"type": "string", "maxLength": 1000}}],
                "responses": _responses(200, 400, 401, 403, 404, 409, 503),
            }),
        },
        "/switch": {"parameters": params, "post": op({"summary": "Switch traffic", "operationId": "switch",
                                                       "requestBody": _body(SwitchRequest), "responses": _responses(200, *_WRITE)})},
        "/rollback": {"parameters": params, "post": op({"summary": "Roll back to previous", "operationId": "rollback",
                                                         "requestBody": _body(RollbackRequest), "responses": _responses(200, *_WRITE)})},
        "/canary": {
            "parameters": params,
            "get": op({"summary": "The canary plan (running, paused, or the last that ended) and its live gate",
                       "operationId": "canary", "responses": _responses(*_READ, *not_found)}),
            "post": op({"summary": "Start a canary rollout", "operationId": "startCanary",
                        "requestBody": _body(CanaryRequest), "responses": _responses(201, *_WRITE)}),
        },
        "/canary/{action}": {
            "parameters": [*params, {"name": "action", "in": "path", "required": True,
                                     "schema": {"type": "string", "enum": ["pause", "resume", "promote", "abort"]}}],
            "post": op({"summary": "Pause, resume, promote or abort the canary", "operationId": "changeCanary",
                        "requestBody": _body(CanaryAction), "responses": _responses(200, *_WRITE)}),
        },
        "/shadow": {
            "parameters": params,
            "get": op({"summary": "The shadow and the comparison of its answers with the active's (this gateway replica)",
                       "operationId": "shadow", "responses": _responses(*_READ, *not_found)}),
            "post": op({"summary": "Shadow a deployment", "operationId": "startShadow",
                        "requestBody": _body(ShadowRequest), "responses": _responses(200, *_WRITE)}),
            "delete": op({"summary": "Stop shadowing", "operationId": "stopShadow",
                          "responses": _responses(200, 400, 401, 403, 404, 409, 503)}),
        },
        "/guard": {
            "parameters": params,
            "get": op({"summary": "Guard status", "operationId": "guardStatus", "responses": _responses(*_READ, *not_found)}),
            "post": op({"summary": "Pause, resume or configure the guard", "operationId": "guardChange",
                        "requestBody": _body(GuardRequest), "responses": _responses(200, 400, 401, 403, 404, 413, 415, 503)}),
        },
        "/history": {"parameters": params, "get": op({
            "summary": "Every change and refused attempt, newest first", "operationId": "history",
            "parameters": [{"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                           {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}],
            "responses": _responses(200, 400, 401, 403, 503, *not_found),
        })},
    }


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.0 description of the admin API."""
    schemas: dict[str, Any] = {"Error": _ERROR}
    for model in (CreateDeployment, ScaleDeployment, CanaryRequest, CanaryAction, ShadowRequest, CreateService, SwitchRequest, RollbackRequest, GuardRequest, AlertmanagerPayload):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        # Nested models (pydantic's $defs) become components of their own.
        for name, definition in schema.pop("$defs", {}).items():
            schemas[name] = _openapi30(definition)
        schemas[model.__name__] = _openapi30(schema)
    service_param = {"name": "service", "in": "path", "required": True,
                     "schema": {"type": "string", "pattern": NAME_PATTERN.pattern}}
    paths: dict[str, Any] = {
        "/admin/services": {
            "get": {"summary": "Every service, its route, health and guard", "operationId": "listServices",
                    "responses": _responses(*_READ)},
            "post": {"summary": "Create a service", "operationId": "createService",
                     "requestBody": _body(CreateService), "responses": _responses(201, 400, 401, 403, 409, 413, 415, 503)},
        },
        "/admin/services/{service}": {
            "parameters": [service_param],
            "get": {"summary": "One service", "operationId": "getService", "responses": _responses(200, 400, 401, 403, 404, 503)},
            "delete": {
                "summary": "Delete a service (409 while it has deployments, unless force=true; never the default one)",
                "operationId": "deleteService",
                "parameters": [{"name": "force", "in": "query", "required": False, "schema": {"type": "boolean"}}],
                "responses": _responses(200, 400, 401, 403, 404, 409, 503),
            },
        },
        "/admin/alerts": {"post": {
            "summary": "Alertmanager webhook (payload version 4): firing alerts labelled turnout_action=rollback roll back",
            "operationId": "alerts", "requestBody": _body(AlertmanagerPayload),
            "responses": _responses(200, 400, 401, 403, 413, 415, 503),
        }},
        "/admin/openapi.json": {"get": {"summary": "This document", "operationId": "openapi", "responses": _responses(200, 401, 403)}},
    }
    for path, item in _per_service(None, "").items():
        paths["/admin" + path] = item
    for path, item in _per_service(service_param, "InService").items():
        paths["/admin/services/{service}" + path] = item
    return {
        "openapi": "3.0.3",
        "info": {"title": "Turnout admin API", "version": __version__},
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }


def _openapi30(schema: dict[str, Any]) -> dict[str, Any]:
    """pydantic emits JSON Schema 2020-12; OpenAPI 3.0 wants ``nullable`` instead of ``anyOf [.., null]``."""
    if isinstance(schema, dict):
        any_of = schema.get("anyOf")
        if isinstance(any_of, list) and len(any_of) == 2 and {"type": "null"} in any_of:
            inner = next(s for s in any_of if s != {"type": "null"})
            if "$ref" in inner:
                # A $ref takes no siblings in OpenAPI 3.0: wrap it to make it nullable.
                inner = {"allOf": [inner]}
            merged = {**{k: v for k, v in schema.items() if k != "anyOf"}, **inner, "nullable": True}
            return _openapi30(merged)
        for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if isinstance(schema.get(bound), int | float) and not isinstance(schema.get(bound), bool):
                # JSON Schema's numeric exclusive bound is OpenAPI 3.0's bound plus a boolean flag.
                schema = {**schema, plain: schema[bound], bound: True}
        return {k: _openapi30(v) for k, v in schema.items() if k not in ("title",) or not isinstance(v, str)}
    if isinstance(schema, list):
        return [_openapi30(v) for v in schema]  # type: ignore[return-value]
    return schema
