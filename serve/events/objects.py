"""The event path's per-object S3 requests: the image's GET and the sidecar's conditional PUTs.

These are the two requests every event costs, so their client's own CPU is the consumer's floor. ``obstore`` (the
Python binding of Rust's ``object_store``) makes them for under a third of the CPU of boto3 or aiobotocore
(``scripts/bench_s3_clients.py``; ``scripts/bench_events.py`` records obstore's and boto3's in every run),
with the same conditional semantics: create-only (``If-None-Match: *``), update-if-ETag (``If-Match``), GET of a
version or if the ETag matches. boto3 stays for everything else (SQS, tombstones, embedding parts, object tags,
setup), and is the fallback (``s3_client: boto3``).

Both clients resolve the endpoint, region and credentials the same way: boto3's session (environment variables,
``AWS_ENDPOINT_URL[_S3]``, shared config, IRSA's web identity on EKS, instance roles), which obstore reads
through its ``Boto3CredentialProvider``; credentials refresh when they expire.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections import Counter
from concurrent.futures import Executor
from datetime import timedelta

__all__ = ["Missing", "Changed", "ObjectIO", "Boto3Objects", "ObstoreObjects", "object_io", "in_thread"]

logger = logging.getLogger("lens.events")


async def in_thread(executor: Executor | None, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on ``executor``'s threads (None: asyncio's default executor), awaited."""
    return await asyncio.get_running_loop().run_in_executor(executor, functools.partial(fn, *args, **kwargs))


class Missing(Exception):
    """No such object (or version)."""


class Changed(Exception):
    """A precondition failed: the object exists (create-only) or its ETag is not the one named."""


class ObjectIO:
    """What the event path asks of S3 per object, for an event loop (the consumer's). Safe to share between tasks
    and between threads, each with its own loop."""

    name = "?"

    def __init__(self, calls: Counter | None = None, executor: Executor | None = None) -> None:
        self.calls = calls  # requests by operation (``s3.GetObject``), beside boto3's own counts
        self.executor = executor  # threads for blocking calls (None: asyncio's default executor)

    def _count(self, op: str) -> None:
        if self.calls is not None:
            self.calls[f"s3.{op}"] += 1

    async def _in_thread(self, fn, *args, **kwargs):
        return await in_thread(self.executor, fn, *args, **kwargs)

    async def get(self, bucket: str, key: str, *, version_id: str | None = None, if_match: str | None = None,
                  max_bytes: int | None = None) -> tuple[int, bytes | None]:
        """(size, bytes) of an object; bytes ``None`` (body unread) when it is over ``max_bytes``. Raises
        :class:`Missing`, or :class:`Changed` when ``if_match`` is not its ETag."""
        raise NotImplementedError

    async def read(self, bucket: str, key: str) -> tuple[bytes, str]:
        """(bytes, ETag) of an object; :class:`Missing` if there is none."""
        raise NotImplementedError

    async def create(self, bucket: str, key: str, body: bytes, content_type: str) -> bool:
        """Write ``key`` only if no object is there; ``False`` when one is."""
        raise NotImplementedError

    async def replace(self, bucket: str, key: str, body: bytes, etag: str, content_type: str) -> None:
        """Overwrite ``key`` only if its ETag is still ``etag``; :class:`Changed` otherwise."""
        raise NotImplementedError


_MISSING = ("NoSuchKey", "404", "NoSuchVersion", "NotFound")
_PRECONDITION = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


class Boto3Objects(ObjectIO):
    """The same requests through a boto3 S3 client (thread-safe by botocore's design), each on ``executor``."""

    name = "boto3"

    def __init__(self, s3, executor: Executor | None = None) -> None:
        # a boto3 client counts its own requests (lens.serve.events.setup.count_calls)
        super().__init__(None, executor)
        self.s3 = s3

    def _call(self, fn, **kw):
        from botocore.exceptions import ClientError

        try:
            return fn(**kw)
        except ClientError as e:
            code = e.response["Error"]["Code"]
            if code in _MISSING:
                raise Missing(code) from e
            if code in _PRECONDITION:
                raise Changed(code) from e
            raise

    def _get(self, bucket, key, version_id, if_match, max_bytes):
        kw = {"VersionId": version_id} if version_id else ({"IfMatch": if_match} if if_match else {})
        obj = self._call(self.s3.get_object, Bucket=bucket, Key=key, **kw)
        size = obj.get("ContentLength") or 0
        if max_bytes is not None and size > max_bytes:
            obj["Body"].close()
            return size, None
        return size, obj["Body"].read()

    async def get(self, bucket, key, *, version_id=None, if_match=None, max_bytes=None):
        return await self._in_thread(self._get, bucket, key, version_id, if_match, max_bytes)

    def _read(self, bucket, key):
        obj = self._call(self.s3.get_object, Bucket=bucket, Key=key)
        return obj["Body"].read(), obj["ETag"]

    async def read(self, bucket, key):
        return await self._in_thread(self._read, bucket, key)

    async def create(self, bucket, key, body, content_type):
        try:
            await self._in_thread(self._call, self.s3.put_object, Bucket=bucket, Key=key, Body=body,
                                  ContentType=content_type, IfNoneMatch="*")
        except Changed:
            return False
        return True

    async def replace(self, bucket, key, body, etag, content_type):
        await self._in_thread(self._call, self.s3.put_object, Bucket=bucket, Key=key, Body=body,
                              ContentType=content_type, IfMatch=etag)


class ObstoreObjects(ObjectIO):
    """The same requests through obstore's async calls, on its own runtime (no thread of ours waits on them): one
    ``S3Store`` per bucket, built on first use and shared."""

    name = "obstore"

    def __init__(self, region: str | None = None, calls: Counter | None = None, *, s3=None, max_retries: int = 3,
                 retry_timeout_s: float = 20.0, executor: Executor | None = None) -> None:
        super().__init__(calls, executor)  # the executor runs only the one HeadBucket per bucket
        self.region = region
        self.s3 = s3  # a boto3 client for the one HeadBucket per bucket that finds its region
        # the consumer retries a failed object itself (its message comes back): obstore's own retries stay short
        self.retry = {"max_retries": max_retries, "retry_timeout": timedelta(seconds=retry_timeout_s)}
        self._stores: dict = {}
        self._lock = threading.Lock()
        self._session = None

    def store(self, bucket: str):
        s = self._stores.get(bucket)
        if s is None:
            with self._lock:
                s = self._stores.get(bucket)
                if s is None:
                    s = self._stores[bucket] = self._new_store(bucket)
        return s

    async def _store(self, bucket: str):
        s = self._stores.get(bucket)
        return s if s is not None else await self._in_thread(self.store, bucket)  # may ask S3 for the region

    def _new_store(self, bucket: str):
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider
        from obstore.store import S3Store

        from lens.storage import s3_endpoint

        if self._session is None:  # one boto3 session (one credential chain) for every bucket
            session = boto3.session.Session(region_name=self.region)
            self._session = (session, Boto3CredentialProvider(session))
        session, credentials = self._session
        kw: dict = {"region": self._region_of(bucket, session), "credential_provider": credentials,
                    "retry_config": self.retry}
        endpoint = s3_endpoint()
        if endpoint:  # moto, MinIO, a VPC endpoint: path-style, as boto3 addresses a custom endpoint
            kw.update(endpoint=endpoint, virtual_hosted_style_request=False)
            if endpoint.startswith("http://"):
                kw["client_options"] = {"allow_http": True}
        return S3Store(bucket, **kw)

    def _region_of(self, bucket: str, session) -> str:
        """The bucket's own region: boto3 follows S3's redirects to it, obstore does not. Asked once per bucket
        (HeadBucket's ``x-amz-bucket-region``) unless the configuration names one."""
        if self.region:
            return self.region
        try:
            head = (self.s3 or session.client("s3")).head_bucket(Bucket=bucket)
            return head["ResponseMetadata"]["HTTPHeaders"]["x-amz-bucket-region"]
        except Exception:  # noqa: BLE001 - no permission or no header: the session's region, as boto3 starts from
            return session.region_name or "us-east-1"

    @staticmethod
    def _error(e: Exception) -> Exception:
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        if isinstance(e, FileNotFoundError):  # obstore's NotFoundError
            return Missing(str(e).splitlines()[0])
        if isinstance(e, (PreconditionError, AlreadyExistsError)):
            return Changed(str(e).splitlines()[0])
        return e

    async def get(self, bucket, key, *, version_id=None, if_match=None, max_bytes=None):
        import obstore

        store = await self._store(bucket)
        opts = {"version": version_id} if version_id else ({"if_match": if_match} if if_match else {})
        self._count("GetObject")
        try:
            r = await obstore.get_async(store, key, options=opts or None)
            size = int(r.meta["size"])
            if max_bytes is not None and size > max_bytes:
                return size, None  # the body stream is dropped unread
            return size, bytes(await r.bytes_async())
        except Exception as e:  # noqa: BLE001 - mapped to Missing/Changed, anything else re-raised as it is
            raise self._error(e) from e

    async def read(self, bucket, key):
        import obstore

        store = await self._store(bucket)
        self._count("GetObject")
        try:
            r = await obstore.get_async(store, key)
            return bytes(await r.bytes_async()), r.meta["e_tag"]
        except Exception as e:  # noqa: BLE001
            raise self._error(e) from e

    async def _put(self, bucket, key, body, mode, content_type) -> None:
        """A conditional PUT, sent a second time if the first failed in transport (``GenericError``: a pooled
        connection the server had closed resets, and obstore does not resend a conditional PUT itself). Sending it
        again is safe because it is conditional: had the first landed, the second is refused (create-only: the
        object exists, so the caller reads it and finds its own write; If-Match: the ETag moved, so the message is
        retried and finds the same)."""
        import obstore
        from obstore.exceptions import GenericError

        store = await self._store(bucket)
        for attempt in range(2):
            self._count("PutObject")
            try:
                await obstore.put_async(store, key, body, mode=mode, attributes={"Content-Type": content_type},
                                        use_multipart=False)
                return
            except GenericError as e:
                if attempt == 0:
                    logger.info("PUT s3://%s/%s failed in transport, sending it again: %s", bucket, key,
                                str(e).splitlines()[0])
                    continue
                raise
            except Exception as e:  # noqa: BLE001
                raise self._error(e) from e

    async def create(self, bucket, key, body, content_type):
        try:
            await self._put(bucket, key, body, "create", content_type)
        except Changed:
            return False
        return True

    async def replace(self, bucket, key, body, etag, content_type):
        await self._put(bucket, key, body, {"e_tag": etag}, content_type)


def object_io(s3, client: str = "auto", *, region: str | None = None, calls: Counter | None = None,
              executor: Executor | None = None) -> ObjectIO:
    """The event path's per-object client: ``obstore`` (``auto``: where it is installed; its requests run on its own
    runtime) or ``boto3`` (``s3``; its requests on ``executor``'s threads)."""
    if client in ("auto", "obstore"):
        try:
            import obstore  # noqa: F401
        except ImportError:
            if client == "obstore":
                raise
        else:
            return ObstoreObjects(region, calls, s3=s3, executor=executor)
    return Boto3Objects(s3, executor)
