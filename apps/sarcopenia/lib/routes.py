"""Finding MONAI Label's stock routes and putting ours in front of them.

The app changes a few stock endpoints (checks, worker threads, role guards) without copying
MONAI Label's code: a new route with the same path and method goes first in the app's route
list, so it is the one that matches. Works whether FastAPI keeps included routers as nested
entries (FastAPI >= 0.13x) or copies their routes into the app.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

from fastapi import APIRouter
from fastapi.routing import APIRoute


def api_routes(app) -> Iterator[tuple[str, APIRoute]]:
    """(full path, route) of every API route of ``app``, included routers too, in match order."""

    def walk(routes, prefix: str):
        for route in routes:
            context = getattr(route, "include_context", None)
            if context is not None and hasattr(route, "original_router"):
                yield from walk(route.original_router.routes, prefix + context.prefix)
            elif isinstance(route, APIRoute):
                yield prefix + route.path, route

    yield from walk(list(app.router.routes), "")


def find_route(app, path: str, method: str) -> APIRoute | None:
    """The route that answers ``method path`` today (the first match), or None."""
    for full_path, route in api_routes(app):
        if full_path == path and method in route.methods:
            return route
    return None


def put_in_front(app, path: str, route: APIRoute, endpoint: Callable | None = None,
                 extra_dependencies: Sequence = ()) -> APIRoute:
    """Add a copy of ``route`` at ``path`` with ``endpoint`` (same signature; default the
    route's own) and ``extra_dependencies``, matched before every other route."""
    app.router.add_api_route(
        path, endpoint or route.endpoint, methods=list(route.methods), name=route.name, summary=route.summary,
        description=route.description, tags=route.tags, dependencies=[*route.dependencies, *extra_dependencies],
        responses=route.responses, status_code=route.status_code, response_class=route.response_class,
        include_in_schema=route.include_in_schema,
    )
    routes = app.router.routes
    new = routes.pop()
    routes.insert(0, new)
    return new


def include_in_front(app, router: APIRouter, prefix: str = "") -> int:
    """Include ``router`` in ``app`` with its routes matched before every other route (the
    routers' form of :func:`put_in_front`). Returns how many route entries were added."""
    routes = app.router.routes
    count = len(routes)
    app.include_router(router, prefix=prefix)
    added = routes[count:]
    del routes[count:]
    routes[0:0] = added
    return len(added)
