"""The TGI double's ``grammar``: validated as TGI's router does, and the scripted output held to it."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.fakes.tgi import FakeTGI, special, tokens

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
V = "Input validation error: "


def post(tgi: FakeTGI, grammar: object, path: str = "/generate") -> httpx.Response:
    with httpx.Client(base_url=tgi.url, timeout=5) as c:
        return c.post(path, json={"inputs": "x", "parameters": {"details": True, "grammar": grammar}})


@pytest.mark.parametrize(
    "grammar",
    [
        {"type": "json", "value": SCHEMA},
        {"type": "json_object", "value": SCHEMA},
        {"type": "json", "value": json.dumps(SCHEMA)},
        {"type": "json_schema", "value": {"name": "x", "schema": SCHEMA}},
        {"type": "regex", "value": r'\{"n":[0-9]+\}'},
    ],
)
def test_an_output_the_grammar_allows_is_answered(grammar: object) -> None:
    with FakeTGI(script=tokens('{"n":', "12}", special("<|eot_id|>"))) as tgi:
        r = post(tgi, grammar)
        assert r.status_code == 200, r.text
        assert r.json()["generated_text"] == '{"n":12}'
        assert not tgi.errors


@pytest.mark.parametrize("path", ["/generate", "/generate_stream"])
def test_a_scripted_output_the_grammar_forbids_fails_the_generation_and_the_test(path: str) -> None:
    with FakeTGI(script=tokens('{"n": "twelve"}', special("<|eot_id|>"))) as tgi:
        r = post(tgi, {"type": "json", "value": SCHEMA}, path)
        if path == "/generate":
            assert r.status_code == 424
        else:
            assert '"error_type":"generation"' in r.text
        assert "does not match the request's grammar" in r.text
        assert [type(e) for e in tgi.errors] == [AssertionError]


def test_an_output_cut_by_the_token_limit_is_not_checked() -> None:
    with FakeTGI(script=tokens('{"n":', "1", "2")) as tgi, httpx.Client(base_url=tgi.url) as c:
        parameters = {"max_new_tokens": 2, "grammar": {"type": "json", "value": SCHEMA}}
        r = c.post("/generate", json={"inputs": "x", "parameters": parameters})
        assert r.status_code == 200 and not tgi.errors


@pytest.mark.parametrize(
    "grammar,status,message",
    [
        ({"type": "json", "value": {"type": "object"}}, 422,
         V + "grammar is not valid: Grammar must have a 'properties' field"),
        ({"type": "json", "value": {"type": 5, "properties": {}}}, 422, V + "grammar is not valid: "),
        ({"type": "json", "value": "{not json"}, 422, V + "grammar is not valid: "),
        ({"type": "json", "value": {"properties": {"a": {"not": {}}}}}, 422, V + "cannot compile regex from schema"),
        ({"type": "yaml", "value": "x"}, 422,
         "Failed to deserialize the JSON body into the target type: parameters.grammar: unknown variant `yaml`"),
        ({"type": "regex"}, 422, "parameters.grammar: missing field `value`"),
        ({"type": "regex", "value": 5}, 422, "parameters.grammar: invalid type: integer `5`, expected a string"),
    ],
)  # fmt: skip
def test_grammars_tgi_refuses_are_refused_with_its_message(
    grammar: object, status: int, message: str
) -> None:
    with FakeTGI() as tgi:
        r = post(tgi, grammar)
        assert r.status_code == status
        assert message in r.text
        assert not tgi.errors


def test_a_tgi_started_with_disable_grammar_support_refuses_every_grammar() -> None:
    with FakeTGI(disable_grammar_support=True) as tgi:
        for path in ("/generate", "/generate_stream"):
            r = post(tgi, {"type": "regex", "value": "a"}, path)
            error = {"error": V + "grammar is not supported", "error_type": "validation"}
            if path == "/generate":
                assert (r.status_code, r.json()) == (422, error)
            else:
                assert json.loads(r.text.removeprefix("data: ")) == error
        with httpx.Client(base_url=tgi.url) as c:  # no grammar: served as usual
            assert c.post("/generate", json={"inputs": "x"}).status_code == 200


def test_enforce_grammar_off_validates_the_grammar_but_not_the_output() -> None:
    with FakeTGI(script=tokens("prose", special("<|eot_id|>")), enforce_grammar=False) as tgi:
        assert post(tgi, {"type": "json", "value": SCHEMA}).json()["generated_text"] == "prose"
        assert post(tgi, {"type": "json", "value": {"type": "object"}}).status_code == 422
        assert not tgi.errors
