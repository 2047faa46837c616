"""The Responses API (``POST /v1/responses``) on the chat route's pipeline, no I/O: the request converted
to the chat request (:mod:`.request`), the parser's events mapped to output items and stream events
(:mod:`.output`), the stored conversation (:mod:`.stored`)."""
