"""The HTTP API (FastAPI), built per replica around the models it serves (`deploy.models.ModelSet`).

Versioned routes under ``/v1``; OpenAPI at ``/docs`` (``/openapi.json``). Every client error is a
JSON `ErrorResponse` (``{"error": code, "message": ..., "details": [...]}``) with status 400
(malformed: bad base64, corrupt image, bad JSON/multipart), 413 (request too large, too many
images, too many pixels), 415 (not an image / unsupported Content-Type), 422 (schema), 401/403
(admin auth), 404 or 503 (no model yet).

Single-label and multi-label models answer in one schema: every prediction lists ``labels``, the
[{label, score}] it answers (a multi-label model's labels that passed their thresholds, best
first; a single-label model's one label; ``[]`` on abstain), beside the single-label fields
``label`` (a multi-label answer's key ``"a|b"``), ``score``, ``decision`` and ``top_k``.
"""

from __future__ import annotations

import hmac
import json
import logging
import time

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from deploy import schemas
from deploy.errors import ApiError
from deploy.metrics import CONTENT_TYPE_LATEST
from deploy.multipart import MultipartError, parse_multipart
from deploy.models import ModelSet
from deploy.service import ImageInput, NotReady, ServingService, decode_base64
from pipeline.multilabel.predictor import answered_labels

log = logging.getLogger("tlpipe.serve")

API_VERSION = "1"
_ERRORS = {code: {"model": schemas.ErrorResponse} for code in (400, 413, 415, 422, 503)}
_ADMIN_ERRORS = {**_ERRORS, 401: {"model": schemas.ErrorResponse}, 403: {"model": schemas.ErrorResponse},
                 404: {"model": schemas.ErrorResponse}}
_FILE_FIELDS = ("file", "files", "image", "images")


def _images_body(description: str) -> dict:
    json_schema = schemas.ImagesJSON.model_json_schema()
    return {"requestBody": {"required": True, "description": description, "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                     "description": "one or more image files (field name file, files, image or images)"}}}},
        "application/json": {"schema": json_schema},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
    }}}


class MetricsMiddleware:
    """Counts requests by route template / method / status and times them (pure ASGI)."""

    def __init__(self, app, metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(route=route, method=scope.get("method", ""), status=str(status)).inc()
            self.metrics.latency.labels(route=route).observe(time.perf_counter() - start)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 as soon as it exceeds `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "request_too_large",
                       f"request body is {int(declared):,} bytes; the limit is {limit:,} (send fewer or smaller images)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "request_too_large",
                           f"request body exceeds the limit of {limit:,} bytes (send fewer or smaller images)")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_images(request: Request, *, max_bytes: int, max_images: int) -> tuple[list[ImageInput], int | None]:
    """Images from a multipart, JSON (base64) or raw image body, and the JSON `top_k` if any."""
    ctype = request.headers.get("content-type", "")
    kind = ctype.split(";", 1)[0].strip().lower()
    if kind not in ("multipart/form-data", "application/json", "application/octet-stream") and not kind.startswith("image/"):
        raise ApiError(415, "unsupported_media_type",
                       f"Content-Type {kind or '(none)'!r} is not accepted: send multipart/form-data image files, "
                       'application/json {"images": [base64, ...]}, or one raw image/* body')
    body = await read_body(request, max_bytes)
    top_k = None
    if kind == "multipart/form-data":
        try:
            parts = parse_multipart(body, ctype)
        except MultipartError as exc:
            raise ApiError(400, "bad_multipart", f"malformed multipart/form-data body: {exc}") from None
        items = [ImageInput(p.data, p.filename) for p in parts
                 if p.filename is not None or (p.name or "").lower() in _FILE_FIELDS]
        for p in parts:
            if p.name == "top_k" and p.filename is None:
                top_k = _int_field("top_k", p.data.decode("utf-8", "replace"))
        if not items:
            raise ApiError(422, "no_images", "the multipart body has no file parts: send the images as file fields "
                           "(e.g. -F file=@photo.jpg)")
        if len(items) > max_images:
            raise _too_many(len(items), max_images)
        return items, top_k
    if kind == "application/json":
        try:
            raw = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, "bad_json", f"the body is not valid JSON: {exc}") from None
        except RecursionError:  # e.g. "[[[[..." nested deeper than the parser's recursion limit
            raise ApiError(400, "bad_json", 'the JSON body is nested too deeply: send {"images": [base64, ...]}'
                           ) from None
        if isinstance(raw, dict) and isinstance(raw.get("images"), list) and len(raw["images"]) > max_images:
            raise _too_many(len(raw["images"]), max_images)
        try:
            parsed = schemas.ImagesJSON.model_validate(raw)
        except ValidationError as exc:
            raise _validation_error(exc) from None
        return [ImageInput(decode_base64(s, i)) for i, s in enumerate(parsed.images)], parsed.top_k
    if not body:
        raise ApiError(400, "empty_image", "the request body is empty: send an image")
    return [ImageInput(body)], None


def _int_field(name: str, value: str) -> int:
    try:
        out = int(value)
        if out < 1:
            raise ValueError
        return out
    except ValueError:
        raise ApiError(422, "invalid_request", f"{name} must be a positive integer, got {value!r}") from None


def _too_many(n: int, limit: int) -> ApiError:
    return ApiError(413, "too_many_images", f"{n} images in one request; the limit is {limit} (split the request)",
                    [{"images": n, "limit": limit}])


def _validation_error(exc: ValidationError | RequestValidationError) -> ApiError:
    details = [{"loc": [str(x) for x in e.get("loc", ())], "msg": e.get("msg", ""), "type": e.get("type", "")}
               for e in exc.errors()]
    summary = "; ".join(f"{'.'.join(d['loc']) or 'body'}: {d['msg']}" for d in details[:5])
    return ApiError(422, "invalid_request", f"the request does not match the schema: {summary}", details)


def create_api(models: ModelSet | ServingService) -> FastAPI:
    """The app over one model (a `ServingService`) or several (a `ModelSet`).

    Every model route exists twice: ``/v1/models/{model}/...`` for any served model, and the
    unprefixed ``/v1/...`` of a one-model app (404 naming the models when there are several).
    """
    if isinstance(models, ServingService):
        models = ModelSet([models])
    settings = models.settings
    api = FastAPI(
        title="tlpipe serving", version=API_VERSION, docs_url="/docs", openapi_url="/openapi.json",
        description="Image classification with calibrated abstention and a k-NN fallback over support "
                    "examples that can be added at run time. Admin routes need `Authorization: Bearer <token>`.")
    api.add_middleware(MetricsMiddleware, metrics=models.metrics)
    bearer = HTTPBearer(auto_error=False, description="the server's admin token (TLPIPE_SERVE_ADMIN_TOKEN)")

    # ---------------------------------------------------------------- errors
    def _error_response(err: ApiError) -> JSONResponse:
        models.metrics.errors.labels(code=err.code).inc()
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @api.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return _error_response(exc)

    @api.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError):
        return _error_response(_validation_error(exc))

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(ApiError(exc.status_code, code, str(exc.detail), headers=exc.headers))

    @api.exception_handler(NotReady)
    async def _not_ready(_: Request, exc: NotReady):
        return _error_response(ApiError(503, "not_ready", f"{exc}; retry shortly", headers={"Retry-After": "5"}))

    @api.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # a bug: logged, still a JSON answer
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error_response(ApiError(500, "internal_error", f"internal error ({type(exc).__name__}); "
                                        "the server log has the traceback"))

    # ---------------------------------------------------------------- auth
    async def require_admin(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        token = settings.admin_token
        if token is None:
            raise ApiError(403, "admin_disabled", "admin routes are disabled on this server: set "
                           "TLPIPE_SERVE_ADMIN_TOKEN (or the admin_token setting) and restart")
        if cred is None or not cred.credentials:
            raise ApiError(401, "unauthorized", "this route needs an 'Authorization: Bearer <token>' header",
                           headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(cred.credentials.encode(), token.get_secret_value().encode()):
            raise ApiError(403, "forbidden", "the bearer token is not valid for this server")

    admin = [Depends(require_admin)]

    # ---------------------------------------------------------------- health
    @api.get("/healthz", response_model=schemas.Health, tags=["health"])
    async def healthz():
        return {"status": "ok"}

    @api.get("/readyz", response_model=schemas.Health, tags=["health"],
             responses={503: {"model": schemas.Health}})
    async def readyz():
        if not models.ready:
            waiting = [n for n, s in models.services.items() if not s.ready]
            return JSONResponse({"status": "loading", "detail": f"not loaded yet: {', '.join(waiting)}"
                                 if not models.single else "no model loaded yet"}, status_code=503)
        errors = [f"{n}: {s.last_poll_error}" if not models.single else s.last_poll_error
                  for n, s in models.services.items() if s.last_poll_error]
        return {"status": "ready", "model": ", ".join(s.state.label for s in models.services.values()),
                "detail": "; ".join(errors) or None}

    @api.get("/metrics", tags=["health"], response_class=Response)
    async def metrics():
        return Response(models.render_metrics(), media_type=CONTENT_TYPE_LATEST)

    @api.get("/v1/models", response_model=schemas.ModelsResponse, tags=["model"], responses=_ERRORS)
    async def list_models():
        return models.describe()

    # ---------------------------------------------------------------- per model
    def one_model() -> ServingService:
        return models.only()

    def named_model(model: str = Path(..., description="the model's name (GET /v1/models)")) -> ServingService:
        return models.get(model)

    _model_routes(api, "/v1", "/v1/model", Depends(one_model), settings, admin)
    _model_routes(api, "/v1/models/{model}", "/v1/models/{model}", Depends(named_model), settings, admin)
    return api


def _model_routes(api: FastAPI, prefix: str, info_path: str, pick, settings, admin: list) -> None:
    """The routes of one model under `prefix`; `pick` is the dependency that names the service."""
    model_errors = {**_ERRORS, 404: {"model": schemas.ErrorResponse}}

    @api.get(prefix + "/monitor", response_model=schemas.MonitorResponse, tags=["model"], responses=model_errors)
    async def monitor(service: ServingService = pick):
        return service.monitor_snapshot()

    # ---------------------------------------------------------------- model
    @api.get(info_path, response_model=schemas.ModelInfo, tags=["model"], responses=model_errors)
    async def model_info(service: ServingService = pick):
        return service.model_info()

    @api.get(prefix + "/classes", response_model=schemas.ClassesResponse, tags=["model"], responses=model_errors)
    async def classes(service: ServingService = pick):
        state, rows = service.classes()
        return {"model": state.label, "classes": rows}

    @api.post(prefix + "/predict", response_model=schemas.PredictResponse, tags=["predict"], responses=model_errors,
              openapi_extra=_images_body("images as multipart files, base64 JSON, or one raw image body"))
    async def predict(request: Request,
                      top_k: int | None = Query(None, ge=1, le=1000, description="classifier scores per image"),
                      service: ServingService = pick):
        t0 = time.perf_counter()
        items, body_top_k = await read_images(request, max_bytes=settings.max_request_bytes,
                                              max_images=settings.max_images_per_request)
        state, preds = await service.predict(items, top_k=top_k or body_top_k)
        ms = round((time.perf_counter() - t0) * 1000.0, 3)
        out = [{"index": i, "filename": items[i].filename, "label": p.label, "score": p.score,
                "labels": answered_labels(p), "decision": p.decision, "top_k": p.top_k, "model": state.label,
                "latency_ms": ms} for i, p in enumerate(preds)]
        return {"model": state.label, "task": state.task, "predictions": out, "latency_ms": ms}

    # ---------------------------------------------------------------- admin
    @api.post(prefix + "/classes/{name}/examples", response_model=schemas.AddExamplesResponse, tags=["admin"],
              dependencies=admin, responses=_ADMIN_ERRORS, response_model_by_alias=True,
              openapi_extra=_images_body("support images of the class (multipart files or base64 JSON)"))
    async def add_examples(request: Request, name: str = Path(..., description="class name (new or existing)"),
                           service: ServingService = pick):
        items, _ = await read_images(request, max_bytes=settings.max_request_bytes,
                                     max_images=settings.max_examples_per_request)
        state, results = await service.add_examples(name, items)
        in_head = name in state.base.classes
        return schemas.AddExamplesResponse(
            model=state.label, class_name=name, needs_retraining=not in_head,
            added=[schemas.AddedExample(id=ex.id, sha256=ex.sha256, path=ex.path, duplicate=dup)
                   for ex, dup in results])

    @api.delete(prefix + "/classes/{name}/examples/{example_id}", response_model=schemas.DeleteResponse,
                tags=["admin"], dependencies=admin, responses=_ADMIN_ERRORS, response_model_by_alias=True)
    async def delete_example(name: str, example_id: int = Path(..., ge=1), service: ServingService = pick):
        state, removed = await service.remove_examples(name, example_id)
        return schemas.DeleteResponse(model=state.label, class_name=name, removed=removed)

    @api.delete(prefix + "/classes/{name}", response_model=schemas.DeleteResponse, tags=["admin"],
                dependencies=admin, responses=_ADMIN_ERRORS, response_model_by_alias=True)
    async def delete_class(name: str, service: ServingService = pick):
        state, removed = await service.remove_examples(name, None)
        return schemas.DeleteResponse(model=state.label, class_name=name, removed=removed)

    @api.post(prefix + "/reload", response_model=schemas.ReloadResponse, tags=["admin"], dependencies=admin,
              responses=_ADMIN_ERRORS)
    async def reload(force: bool = Query(False, description="reload even if the version did not move"),
                     service: ServingService = pick):
        try:
            changed, previous = await service.refresh(force=force)
        except Exception as exc:  # noqa: BLE001 - the old model keeps serving; tell the caller why
            raise ApiError(503, "reload_failed", f"reload failed, still serving "
                           f"{service.state.label if service.ready else 'nothing'}: {type(exc).__name__}: {exc}")
        return {"changed": changed, "model": service.state.label, "previous": previous}
