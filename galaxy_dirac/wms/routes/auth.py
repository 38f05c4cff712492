"""What diracx-client asks of a server besides the job API: OpenID discovery and the refresh grant."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from ..auth import refresh_tokens
from ..errors import Invalid, route_class
from .deps import BaseURL, Ctx, json_response

router = APIRouter(tags=["auth"], route_class=route_class())


@router.get("/.well-known/openid-configuration", include_in_schema=False)
def openid_configuration(base_url: BaseURL) -> Response:
    return json_response(
        {
            "issuer": base_url,
            "token_endpoint": f"{base_url}/api/auth/token",
            "grant_types_supported": ["refresh_token"],
            "response_types_supported": ["code"],
            "token_endpoint_auth_methods_supported": ["none"],
            "scopes_supported": [],
        }
    )


@router.post("/api/auth/token")
async def refresh_access_token(ctx: Ctx, request: Request) -> Response:
    """OAuth2 refresh grant, so diracx-client can renew the access token it was given."""
    form = await request.form()
    if form.get("grant_type") != "refresh_token" or not form.get("refresh_token"):
        raise Invalid("only grant_type=refresh_token with a refresh_token is supported")
    access, refresh, lifetime = refresh_tokens(ctx.key, str(form["refresh_token"]), ctx.settings.token_lifetime)
    return json_response(
        {"access_token": access, "expires_in": int(lifetime), "token_type": "Bearer", "refresh_token": refresh}
    )
