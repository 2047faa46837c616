"""Test doubles of the services the gateway talks to (see :mod:`tests.fakes.tgi`)."""
