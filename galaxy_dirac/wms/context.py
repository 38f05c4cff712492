"""What every request shares (settings, engine, signing key, sandbox store), made once per API worker.

Routes get it through the ``context`` dependency (``routes/deps.py``), so a test can override it with its own.
"""

from __future__ import annotations

import time

from .auth import Principal, verify_token_with_expiry
from .config import Settings
from .db import create_schema, make_engine
from .sandboxes import SandboxStore

#: Verified tokens remembered at most; the cache is dropped whole when full (a token costs one signature check).
_MAX_VERIFIED = 10_000


class Context:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = make_engine(settings.db)
        create_schema(self.engine)
        self.key = settings.signing_key(create=True)
        self.store = SandboxStore(settings.sandbox_dir, max_size=settings.max_sandbox_size)
        self._verified: dict[str, tuple[Principal, float]] = {}

    def verify(self, token: str) -> Principal:
        """Verify a bearer token, remembering good ones: pilots and runners send the same token many times a second,
        and a JWT signature check costs more than a match. Expiry is still checked on every use."""
        hit = self._verified.get(token)
        if hit is not None and hit[1] > time.time():
            return hit[0]
        principal, expires = verify_token_with_expiry(self.key, token)
        if len(self._verified) >= _MAX_VERIFIED:
            self._verified.clear()
        self._verified[token] = (principal, expires)
        return principal

    def delete_sandbox(self, pfn: str) -> None:
        """The maintenance loop's hook for a sandbox record it removed."""
        from .sandbox_metadata import delete_unused

        delete_unused(self.engine, self.store, pfn)

    def close(self) -> None:
        self.engine.dispose()
