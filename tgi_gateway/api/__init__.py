"""The OpenAI contract at the gateway's edge, without I/O: the request and error models, OpenAI sampling
fields → TGI parameters, pydantic's errors → OpenAI 400s, the OpenAPI document."""
