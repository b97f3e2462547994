"""The OpenAPI document: one error schema, every status a route can answer, clean ids, size bounds."""

import pytest

from service.config import Settings
from service.http.app import create_app


@pytest.fixture(scope="module")
def spec() -> dict:
    return create_app(Settings(max_images_per_request=7)).openapi()


def operations(spec: dict):
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def test_every_error_response_uses_our_schema_with_an_example(spec):
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    for path, method, operation in operations(spec):
        errors = {s: r for s, r in operation["responses"].items() if s >= "400" and not (
            s == "503" and "ready" in operation["operationId"])}
        assert "431" in errors, (path, method)
        for status, response in errors.items():
            content = response["content"]["application/json"]
            expected = "V2ErrorBody" if path.startswith("/v2") else "ErrorBody"
            assert content["schema"] == {"$ref": f"#/components/schemas/{expected}"}, (path, method, status)
            assert {"code", "detail"} <= set(content["example"]) and response["description"]


def test_guarded_and_task_routes_document_auth_and_unknown_task(spec):
    upload = spec["paths"]["/v1/tasks/{task}/versions"]["post"]["responses"]
    assert {"200", "201", "401", "403", "408", "413", "415", "422", "503", "507"} <= set(upload)
    classify = spec["paths"]["/v2/models/{task}/infer"]["post"]["responses"]
    assert {"401", "403", "404", "413", "415", "422", "503"} <= set(classify)
    assert classify["404"]["content"]["application/json"]["example"]["error"]


def test_operation_ids_are_unique_route_names(spec):
    ids = [operation["operationId"] for _, _, operation in operations(spec)]
    assert len(ids) == len(set(ids))
    assert all(i.replace("_", "").isalnum() and i.islower() for i in ids), ids
    assert {"classify", "upload_bundle", "readyz", "v2_infer", "v2_version_infer"} <= set(ids)


def test_image_arrays_are_bounded_by_the_settings(spec):
    body = spec["paths"]["/v1/tasks/{task}/classify"]["post"]["requestBody"]["content"]
    for media_type in ("multipart/form-data", "application/json"):
        assert body[media_type]["schema"]["properties"]["images"]["maxItems"] == 7
    tensor = spec["paths"]["/v2/models/{task}/infer"]["post"]["requestBody"]["content"]["application/json"]
    assert tensor["schema"]["properties"]["inputs"]["items"]["properties"]["data"]["maxItems"] == 7
    other = create_app(Settings(max_images_per_request=9)).openapi()  # limits are per app, not shared
    assert other["paths"]["/v1/classify"]["post"]["requestBody"]["content"]["application/json"]["schema"][
        "properties"]["images"]["maxItems"] == 9
    assert body["application/json"]["schema"]["properties"]["images"]["maxItems"] == 7
    many = {p["name"]: p for p in spec["paths"]["/v1/classify"]["post"]["parameters"]}
    assert many["tasks"]["schema"]["maxItems"] == 64


def test_image_arrays_need_one_image(spec):
    for path in ("/v1/tasks/{task}/classify", "/v1/classify", "/v1/zero-shot"):
        for media_type, body in spec["paths"][path]["post"]["requestBody"]["content"].items():
            assert body["schema"]["properties"]["images"]["minItems"] == 1, (path, media_type)


def test_inference_security_is_optional_unless_a_classify_token_is_set(spec):
    guarded = [("/v1/classify", "post"), ("/v1/zero-shot", "post"), ("/v1/embeddings", "post"),
               ("/v2/models/{task}/infer", "post")]
    locked = create_app(Settings(classify_token="secret")).openapi()
    for path, method in guarded:
        assert spec["paths"][path][method]["security"] == [{}, {"HTTPBearer": []}], path
        assert locked["paths"][path][method]["security"] == [{"HTTPBearer": []}], path
    assert spec["paths"]["/v1/tasks/{task}"]["put"]["security"] == [{"HTTPBearer": []}]  # admin stays required


def test_every_path_parameter_has_an_example(spec):
    missing = [(path, parameter["name"]) for path, _, operation in operations(spec)
               for parameter in operation.get("parameters", []) if parameter["in"] == "path"
               and not (parameter.get("example") or parameter.get("examples") or parameter["schema"].get("examples"))]
    assert missing == []


def test_links_lead_from_a_task_to_its_versions_and_aliases(spec):
    ids = {operation["operationId"] for _, _, operation in operations(spec)}
    for path, method, status in [("/v1/tasks", "get", "200"), ("/v1/tasks/{task}", "put", "201"),
                                 ("/v1/tasks/{task}/versions", "post", "201"),
                                 ("/v1/tasks/{task}/aliases/{alias}", "put", "200")]:
        links = spec["paths"][path][method]["responses"][status]["links"]
        assert links and {link["operationId"] for link in links.values()} <= ids, (path, method)
