"""Error bodies in the shape OpenAI clients expect, and the handlers that produce them.

Every failure leaves the server as ``{"error": {"message", "type", "param", "code"}}`` with a
status code a client can act on: 400 for bad input (``param`` names the field), 401 for a bad
key, 404 for an unknown model or route, 503 while the engine cannot serve, 500 otherwise.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from molink.errors import (
    ContextLengthExceededError,
    InvalidParameterError,
    ModelNotReadyError,
    MolinkError,
    OutOfCapacityError,
)

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error the HTTP layer reports as-is: status, message, offending field, code."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict:
    error_type = _TYPE_BY_STATUS.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(error: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(
        error_body(error.status, error.message, error.param, error.code),
        status_code=error.status,
        headers=headers,
    )


def to_api_error(exc: BaseException) -> APIError:
    """Map any exception to the status and body a client should see."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthExceededError):
        return APIError(400, str(exc), exc.field, "context_length_exceeded")
    if isinstance(exc, InvalidParameterError):
        return APIError(400, str(exc), exc.field)
    if isinstance(exc, OutOfCapacityError):
        return APIError(400, str(exc))
    if isinstance(exc, ModelNotReadyError):
        return APIError(503, f"the model is not ready: {exc}")
    if isinstance(exc, MolinkError):
        return APIError(500, f"the request failed: {exc}")
    return APIError(500, "internal server error")


def validation_error_to_api_error(exc: RequestValidationError) -> APIError:
    """Pydantic reports a location such as ("body", "messages", 0, "content"); name the field."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error") or first.get("msg", "")
        return APIError(400, f"the request body is not valid JSON: {detail}")
    if tuple(first.get("loc", ())) == ("body",):
        return _whole_body_error(first.get("input"))
    param = _field_path(first.get("loc", ()))
    message = first.get("msg", "invalid value")
    if param:
        message = f"{param}: {message}"
    return APIError(400, message, param or None)


def _whole_body_error(received: Any) -> APIError:
    """The body as a whole is wrong: pydantic's words ("Field required") name nothing."""
    if isinstance(received, bytes | str):
        # FastAPI reads JSON only under a JSON content type (curl -d sends a form one).
        return APIError(
            400, "the request body must be a JSON object sent with Content-Type: application/json"
        )
    return APIError(400, "the request body must be a JSON object")


def _field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    parts: list[str] = []
    for item in loc:
        if item == "body" and not parts:
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif _is_type_tag(item):
            # Unions add the branch type to the location ("temperature", "float"); drop it.
            break
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def _is_type_tag(item: Any) -> bool:
    return isinstance(item, str) and (
        item in {"float", "int", "str", "bool", "list", "dict", "none"}
        or item.startswith(("list[", "dict[", "function-", "constrained-"))
    )


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(to_api_error(exc))

    async def on_validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(validation_error_to_api_error(exc))

    async def on_http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return error_response(APIError(exc.status_code, message))

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error while serving a request", exc_info=exc)
        return error_response(to_api_error(exc))

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(MolinkError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
