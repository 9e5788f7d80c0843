"""Parsing S3 event notifications as they arrive through SQS: S3's own notifications (directly, or wrapped by SNS)
and EventBridge's (``"source": "aws.s3"``, ``detail-type`` ``Object Created`` / ``Object Deleted``), the route AWS
recommends now. Both give the same :class:`ObjectEvent`: creations to tag, removals to delete."""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import unquote_plus

__all__ = ["ObjectEvent", "PoisonMessage", "parse_message", "sequencer_newer"]


class PoisonMessage(ValueError):
    """A message that is not a well-formed S3 notification; retrying cannot help (it goes to the DLQ)."""


@dataclass(frozen=True)
class ObjectEvent:
    bucket: str
    key: str  # URL-decoded, as stored in S3
    etag: str | None
    version_id: str | None
    size: int | None
    sequencer: str | None
    event_name: str

    @property
    def removed(self) -> bool:
        """An ``ObjectRemoved`` event: a deletion, or a delete marker in a versioned bucket."""
        return self.event_name.startswith("ObjectRemoved:")

    @property
    def identity(self) -> tuple:
        """Same bucket, key and ETag/version = the same object version: tag it once."""
        return (self.bucket, self.key, self.version_id or self.etag)


#: EventBridge's detail-type -> the S3 notification event family it stands for
_BRIDGE_TYPES = {"Object Created": "ObjectCreated", "Object Deleted": "ObjectRemoved"}


def _bridge_event(doc: dict) -> list[ObjectEvent]:
    """The object event of one EventBridge message (an S3 event rule's target is the queue); other S3 detail types
    (tags, ACLs, restores) are nothing to do."""
    family = _BRIDGE_TYPES.get(doc.get("detail-type"))
    if family is None:
        return []
    try:
        detail = doc["detail"]
        obj = detail["object"]
        bucket, key = detail["bucket"]["name"], obj["key"]
        if not isinstance(bucket, str) or not isinstance(key, str) or not key:
            raise PoisonMessage("EventBridge event: bucket name and key must be non-empty strings")
        reason = detail.get("reason") or ("PutObject" if family == "ObjectCreated" else "DeleteObject")
        if family == "ObjectRemoved" and detail.get("deletion-type") == "Delete Marker Created":
            reason = "DeleteMarkerCreated"
        return [ObjectEvent(bucket=bucket, key=key,  # EventBridge keys are not URL-encoded
                            etag=(obj.get("etag") or obj.get("eTag") or "").strip('"') or None,
                            version_id=obj.get("version-id") or None, size=obj.get("size"),
                            sequencer=obj.get("sequencer"), event_name=f"{family}:{reason}")]
    except (KeyError, TypeError, AttributeError) as e:
        raise PoisonMessage(f"EventBridge S3 event without {e}") from e


def parse_message(body: str, max_records: int = 100) -> list[ObjectEvent] | None:
    """ObjectCreated and ObjectRemoved records of one SQS message body (an S3 notification, through SNS or not, or
    an EventBridge S3 event); ``None`` for an ``s3:TestEvent``.

    Raises :class:`PoisonMessage` if the body is not an S3 notification at all, or holds more than
    ``max_records`` records (S3 sends one per message; a bigger one is hand-made).
    """
    try:
        doc = json.loads(body)
    except (TypeError, json.JSONDecodeError) as e:
        raise PoisonMessage(f"message body is not JSON: {e}") from e
    if isinstance(doc, dict) and doc.get("Type") == "Notification" and "Message" in doc:  # SNS envelope
        if not isinstance(doc["Message"], str):
            raise PoisonMessage("SNS envelope's Message is not a string")
        return parse_message(doc["Message"], max_records)
    if not isinstance(doc, dict):
        raise PoisonMessage("message body is not a JSON object")
    if doc.get("Event") == "s3:TestEvent":
        return None
    if doc.get("source") == "aws.s3" and "detail-type" in doc:  # S3 -> EventBridge -> SQS
        return _bridge_event(doc)
    records = doc.get("Records")
    if not isinstance(records, list):
        raise PoisonMessage("message has no Records list (not an S3 event notification)")
    if len(records) > max_records:
        raise PoisonMessage(f"message has {len(records)} records; at most {max_records} are accepted "
                            "(max_records_per_message)")
    out = []
    for i, rec in enumerate(records):
        try:
            name = rec["eventName"]
            if not name.startswith(("ObjectCreated:", "ObjectRemoved:")):
                continue
            s3 = rec["s3"]
            obj = s3["object"]
            if not isinstance(s3["bucket"]["name"], str) or not isinstance(obj["key"], str) or not obj["key"]:
                raise PoisonMessage(f"record {i}: bucket name and key must be non-empty strings")
            out.append(ObjectEvent(
                bucket=s3["bucket"]["name"],
                key=unquote_plus(obj["key"]),  # S3 URL-encodes keys in events: '+' for space, %xx
                etag=(obj.get("eTag") or obj.get("etag") or "").strip('"') or None,
                version_id=obj.get("versionId") or None,
                size=obj.get("size"),
                sequencer=obj.get("sequencer"),
                event_name=name,
            ))
        except (KeyError, TypeError, AttributeError) as e:
            raise PoisonMessage(f"record {i} is not an S3 event record: missing {e}") from e
    return out


def sequencer_newer(a: str | None, b: str | None) -> bool:
    """Is sequencer ``a`` later than ``b``? (S3: pad the shorter with leading zeros, compare as hex.)"""
    if not a or not b:
        return False
    n = max(len(a), len(b))
    return int(a.rjust(n, "0"), 16) > int(b.rjust(n, "0"), 16)
