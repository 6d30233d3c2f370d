"""CORS and authentication for MONAI Label's FastAPI app.

Stock MONAI Label behaviours changed here (:func:`install`, at server start):

* **CORS.** Stock: with ``MONAI_LABEL_CORS_ORIGINS`` unset, every ``Origin`` is echoed back with
  ``Access-Control-Allow-Credentials: true``, so any web page a user opens can drive the server
  with the user's credentials. Here: no cross-origin access unless configured (the bundled OHIF
  viewer and Slicer are not cross-origin); ``--conf cors_origins "https://a,https://b"`` (or
  ``SARCO_CORS_ORIGINS``, or MONAI Label's own ``MONAI_LABEL_CORS_ORIGINS``) names the origins
  allowed, with credentials; ``*`` allows any origin but never with credentials.
* **Token checks.** With ``MONAI_LABEL_AUTH_ENABLE=true`` the stock check cannot accept any
  token (PyJWT 2 refuses ``jwt.decode`` without ``algorithms``) and fetches a Keycloak-only
  ``public_key``. Here tokens are verified against the issuer's OpenID Connect discovery
  document (``MONAI_LABEL_AUTH_REALM_URI/.well-known/openid-configuration``) and its JWKS:
  RS256/ES256 signature, expiry and issuer. MONAI Label's other settings apply unchanged
  (``MONAI_LABEL_AUTH_TOKEN_ROLES`` etc.).
* **Roles.** The roles nest: admin includes reviewer, reviewer includes annotator, annotator
  includes user (stock: a token must list each role itself). So saving or uploading needs
  annotator or above; training, deleting, logs, batch runs and ``/reload`` need admin; reading
  (info, infer, datastore, ``/loop/``) needs user.
* **Guards** where the stock app has none: ``POST /reload`` (admin) and our ``/loop/`` routes
  (user).
"""

from __future__ import annotations

import logging
from typing import Callable

from fastapi import Depends
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

logger = logging.getLogger(__name__)


def allowed_origins(get: Callable[[str, str], str]) -> list[str]:
    """The origins CORS allows: ``cors_origins`` (comma-separated), else MONAI Label's
    ``MONAI_LABEL_CORS_ORIGINS``, else none (same-origin only)."""
    from monailabel.config import settings

    configured = get("cors_origins", "")
    if configured.strip():
        return [o.strip().rstrip("/") for o in configured.split(",") if o.strip()]
    return [str(o).rstrip("/") for o in settings.MONAI_LABEL_CORS_ORIGINS]


def _cors_middleware(origins: list[str]) -> Middleware:
    return Middleware(CORSMiddleware, allow_origins=origins, allow_credentials=bool(origins) and "*" not in origins,
                      allow_methods=["*"], allow_headers=["*"])


def role_hierarchy() -> dict[str, list[str]]:
    """Each role and the roles it includes (MONAI Label's configured role names)."""
    from monailabel.config import settings as s

    admin, reviewer = s.MONAI_LABEL_AUTH_ROLE_ADMIN, s.MONAI_LABEL_AUTH_ROLE_REVIEWER
    annotator, user = s.MONAI_LABEL_AUTH_ROLE_ANNOTATOR, s.MONAI_LABEL_AUTH_ROLE_USER
    return {admin: [reviewer, annotator, user], reviewer: [annotator, user], annotator: [user]}


def with_included_roles(roles: list[str]) -> list[str]:
    """``roles`` plus every role they include (:func:`role_hierarchy`)."""
    hierarchy = role_hierarchy()
    out = list(roles)
    for role in roles:
        out += [r for r in hierarchy.get(role, []) if r not in out]
    return out


class OIDCVerifier:
    """Verifies bearer tokens with the issuer's discovery document and JWKS (keys cached;
    an unknown key id refetches the JWKS once, so the issuer may rotate keys)."""

    def __init__(self, issuer_uri: str, timeout: float):
        self.issuer_uri = issuer_uri.rstrip("/")
        self.timeout = timeout
        self._discovery: dict | None = None
        self._jwks = None

    def discovery(self) -> dict:
        if self._discovery is None:
            import requests

            r = requests.get(f"{self.issuer_uri}/.well-known/openid-configuration", timeout=self.timeout)
            r.raise_for_status()
            self._discovery = r.json()
        return self._discovery

    def decode(self, token: str) -> dict:
        import jwt

        if self._jwks is None:
            self._jwks = jwt.PyJWKClient(self.discovery()["jwks_uri"], cache_keys=True, timeout=self.timeout)
        key = self._jwks.get_signing_key_from_jwt(token)
        return jwt.decode(token, key.key, algorithms=["RS256", "RS384", "RS512", "ES256", "ES384"],
                          issuer=self.discovery().get("issuer", self.issuer_uri),
                          options={"verify_aud": False, "require": ["exp", "iss"]})


def _from_token_factory(verifier: OIDCVerifier, stock_from_token: Callable):
    """A replacement for ``monailabel.endpoints.user.auth.from_token``."""
    from jwt import InvalidTokenError, PyJWKClientError
    from monailabel.config import settings
    from monailabel.endpoints.user.auth import User

    def from_token(token: str):
        if not settings.MONAI_LABEL_AUTH_ENABLE:
            return stock_from_token(token)
        try:
            payload = verifier.decode(token)
        except PyJWKClientError as exc:  # no key for the token's kid: a token we cannot trust
            raise InvalidTokenError(str(exc)) from None
        roles = payload
        for part in settings.MONAI_LABEL_AUTH_TOKEN_ROLES.split("#"):
            roles = roles.get(part) if isinstance(roles, dict) else None
        roles = [str(r) for r in roles] if isinstance(roles, list) else []
        return User(username=str(payload.get(settings.MONAI_LABEL_AUTH_TOKEN_USERNAME) or ""),
                    email=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_EMAIL),
                    name=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_NAME), roles=with_included_roles(roles))

    return from_token


def _guard(app, path_prefix: str, role: str) -> int:
    """Put MONAI Label's role check for ``role`` in front of every route under ``path_prefix``."""
    from monailabel.endpoints.user.auth import RBAC

    from lib.routes import api_routes, put_in_front

    count, seen = 0, set()
    for path, route in list(api_routes(app)):
        key = (path, tuple(sorted(route.methods)))
        if path.startswith(path_prefix) and key not in seen:
            seen.add(key)
            put_in_front(app, path, route, extra_dependencies=[Depends(RBAC(role))])
            count += 1
    return count


def install(app, get: Callable[[str, str], str]) -> list[str]:
    """Restrict CORS, verify tokens through OIDC discovery + JWKS, nest the roles and guard
    the routes the stock app leaves open. Returns the allowed CORS origins."""
    from monailabel.config import settings
    from monailabel.endpoints.user import auth

    origins = allowed_origins(get)
    app.user_middleware = [m for m in app.user_middleware if m.cls is not CORSMiddleware]
    app.user_middleware.insert(0, _cors_middleware(origins))
    if not getattr(auth.from_token, "sarco", False):
        verifier = OIDCVerifier(settings.MONAI_LABEL_AUTH_REALM_URI, settings.MONAI_LABEL_AUTH_TIMEOUT)
        auth.from_token = _from_token_factory(verifier, auth.from_token)
        auth.from_token.sarco = True
    _guard(app, "/reload", settings.MONAI_LABEL_AUTH_ROLE_ADMIN)
    _guard(app, "/loop/", settings.MONAI_LABEL_AUTH_ROLE_USER)
    logger.info(f"CORS origins: {origins or 'same origin only'}; auth "
                f"{'on, issuer ' + settings.MONAI_LABEL_AUTH_REALM_URI if settings.MONAI_LABEL_AUTH_ENABLE else 'off'}")
    return origins
