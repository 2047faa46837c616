"""A test-only in-memory double of the response store (``tgi_gateway.store``'s interface, agreed in
``tgi_gateway/store/types.py``): install it as ``app.state.store`` on an in-process app.

It keeps what it is given (a deep copy, as a database would), answers ``get``/``delete`` per owner as the
real store must (a response is visible only to the key that created it), and records every call.
"""

from __future__ import annotations

import copy
from typing import Any

from tgi_gateway.store.types import StoredResponse


class InMemoryResponseStore:
    def __init__(self) -> None:
        self.saved: dict[str, StoredResponse] = {}
        self.calls: list[tuple[str, Any]] = []
        self.closed = False
        self.fail_saves = False

    async def save(self, stored: StoredResponse) -> None:
        self.calls.append(("save", stored.id))
        if self.fail_saves:
            raise OSError("the disk is full")
        self.saved[stored.id] = copy.deepcopy(stored)

    async def get(self, response_id: str, owner: str | None) -> StoredResponse | None:
        self.calls.append(("get", response_id))
        stored = self.saved.get(response_id)
        if stored is None or stored.owner != owner:
            return None
        return copy.deepcopy(stored)

    async def delete(self, response_id: str, owner: str | None) -> bool:
        self.calls.append(("delete", response_id))
        stored = self.saved.get(response_id)
        if stored is None or stored.owner != owner:
            return False
        del self.saved[response_id]
        return True

    async def close(self) -> None:
        self.closed = True
