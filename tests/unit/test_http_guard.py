"""The HTTP guards on a Flask app (``qlib_server.front.guard``): JSON answers to every error, bodies read up to
a limit and no further, slots per client address and in all; the config keys that set them.

What only a real gevent server shows (chunked 1 GiB bodies, slow senders and readers, the connection
closed without draining) is in ``tests/integration/test_hostile_http.py``."""

from __future__ import annotations

import io
import json

import pytest
from flask import Flask

from qlib_server.config import make_config
from qlib_server.errors import ConfigError
from qlib_server.front import guard


@pytest.fixture
def client():
    app = Flask("guarded")

    @app.get("/plain")
    def plain():
        return {"status": "ok"}

    @app.get("/broken")
    def broken():
        raise KeyError("a bug")

    @app.post("/features")
    def features():
        try:
            return {"got": guard.json_body(guard.read_body(100, "POST /features (a test limit)", None))}
        except guard.Refused as refused:
            return refused.response()

    guard.install(app)
    return app.test_client()


def refusal(reply, code: int, *words: str) -> dict:
    assert reply.status_code == code and reply.mimetype == "application/json", (reply.status_code, reply.data)
    answer = reply.get_json()
    assert answer["result"] is None and answer["status"] in (1, 2)
    for word in words:
        assert word in answer["detailed_info"], answer
    return answer


def test_unknown_paths_wrong_methods_and_crashes_get_json_not_html(client, caplog):
    refusal(client.get("/nowhere"), 404, "Not Found")
    reply = client.put("/plain")
    refusal(reply, 405, "Method Not Allowed")
    assert "GET" in reply.headers["Allow"]
    refusal(client.get("/features"), 405)
    assert refusal(client.get("/broken"), 500, "KeyError")["status"] == 2
    assert "error answering GET /broken" in caplog.text and "a bug" in caplog.text


def test_a_body_sent_where_none_is_taken_is_refused_and_the_connection_closed(client):
    reply = client.get("/plain", data=b"x" * 10)
    refusal(reply, 413, "takes no request body")
    assert reply.headers["Connection"] == "close"
    assert client.get("/plain").status_code == 200


def test_a_body_over_the_limit_is_refused_naming_it_whether_declared_or_found(client):
    refusal(client.post("/features", data=b"x" * 101, content_type="application/json"), 413, "body of 101 bytes",
            "a test limit")
    undeclared = {"wsgi.input": io.BytesIO(b"[" + b"1," * 200 + b"1]"), "wsgi.input_terminated": True,
                  "HTTP_TRANSFER_ENCODING": "chunked"}
    reply = client.post("/features", environ_overrides=undeclared, content_type="application/json")
    refusal(reply, 413, "over 100 bytes", "nothing more of it was read")
    assert undeclared["wsgi.input"].tell() == 101  # one byte past the limit read, no more
    assert client.post("/features", json=[1, 2]).get_json() == {"got": [1, 2]}


@pytest.mark.parametrize("body, content_type, says", [
    (b"[" * 90 + b"]" * 10, "application/json", "not valid JSON"),
    (b"\xff\xfe", "application/json", "not UTF-8"),
    (b"{}", "text/plain", "must be application/json"),
])
def test_bodies_that_cannot_be_decoded_are_refused_with_400(client, body, content_type, says):
    refusal(client.post("/features", data=body, content_type=content_type), 400, says)


def test_json_nested_deeper_than_python_parses_is_a_400_not_a_crash():
    app = Flask("deep")

    @app.post("/features")
    def features():
        try:
            return {"got": guard.json_body(guard.read_body(1 << 20, "a test limit", None))}
        except guard.Refused as refused:
            return refused.response()

    guard.install(app)
    refusal(app.test_client().post("/features", data=b"[" * 200_000 + b"]" * 200_000,
                                   content_type="application/json"), 400, "nested too deeply")


def test_slots_are_limited_per_client_address_and_in_all_and_freed_once():
    slots = guard.Slots(3, 2, "feature transfers", ("max_transfers", "max_transfers_per_client"))
    first, second = slots.take("10.0.0.1"), slots.take("10.0.0.1")
    with pytest.raises(guard.Refused) as per_client:
        slots.take("10.0.0.1")
    assert per_client.value.code == 429 and "max_transfers_per_client" in per_client.value.info
    assert per_client.value.headers == {"Retry-After": "1"}
    third = slots.take("10.0.0.2")
    with pytest.raises(guard.Refused) as in_all:
        slots.take("10.0.0.3")
    assert "(max_transfers)" in in_all.value.info
    first()
    first()  # freeing twice frees one slot
    assert slots.count == 2
    slots.take("10.0.0.3")
    with pytest.raises(guard.Refused):
        slots.take("10.0.0.4")
    second()
    third()
    assert dict(slots.held) == {"10.0.0.3": 1}
    assert json.loads(in_all.value.response().get_data())["status"] == 1


def test_the_http_limits_have_sane_defaults_and_are_validated(tmp_path):
    cfg = make_config(provider_uri=str(tmp_path))
    assert (cfg.max_transfers, cfg.max_transfers_per_client, cfg.transfer_timeout) == (32, 8, 30.0)
    assert (cfg.max_event_streams, cfg.max_event_streams_per_client) == (16, 4)
    for bad, says in [({"max_transfers_per_client": 9, "max_transfers": 8}, "max_transfers_per_client must not"),
                      ({"max_event_streams_per_client": 20}, "max_event_streams_per_client must not"),
                      ({"max_transfers": 0}, "max_transfers"), ({"transfer_timeout": 0}, "transfer_timeout"),
                      ({"max_event_streams": -1}, "max_event_streams")]:
        with pytest.raises(ConfigError, match=says):
            make_config(provider_uri=str(tmp_path), **bad)
