"""A FastAPI route class for the generation endpoints: a JSON body straight into its pydantic model.

FastAPI's request handler is general: per request it parses the Content-Type with ``email.message``, decodes the
body with ``json.loads``, validates the resulting dict, solves the dependency graph and builds error context for
its messages. Measured with ``benchmarks/http_edge.py``: FastAPI's whole app took 56 us of CPU per chat-completion
request with that handler and 34 us with this one, ~4 % of a self-moa request's server CPU at 200 clients.
:class:`JSONBodyRoute` takes the common case itself: a non-empty ``application/json`` body
goes to ``Model.model_validate_json`` (pydantic-core parses and validates in one pass), and the endpoint is called
with the model and the request. Everything else (another content type, an empty body, an endpoint with other
parameters) goes to FastAPI's own handler, so behaviour and the OpenAPI schema stay FastAPI's; validation errors
are raised as the same :class:`RequestValidationError` (locations under ``body``) that FastAPI raises.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import routing as fastapi_routing
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response


def is_json_content_type(value: str) -> bool:
    """``application/json`` or ``application/<x>+json``, parameters (``; charset=utf-8``) ignored: the types
    FastAPI decodes as JSON."""
    main = value.split(";", 1)[0].strip().lower()
    return main == "application/json" or (main.startswith("application/") and main.endswith("+json"))


class JSONBodyRoute(APIRoute):
    """An :class:`APIRoute` whose endpoint takes one pydantic body and (optionally) the request, and returns a
    :class:`Response` (see the module docstring)."""

    def _effective(self) -> Any:
        """The route FastAPI builds this handler for. A route included into another router is built with the
        including router's dependencies and settings, which FastAPI (0.16x) keeps in a context variable while it
        calls ``get_route_handler``; the lean path must see those dependencies to step aside for them."""
        var = getattr(fastapi_routing, "_effective_route_context_var", None)
        ctx = var.get() if var is not None else None
        return ctx if ctx is not None and getattr(ctx, "original_route", None) is self else self

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        general = super().get_route_handler()
        route = self._effective()
        dep = route.dependant
        body_field = route.body_field
        model = body_field.field_info.annotation if body_field is not None else None
        lean = (
            body_field is not None and isinstance(model, type) and issubclass(model, BaseModel)
            and len(dep.body_params) == 1 and not (dep.path_params or dep.query_params or dep.header_params
                                                   or dep.cookie_params or dep.dependencies)
            and not any(getattr(dep, f"{kind}_param_name", None)
                        for kind in ("response", "background_tasks", "websocket", "http_connection", "security_scopes"))
            and not getattr(route, "_embed_body_fields", False)  # Body(embed=True): the model sits under a key
            and dep.call is not None
        )
        if not lean:
            return general
        assert body_field is not None and dep.call is not None and isinstance(model, type)
        call, name, request_name, validate = dep.call, body_field.name, dep.request_param_name, model.model_validate_json

        async def handler(request: Request) -> Response:
            content_type = request.headers.get("content-type")
            if not content_type or not is_json_content_type(content_type):
                return await general(request)
            raw = await request.body()
            if not raw:
                return await general(request)
            try:
                value = validate(raw)
            except ValidationError as e:
                raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()], body=raw) from None
            kwargs: dict[str, Any] = {name: value}
            if request_name:
                kwargs[request_name] = request
            response = await call(**kwargs)
            if not isinstance(response, Response):  # the endpoints this class serves build their own responses
                raise TypeError(f"{self.path}: a JSONBodyRoute endpoint must return a Response, not {type(response).__name__}")
            return response

        return handler
