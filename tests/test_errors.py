"""One error hierarchy: every failure Lens raises on purpose is a LensError with a stable code and HTTP status,
and keeps both when it crosses a process boundary (a Ray Serve handle pickles it)."""

from __future__ import annotations

import pickle

import pytest

from lens.errors import (
    LensError,
    ModelError,
    ModelMismatchError,
    OverloadedError,
    RequestFailed,
    UnsupportedImageTypeError,
    lens_error_of,
)
from lens.runtime.predictor import ItemError


@pytest.mark.parametrize("err", [OverloadedError("full"), ModelError("boom"), ModelMismatchError("other model"),
                                 RequestFailed("not an image", code="unsupported_media_type", status=415),
                                 LensError("x", code="custom", status=418)])
def test_errors_keep_code_and_status_through_pickling(err):
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and back.to_dict() == err.to_dict() and str(back) == str(err)


def test_http_errors_are_lens_errors_and_item_errors_become_them():
    from lens.serve.body import BodyTooLarge, HttpError

    assert issubclass(HttpError, LensError) and BodyTooLarge("big").to_dict()["status"] == 413
    assert HttpError("bad k", status=404, code="nope").to_dict() == {"error": "nope", "message": "bad k",
                                                                     "status": 404}
    item = ItemError.from_exception(UnsupportedImageTypeError("not an image"))
    assert item.to_error().to_dict() == item.to_dict() == {"error": "unsupported_media_type",
                                                           "message": "not an image", "status": 415}


def test_a_wrapped_error_is_found_through_its_cause():
    class Wrapper(Exception):
        def __init__(self, cause):
            self.cause = cause

    inner = OverloadedError("full")
    assert lens_error_of(Wrapper(inner)) is inner and lens_error_of(inner) is inner
    assert lens_error_of(ValueError("x")) is None
