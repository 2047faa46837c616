"""The durable response store of ``/v1/responses``: what is kept of a response, and where.

A stored response (:class:`StoredResponse`) is the Response object exactly as the client got it, the
request's input items (what ``GET /v1/responses/{id}/input_items`` lists), and the whole conversation as
input items (what ``previous_response_id`` replays). A :class:`ResponseStore` saves, gets and deletes
them per owner, the API key id that created them: another key's response, like an expired or unknown
one, is simply not there (None, False).

:func:`open_store` opens the one implementation, :class:`~tgi_gateway.store.sql.SQLStore` (SQLAlchemy's
async Core over SQLite or PostgreSQL, schema created and versioned at start); :mod:`.pages` cuts the
input items into OpenAI's cursor pages (no I/O); :mod:`.types` holds the two types.

This package imports only :mod:`tgi_gateway.errors` and :mod:`tgi_gateway.settings`; ``server`` and
``cli`` use it.
"""

from __future__ import annotations

from .sql import SQLStore
from .types import ResponseStore, StoredResponse

__all__ = ["ResponseStore", "StoredResponse", "open_store"]


async def open_store(
    url: str, *, ttl_seconds: float | None, sweep_interval: float = 60.0, sweep_batch: int = 500
) -> ResponseStore:
    """The store at `url` (``sqlite:///PATH``, ``postgresql://…``; see :func:`tgi_gateway.settings.
    check_store_url`), its schema created or migrated, its expiry sweep started (every `sweep_interval`
    seconds, at most `sweep_batch` rows a statement). `ttl_seconds` None: responses are kept until deleted.

    Raises :class:`~tgi_gateway.errors.ConfigurationError` when the URL is not a store's, the database
    cannot be reached or created, or its schema is newer than this gateway knows.
    """
    return await SQLStore.open(
        url, ttl_seconds=ttl_seconds, sweep_interval=sweep_interval, sweep_batch=sweep_batch
    )
