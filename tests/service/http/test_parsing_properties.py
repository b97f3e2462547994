"""Generated bodies, headers and names thrown at every parser a request meets (classify JSON and multipart, the V2
JSON and binary forms and its header, alias bodies, content types, path and query names): every answer is a
success or a 4xx whose code docs/errors.md lists, with a short detail; never a 5xx or an exception."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from service.http.app import create_app
from service.http.errors import MAX_DETAIL_CHARS
from service.http.jsonbody import MAX_DEPTH, parse_json
from service.serving.errors import ServiceError
from tests.helpers import ADMIN, OCTET, coop_bundle, documented_errors, png, settings_for

CODES = {code for _, code in documented_errors()}
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PNG = png()


@pytest.fixture(scope="module")
def api(backbone, tmp_path_factory) -> Iterator[TestClient]:
    config = settings_for(tmp_path_factory.mktemp("properties"), max_images_per_request=4,
                          max_image_bytes=64 * 1024, pin_preparations_per_minute=1000)
    with TestClient(create_app(config, backbone=backbone)) as client:  # an exception in the app fails the test
        for seed in (1, 2):
            assert client.post("/v1/tasks/t/versions", content=coop_bundle(backbone, ["a", "b"], seed=seed),
                               headers=ADMIN | OCTET).status_code == 201
        yield client


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text[:500]
    if response.status_code >= 400:
        body = response.json()
        assert body["code"] in CODES, body
        assert len(body["detail"]) <= MAX_DETAIL_CHARS + 40, len(body["detail"])


# --- strategies ----------------------------------------------------------------------------------------------

# Text with everything a client can put in a JSON string: controls, astral characters, lone surrogates.
texts = st.text(st.characters() | st.sampled_from(["\ud800", "\udfff", "\x00"]), max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4), max_leaves=20)
base64_texts = st.one_of(st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
                         st.just(base64.b64encode(PNG).decode()), st.just("data:image/png;base64,"), texts)
image_objects = st.fixed_dictionaries({}, optional={"name": st.one_of(texts, json_values), "data": base64_texts,
                                                    "extra": json_values})
classify_documents = st.one_of(json_values, st.fixed_dictionaries(
    {"images": st.one_of(st.lists(st.one_of(image_objects, json_values), max_size=6), json_values)}))
media_types = st.sampled_from(["application/json", "Application/JSON", "multipart/form-data", "text/plain", "",
                               "application/json; charset=utf-8", "multipart/form-data; boundary=x"])
header_values = st.text(st.characters(max_codepoint=255, exclude_characters=["\r", "\n"]), max_size=12)
v2_inputs = st.fixed_dictionaries({}, optional={
    "name": st.one_of(st.just("images"), texts), "datatype": st.sampled_from(["BYTES", "FP32", ""]),
    "shape": st.one_of(st.lists(st.integers(-3, 10**12), max_size=3), json_values),
    "data": st.one_of(st.lists(base64_texts, max_size=5), json_values),
    "parameters": st.one_of(st.fixed_dictionaries({"binary_data_size": st.one_of(st.integers(-1, 10**6),
                                                                                  json_values)}), json_values)})
v2_documents = st.one_of(json_values, st.fixed_dictionaries({"inputs": st.lists(v2_inputs, max_size=3)}, optional={
    "id": json_values, "parameters": st.fixed_dictionaries({}, optional={"top_k": json_values,
                                                                       "binary_data_output": json_values}),
    "outputs": st.lists(st.fixed_dictionaries({"name": st.one_of(st.sampled_from(["labels", "probabilities"]),
                                                                 texts)},
                                              optional={"parameters": json_values}), max_size=3)}))
binary_tails = st.lists(st.binary(max_size=40), max_size=5).map(
    lambda parts: b"".join(struct.pack("<I", len(p)) + p for p in parts)) | st.binary(max_size=80)
names = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40)  # a URL carries no lone surrogate


def wire(headers: dict[str, str]) -> dict[str, bytes]:
    """Header values as bytes on the wire (latin-1), so characters like '²' reach the server as a client sends them."""
    return {name: value.encode("latin-1") for name, value in headers.items()}


def as_json(value: Any) -> bytes:
    return json.dumps(value).encode()  # ensure_ascii: lone surrogates travel as \\ud800 escapes


# --- the parsers ---------------------------------------------------------------------------------------------


@SETTINGS
@given(document=classify_documents, raw=st.none() | st.binary(max_size=300), media_type=media_types)
@example(document={"images": [{"name": "\ud800", "data": base64.b64encode(PNG).decode()}]}, raw=None,
         media_type="application/json")
@example(document=None, raw=b"[" * 100_000 + b"]" * 100_000, media_type="application/json")
@example(document=None, raw=b'{"images": [{"data": "", "name": ' + b"7" * 5000 + b"}]}", media_type="application/json")
def test_classify_bodies(api, document, raw, media_type):
    body = raw if raw is not None else as_json(document)
    check(api.post("/v1/tasks/t/classify", content=body, headers={"Content-Type": media_type}))


@SETTINGS
@given(parts=st.lists(st.tuples(st.sampled_from(["images", "other", ""]), names | st.none(),
                                st.one_of(st.binary(max_size=64), st.just(PNG))), max_size=6),
       boundary=st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=['"', ";", ","]),
                        min_size=1, max_size=20),
       cut=st.none() | st.integers(0, 400))
def test_classify_multipart_bodies(api, parts, boundary, cut):
    delimiter = b"--" + boundary.encode()
    body = b"".join(delimiter + b'\r\nContent-Disposition: form-data; name="' + field.encode() + b'"'
                    + (b'; filename="' + name.encode("utf-8", "surrogatepass") + b'"' if name is not None else b"")
                    + b"\r\n\r\n" + data + b"\r\n" for field, name, data in parts) + delimiter + b"--\r\n"
    body = body if cut is None else body[:cut]
    check(api.post("/v1/tasks/t/classify", content=body,
                   headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}))


@SETTINGS
@given(document=v2_documents, tail=st.none() | binary_tails, length=st.none() | header_values | st.integers(-5, 10**6),
       encoding=st.none() | header_values)
@example(document={"inputs": []}, tail=b"", length="²", encoding=None)
@example(document={"inputs": []}, tail=b"", length="¹²", encoding=None)
@example(document={"inputs": [{}] * 2000}, tail=None, length=None, encoding=None)
@example(document={"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1]}]}, tail=b"", length=None,
         encoding="GZIP")
def test_v2_infer_bodies_and_headers(api, document, tail, length, encoding):
    header = as_json(document)
    headers = {"Content-Type": "application/octet-stream"}
    if length is not None:
        headers["Inference-Header-Content-Length"] = str(length)
    elif tail is not None:
        headers["Inference-Header-Content-Length"] = str(len(header))
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    check(api.post("/v2/models/t/infer", content=header + (tail or b""), headers=wire(headers)))


@SETTINGS
@given(alias=names, target=json_values | st.fixed_dictionaries({"version": json_values}), raw=st.none() | st.binary(
    max_size=200))
@example(alias="prod", target={"version": True}, raw=None)
@example(alias="prod", target=None, raw=b'{"version": ' + b"1" * 5000 + b"}")
@example(alias="prod", target=None, raw=b"[" * 50_000 + b"]" * 50_000)
def test_alias_bodies_and_names(api, alias, target, raw):
    response = api.put(f"/v1/tasks/t/aliases/{quote(alias, safe='')}", content=raw if raw is not None else
                       as_json(target), headers=ADMIN | {"Content-Type": "application/json"})
    check(response)
    if alias == "prod" and raw is None and isinstance(target, dict) and target.get("version") is True:
        assert response.status_code == 422 and response.json()["field"].startswith("body.version")


@SETTINGS
@given(task=names, ref=names, media_type=header_values, authorization=header_values)
@example(task="t", ref="1", media_type="Application/Octet-Stream", authorization="Bearer test-admin-token")
def test_names_and_headers_in_paths_queries_and_uploads(api, task, ref, media_type, authorization):
    task_q, ref_q = quote(task, safe=""), quote(ref, safe="")
    check(api.get(f"/v1/tasks/{task_q}"))
    check(api.get(f"/v1/tasks/{task_q}/versions"))
    check(api.post(f"/v1/tasks/t/classify?version={ref_q}", files=[("images", ("a.png", PNG, "image/png"))]))
    check(api.post(f"/v1/classify?tasks={task_q}", files=[("images", ("a.png", PNG, "image/png"))]))
    check(api.post(f"/v1/tasks/t/versions/{ref_q}/activate", headers=ADMIN))
    check(api.get(f"/v2/models/{task_q}/versions/{ref_q}"))
    upload = api.post("/v1/tasks/t/versions", content=b"not a bundle",
                      headers=wire({"Authorization": authorization, "Content-Type": media_type}))
    check(upload)
    if media_type.lower() == "application/octet-stream" and authorization == ADMIN["Authorization"]:
        assert upload.json()["code"] == "invalid_bundle"  # media types are case-insensitive


# --- the JSON parser itself ----------------------------------------------------------------------------------


plain_json = st.recursive(  # what the bounded parser takes: no Infinity, integers of at most 32 digits
    st.none() | st.booleans() | st.integers(-10**31, 10**31) | st.floats(allow_nan=False, allow_infinity=False) | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(value=plain_json)
def test_bounded_json_agrees_with_the_standard_parser_within_its_limits(value):
    text = as_json(value)
    assert parse_json(bytearray(text), max_values=10_000) == json.loads(text)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200) | json_values.map(as_json).map(lambda b: b[: len(b) // 2]),
       max_values=st.integers(1, 50))
@example(raw=b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), max_values=100)
def test_bounded_json_refuses_with_a_4xx_and_nothing_else(raw, max_values):
    try:
        parse_json(bytearray(raw), max_values=max_values)
    except ServiceError as exc:
        assert exc.status in (413, 422) and exc.code in CODES
