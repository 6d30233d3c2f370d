"""Auth and CORS (apps/sarcopenia/lib/security.py) over HTTP on the real MONAI Label server.

A small local OpenID Connect issuer (discovery document + JWKS over HTTP, an RSA key made
here) stands in for Keycloak; tokens are minted in the test with PyJWT, as the issuer would.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import nibabel as nib
import numpy as np
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from tests.harness import RunningServer, free_port
from sarco_app.synthesis.phantom import generate, write_phantom

ROLES = {"user": "monailabel-user", "annotator": "monailabel-annotator", "reviewer": "monailabel-reviewer",
         "admin": "monailabel-admin"}
VIEWER = "http://viewer.example:3000"


class Issuer:
    """An OIDC issuer on 127.0.0.1: ``/.well-known/openid-configuration`` and its JWKS."""

    def __init__(self):
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = "test-key-1"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/realms/sarco"
        jwk = json.loads(RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update(kid=self.kid, use="sig", alg="RS256")
        documents = {
            "/realms/sarco/.well-known/openid-configuration": {
                "issuer": self.url, "jwks_uri": f"{self.url}/protocol/openid-connect/certs",
                "token_endpoint": f"{self.url}/protocol/openid-connect/token"},
            "/realms/sarco/protocol/openid-connect/certs": {"keys": [jwk]},
        }

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = documents.get(self.path)
                self.send_response(200 if body else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(json.dumps(body or {}).encode())

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def token(self, *roles: str, key=None, issuer: str | None = None, expires_in: float = 600) -> str:
        now = int(time.time())
        payload = {"iss": issuer or self.url, "iat": now, "exp": now + int(expires_in),
                   "preferred_username": "-".join(roles) or "nobody",
                   "realm_access": {"roles": [ROLES[r] for r in roles]}}
        return jwt.encode(payload, key or self.key, algorithm="RS256", headers={"kid": self.kid})


class AnsweringServer(RunningServer):
    """A server that is up once ``/info/`` answers at all (401 without a token)."""

    def _is_up(self, info) -> bool:
        return True


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("security_studies")
    for k, case in enumerate(("case_a", "case_b")):
        write_phantom(generate(808001 + k, spacing_mm=2.0, size=160), root, case)
    return root


@pytest.fixture(scope="module")
def issuer():
    issuer = Issuer()
    yield issuer
    issuer.httpd.shutdown()


@pytest.fixture(scope="module")
def secured(studies, issuer, tmp_path_factory):
    """A server with auth on (the local issuer) and one allowed CORS origin."""
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": issuer.url}
    server = AnsweringServer(studies, tmp_path_factory.mktemp("secured") / "server.log",
                             conf={"cors_origins": VIEWER, "model_dir": str(tmp_path_factory.mktemp("model"))},
                             env=env)
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def default_server(start_server, studies):
    return start_server(studies)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def save_final(server, studies, image_id, token, folder):
    image = nib.load(str(studies / f"{image_id}.nii.gz"))
    label = np.zeros(image.shape, np.uint8)
    label[10:20, 10:20] = 1
    path = folder / f"{image_id}.nii.gz"
    nib.save(nib.Nifti1Image(label, image.affine), str(path))
    with open(path, "rb") as fh:
        return requests.put(f"{server}/datastore/label", params={"image": image_id, "tag": "final"},
                            files={"label": (path.name, fh)}, headers=bearer(token), timeout=60)


def test_requests_without_a_valid_token_are_401(secured, issuer):
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for headers in ({}, bearer("not-a-jwt"), bearer(issuer.token("admin", key=other_key)),
                    bearer(issuer.token("admin", expires_in=-60)),
                    bearer(issuer.token("admin", issuer="http://127.0.0.1:1/realms/elsewhere"))):
        for method, path in (("GET", "/info/"), ("GET", "/loop/rounds"), ("DELETE", "/datastore/?id=case_a"),
                             ("GET", "/logs/")):
            r = requests.request(method, f"{secured}{path}", headers=headers, timeout=30)
            assert r.status_code == 401, (headers, path, r.status_code, r.text)


def test_roles_on_save_train_and_delete(secured, issuer, studies, tmp_path):
    user, annotator = issuer.token("user"), issuer.token("annotator")
    reviewer, admin = issuer.token("reviewer"), issuer.token("admin")
    assert requests.get(f"{secured}/info/", headers=bearer(user), timeout=30).status_code == 200
    assert requests.get(f"{secured}/loop/rounds", headers=bearer(user), timeout=30).status_code == 200
    # Save: annotator and above.
    final = studies / "labels" / "final" / "case_a.nii.gz"  # the phantom's own label
    before = final.read_bytes()
    assert save_final(secured, studies, "case_a", user, tmp_path).status_code == 403
    assert final.read_bytes() == before
    assert save_final(secured, studies, "case_a", annotator, tmp_path).status_code == 200
    assert final.read_bytes() != before
    assert save_final(secured, studies, "case_b", reviewer, tmp_path).status_code == 200
    # Train, delete, logs and reload: admin only.
    for token in (user, annotator, reviewer):
        assert requests.post(f"{secured}/train/bodycomp_unet", json={"epochs": "ten"}, headers=bearer(token),
                             timeout=30).status_code == 403
        assert requests.delete(f"{secured}/datastore/label", params={"id": "case_a", "tag": "final"},
                               headers=bearer(token), timeout=30).status_code == 403
        assert requests.delete(f"{secured}/datastore/", params={"id": "case_b"}, headers=bearer(token),
                               timeout=30).status_code == 403
        assert requests.post(f"{secured}/reload", headers=bearer(token), timeout=30).status_code == 403
    assert (studies / "labels" / "final" / "case_a.nii.gz").exists() and (studies / "case_b.nii.gz").exists()
    r = requests.delete(f"{secured}/datastore/label", params={"id": "case_a", "tag": "final"},
                        headers=bearer(admin), timeout=30)
    assert r.status_code == 200 and not (studies / "labels" / "final" / "case_a.nii.gz").exists()
    # An admin may start training and stop it.
    r = requests.post(f"{secured}/train/bodycomp_unet", json={"epochs": 1}, headers=bearer(admin), timeout=30)
    assert r.status_code == 200, r.text
    assert requests.delete(f"{secured}/train/", headers=bearer(admin), timeout=60).status_code == 200


def test_cors_allows_only_the_configured_origin(secured, issuer):
    token = issuer.token("user")
    r = requests.get(f"{secured}/info/", headers={**bearer(token), "Origin": VIEWER}, timeout=30)
    assert r.headers.get("access-control-allow-origin") == VIEWER
    assert r.headers.get("access-control-allow-credentials") == "true"
    r = requests.get(f"{secured}/info/", headers={**bearer(token), "Origin": "https://evil.example"}, timeout=30)
    assert "access-control-allow-origin" not in r.headers


def test_cors_is_same_origin_only_by_default(default_server):
    evil = "https://evil.example"
    r = requests.get(f"{default_server}/info/", headers={"Origin": evil}, timeout=30)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    r = requests.options(f"{default_server}/datastore/label", timeout=30,
                         headers={"Origin": evil, "Access-Control-Request-Method": "PUT"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    # Auth is off by default: MONAI Label's default user may do everything.
    assert requests.get(f"{default_server}/loop/rounds", timeout=30).status_code == 200
