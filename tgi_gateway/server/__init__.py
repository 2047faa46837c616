"""The ASGI server: the app and its routes, the chat flow, the middlewares (access control, body limits,
telemetry), draining, and the server process's set-up."""
