"""The HTTP API's documented shapes: request bodies, answers and the error body, for ``/openapi.json``.

Handlers build their JSON directly (the answers are produced once, in :mod:`lens.serve.http_api`); these models only
describe them, so Swagger's "Try it out" can upload an image and a generated client knows every field. Each
route documents its error statuses with :class:`ErrorBody`; ``tests/test_openapi.py`` checks that every POST
route has a request body and every route its errors.
"""

from __future__ import annotations

from typing import Optional, Union

from fastapi.responses import Response
from pydantic import BaseModel, Field

__all__ = ["ErrorBody", "route_docs"]


class ErrorBody(BaseModel):
    error: str = Field(..., description="machine-readable code, e.g. unsupported_media_type, image_too_large")
    message: str = Field(..., description="what is wrong, for a person")
    status: int = Field(..., description="the HTTP status, repeated")


class Tag(BaseModel):
    label: str
    class_id: int
    score: float = Field(..., description="softmax probability")


class CustomTag(Tag):
    passed: Optional[bool] = Field(None, description="with custom_top_k: whether the class reached its tuned "
                                   "threshold (absent in the default, thresholded list, where all did)")


class HeadInfo(BaseModel):
    id: str = Field(..., description="the serve_multiplexed_model_id that chose it")
    name: str
    sha256: str


class TagAnswer(BaseModel):
    model: str = Field(..., description="timm architecture")
    version: Optional[str] = Field(None, description="registry name@version that answered (null: fixed weights)")
    tags: list[Tag]
    custom_tags: Optional[dict[str, list[CustomTag]]] = Field(
        None, description="head name -> its classes at or above their threshold, best first (pools serving lens "
        "train heads; may be empty); with custom_top_k=K its K best classes, each marked passed or not")
    head: Optional[HeadInfo] = None
    embedding: Optional[list[float]] = Field(None, description="with ?embedding=true: L2-normalised")
    model_identity: Optional[dict] = Field(None, description="with ?embedding=true: the identity of the version "
                                           "that embedded (model, weights_sha256, preprocess, embed_dim, version)")
    sha256: str = Field(..., description="SHA-256 of the image bytes (echo it in /v1/feedback)")
    predicted_at: float = Field(..., description="unix time of the answer (echo it in /v1/feedback)")
    latency_ms: float


class EmbedAnswer(BaseModel):
    model: str
    version: Optional[str] = None
    dim: int
    embedding: list[float]


class BatchItem(BaseModel):
    index: int = Field(..., description="position of the image in the request")
    tags: Optional[list[Tag]] = None
    version: Optional[str] = None
    custom_tags: Optional[dict[str, list[CustomTag]]] = None
    sha256: Optional[str] = None
    predicted_at: Optional[float] = None
    error: Optional[str] = Field(None, description="this image's error code (the others still answered)")
    message: Optional[str] = None
    status: Optional[int] = None


class BatchAnswer(BaseModel):
    model: str
    results: list[BatchItem]
    latency_ms: float


class Hit(BaseModel):
    id: str
    score: float = Field(..., description="cosine similarity")
    metadata: dict = Field(default_factory=dict, description="tags and carried columns kept in the index")


class SearchAnswer(BaseModel):
    results: list[Hit]
    index_version: str
    model: Optional[str] = None
    version: Optional[str] = None
    latency_ms: Optional[float] = None


class VectorSearchAnswer(BaseModel):
    results: Union[list[Hit], list[list[Hit]]] = Field(..., description="one list per vector (one list for "
                                                       "{\"vector\": ...})")
    index_version: str


class IndexAnswer(BaseModel):
    index_version: str = Field(..., description="the served version (CURRENT)")
    type: str = Field(..., description="flat, hnsw, ivf or ivfpq")
    count: int = Field(..., description="vectors in the version")
    dim: int
    delta: int = Field(..., description="fresh vectors from the event path, searchable before the next build")
    model_identity: dict = Field(..., description="the model that embedded the index (queries must match it)")


class VectorQuery(BaseModel):
    vector: Optional[list[float]] = Field(None, description="one query vector (the index's dimension)")
    vectors: Optional[list[list[float]]] = Field(None, description="several query vectors")
    filter: Optional[dict] = Field(None, description="keep only items this JSON filter matches (see the filter "
                                   "query parameter of /v1/search)")


class FeedbackItem(BaseModel):
    id: Optional[str] = Field(None, description="the image's id or location (s3://..., a path): lens train "
                              "--feedback reads it")
    sha256: Optional[str] = Field(None, description="from the /v1/tag answer (id or sha256 is required)")
    labels: list[str] = Field(..., description="the true labels")
    predicted: list[str] = Field(..., description="what Lens answered, best first")
    version: Optional[str] = None
    predicted_at: Optional[float] = None
    head: Optional[str] = None


class FeedbackRequest(BaseModel):
    items: list[FeedbackItem]


class FeedbackAnswer(BaseModel):
    stored: int
    latency_ms: float


class HealthAnswer(BaseModel):
    status: str
    pools: dict[str, str]


class ModelsAnswer(BaseModel):
    pools: list[dict] = Field(..., description="each pool's model, version, backend, batching, drift ...")


_IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff", "image/heic",
                "image/heif", "image/avif", "application/octet-stream")


def _image_body(many: bool = False) -> dict:
    binary = {"type": "string", "format": "binary"}
    form = ({"type": "object", "properties": {"image": {"type": "array", "items": binary}}, "required": ["image"]}
            if many else {"type": "object", "properties": {"image": binary}, "required": ["image"]})
    content = {} if many else {t: {"schema": binary} for t in _IMAGE_TYPES}
    content["multipart/form-data"] = {"schema": form}
    return {"requestBody": {"required": True, "content": content,
                            "description": "several images as multipart file fields named image" if many else
                            "the image's bytes (raw, with its image/* type) or a multipart file field named image"}}


def _json_body(model: type[BaseModel], *alternatives: type[BaseModel]) -> dict:
    refs = [{"$ref": f"#/components/schemas/{m.__name__}"} for m in (model, *alternatives)]
    schema = refs[0] if len(refs) == 1 else {"oneOf": refs}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


_ERRORS = {
    400: "a bad parameter or body (the message names it)", 401: "missing or wrong API key",
    403: "a location the service may not read (api.ui.local_roots)",
    404: "not configured here (search, feedback) or unknown (id, head)", 409: "model mismatch (index, head)",
    413: "body, image or item count over its limit", 415: "not an accepted image type or format",
    500: "a server fault (the log has the details under the reference in the message)",
    503: "at capacity or not ready: retry after Retry-After seconds", 504: "no answer within request_timeout_s",
}


def _errors(*codes: int) -> dict:
    out = {}
    for c in codes:
        out[c] = {"model": ErrorBody, "description": _ERRORS[c]}
        if c == 503:
            out[c]["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
    return out


_IMAGE_ERRORS = (400, 401, 413, 415, 500, 503, 504)


def route_docs() -> dict[str, dict]:
    """Keyword arguments of each route's FastAPI registration: summary, answers, errors, request body."""
    return {
        "/v1/tag": dict(summary="Tag one image", responses={200: {"model": TagAnswer}, **_errors(*_IMAGE_ERRORS, 404,
                                                                                             409)},
                        openapi_extra=_image_body()),
        "/v1/embed": dict(summary="Embed one image", responses={200: {"model": EmbedAnswer},
                                                                **_errors(*_IMAGE_ERRORS)},
                          openapi_extra=_image_body()),
        "/v1/tag:batch": dict(summary="Tag several images (each answered or failed on its own)",
                              responses={200: {"model": BatchAnswer}, **_errors(*_IMAGE_ERRORS)},
                              openapi_extra=_image_body(many=True)),
        "/v1/search": dict(summary="Similar images to an uploaded image",
                           responses={200: {"model": SearchAnswer}, **_errors(*_IMAGE_ERRORS, 404, 409)},
                           openapi_extra=_image_body()),
        "/v1/search:vector": dict(summary="Nearest neighbours of one or more vectors",
                                  responses={200: {"model": VectorSearchAnswer},
                                             **_errors(400, 401, 404, 413, 500, 503, 504)},
                                  openapi_extra=_json_body(VectorQuery)),
        "/v1/search/{item_id:path}": dict(summary="Similar images to an indexed id",
                                          responses={200: {"model": SearchAnswer},
                                                     **_errors(400, 401, 404, 500, 503, 504)}),
        "/v1/feedback": dict(summary="Labeled feedback (echo the /v1/tag answer with the true labels)",
                             responses={200: {"model": FeedbackAnswer}, **_errors(400, 401, 404, 413, 500, 503, 504)},
                             openapi_extra=_json_body(FeedbackRequest, FeedbackItem)),
        "/v1/index": dict(summary="The served index: version, type, size, model",
                          responses={200: {"model": IndexAnswer}, **_errors(401, 404, 500, 503, 504)}),
        "/v1/thumbnail/{item_id:path}": dict(
            summary="The image of an indexed id, as a JPEG thumbnail (or a redirect to a presigned S3 URL)",
            response_class=Response,
            responses={200: {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
                             "description": "a JPEG at most api.ui.thumbnail_px on its longest side"},
                       307: {"description": "api.ui.thumbnails: presign -- the original's presigned URL"},
                       **_errors(401, 403, 404, 413, 415, 500, 503, 504)}),
        "/healthz": dict(summary="Ready when every pool is warm (never needs a key)",
                         responses={200: {"model": HealthAnswer}, **_errors(503)}),
        "/v1/models": dict(summary="What each pool serves", responses={200: {"model": ModelsAnswer}, **_errors(401)}),
    }


#: Models referenced only from request bodies (registered so their $refs resolve).
BODY_MODELS = (VectorQuery, FeedbackRequest, FeedbackItem)
