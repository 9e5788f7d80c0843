"""/openapi.json describes what the API really takes and answers (request bodies, answers, the error shape)."""

from __future__ import annotations

import json

from lens.serve.http_api import new_fastapi


def _refs(node) -> set[str]:
    if isinstance(node, dict):
        out = {node["$ref"]} if "$ref" in node else set()
        return out.union(*(_refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_refs(v) for v in node))
    return set()


def test_every_post_has_a_body_every_route_its_errors_and_every_ref_resolves():
    schema = new_fastapi().openapi()
    comps = schema["components"]["schemas"]
    assert set(comps["ErrorBody"]["required"]) == {"error", "message", "status"}
    ops = [(m, path, op) for path, methods in schema["paths"].items() for m, op in methods.items()]
    assert {p for _, p, _ in ops} >= {"/v1/tag", "/v1/embed", "/v1/tag:batch", "/v1/search", "/v1/search:vector",
                                      "/v1/feedback", "/v1/search/{item_id}", "/healthz", "/v1/models",
                                      "/v1/index", "/v1/thumbnail/{item_id}"}
    for method, path, op in ops:
        responses = op["responses"]
        if path == "/v1/thumbnail/{item_id}":  # an image, not JSON
            assert responses["200"]["content"]["image/jpeg"]["schema"]["format"] == "binary"
            assert "307" in responses and "403" in responses
        else:
            assert "200" in responses and responses["200"]["content"]["application/json"]["schema"].get("$ref"), path
        errors = {c for c in responses if c.startswith(("4", "5"))}
        assert errors and "422" not in responses, (path, sorted(responses))  # 400, never FastAPI's 422
        for code in errors:
            assert responses[code]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorBody"}, (path, code)
        if method == "post":
            body = op["requestBody"]["content"]
            assert body, path
        if path != "/healthz":
            assert "401" in responses, path  # everything but the health check takes the API key
    image = schema["paths"]["/v1/tag"]["post"]["requestBody"]["content"]
    assert image["image/jpeg"]["schema"] == {"type": "string", "format": "binary"}
    assert image["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"
    assert "Retry-After" in schema["paths"]["/v1/tag"]["post"]["responses"]["503"]["headers"]
    assert schema["paths"]["/v1/search:vector"]["post"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/VectorQuery"}
    tag = comps["TagAnswer"]["properties"]
    assert {"model", "version", "tags", "sha256", "predicted_at"} <= set(tag)
    # every $ref points at a schema that exists
    missing = {r for r in _refs(schema) if r.split("/")[-1] not in comps}
    assert not missing, missing
    json.dumps(schema)  # serialisable as served
