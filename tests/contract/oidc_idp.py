"""A minimal OpenID Connect provider on loopback: a TEST DOUBLE standing in for the VO's IdP (IAM, EGI Check-in).

It does not stand in for DiracX: the real DiracX 0.7 runs the device flow and redirects the user's browser here,
exactly as it would to IAM. This provider does what DiracX needs of an IdP and nothing more: a discovery document,
a JWKS, an authorization endpoint that "logs the user in" at once (the user is `login_hint` if given, else the
first configured user) and redirects back with a single-use code, and a token endpoint that checks the code, the
redirect_uri, the client_id and the PKCE verifier before issuing an RS256-signed id_token.

Runs INSIDE the DiracX side venv (needs pyjwt + cryptography, which our venv does not carry):
    python oidc_idp.py --port PORT --client-id ID --users '{"alice": "<sub>", ...}'
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import secrets
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Tuple

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm


class Provider:
    """Keys, users and pending codes of the double."""

    def __init__(self, issuer: str, client_id: str, users: Dict[str, str]) -> None:
        self.issuer = issuer
        self.client_id = client_id
        self.users = users
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = secrets.token_hex(8)
        self.codes: Dict[str, Dict[str, str]] = {}
        self.lock = threading.Lock()

    def discovery(self) -> Dict[str, Any]:
        return {
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token",
            "jwks_uri": f"{self.issuer}/jwks",
            "response_types_supported": ["code"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "code_challenge_methods_supported": ["S256"],
        }

    def jwks(self) -> Dict[str, Any]:
        jwk = RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        jwk.update(kid=self.kid, alg="RS256", use="sig")
        return {"keys": [jwk]}

    def authorize(self, query: Dict[str, str]) -> Tuple[int, Dict[str, str], Dict[str, Any]]:
        """Log the user in at once and send the browser back to redirect_uri with a code."""
        if query.get("client_id") != self.client_id or query.get("response_type") != "code":
            return 400, {}, {"error": "invalid_request"}
        if query.get("code_challenge_method", "plain") != "S256" or not query.get("code_challenge"):
            return 400, {}, {"error": "invalid_request", "error_description": "PKCE S256 required"}
        name = query.get("login_hint") or next(iter(self.users))
        if name not in self.users:
            return 400, {}, {"error": "access_denied", "error_description": f"no user {name}"}
        code = secrets.token_urlsafe(24)
        with self.lock:
            self.codes[code] = {
                "redirect_uri": query.get("redirect_uri", ""),
                "challenge": query["code_challenge"],
                "name": name,
            }
        params = {"code": code}
        if "state" in query:
            params["state"] = query["state"]
        sep = "&" if "?" in query.get("redirect_uri", "") else "?"
        return 302, {"Location": f"{query.get('redirect_uri', '')}{sep}{urllib.parse.urlencode(params)}"}, {}

    def token(self, form: Dict[str, str]) -> Tuple[int, Dict[str, Any]]:
        """The authorization_code grant, with every check a real IdP makes on it."""
        if form.get("grant_type") != "authorization_code" or form.get("client_id") != self.client_id:
            return 400, {"error": "unsupported_grant_type"}
        with self.lock:
            pending = self.codes.pop(form.get("code", ""), None)
        if pending is None:
            return 400, {"error": "invalid_grant", "error_description": "unknown or used code"}
        verifier = form.get("code_verifier", "")
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
        if challenge != pending["challenge"] or form.get("redirect_uri") != pending["redirect_uri"]:
            return 400, {"error": "invalid_grant", "error_description": "PKCE or redirect_uri mismatch"}
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": self.client_id,
            "sub": self.users[pending["name"]],
            "preferred_username": pending["name"],
            "iat": now,
            "exp": now + 300,
        }
        id_token = jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})
        return 200, {"access_token": secrets.token_urlsafe(16), "token_type": "Bearer", "id_token": id_token}


def make_handler(provider: Provider) -> type:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: Dict[str, Any], headers: Dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            url = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(url.query))
            if url.path == "/.well-known/openid-configuration":
                self._send(200, provider.discovery())
            elif url.path == "/jwks":
                self._send(200, provider.jwks())
            elif url.path == "/authorize":
                status, headers, body = provider.authorize(query)
                self._send(status, body, headers)
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
            if urllib.parse.urlsplit(self.path).path == "/token":
                self._send(*provider.token(form))
            else:
                self._send(404, {"error": "not found"})

        def log_message(self, fmt: str, *args: Any) -> None:
            print(f"idp: {fmt % args}", flush=True)

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--users", required=True, help="JSON {preferred_username: subject}")
    args = parser.parse_args()
    provider = Provider(f"http://127.0.0.1:{args.port}", args.client_id, json.loads(args.users))
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(provider))
    server.serve_forever()


if __name__ == "__main__":
    main()
