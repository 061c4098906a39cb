"""Where a cache and its results table live: a local folder, or any fsspec URL (``s3://``,
``gs://``, ``az://``, ``memory://``; ``file://`` is a local folder).

A location is a :class:`pathlib.Path` for a local folder and a ``upath.UPath`` for an object
store: both take ``/``, ``name``, ``parent``, ``is_file``, ``read_text``, ``glob``. What differs
between them is here, once:

- **Writing a file.** Locally: a temporary file, fsynced, renamed into place. An object store
  has no rename, but one PUT of a whole object is atomic (readers see the old object or the
  new one), so a file is written by one PUT of its bytes.
- **Creating a file only if it is absent** (:func:`create_exclusive`): ``O_EXCL`` locally, a
  conditional write (S3's ``If-None-Match: *``) on an object store. The build lease of a cache
  on object storage (pipeline/cache/lock.py) rests on it.
- **Errors** (:func:`storage_errors`): a missing bucket, missing credentials or an unreachable
  endpoint become one line naming the location and the fix.

Credentials and endpoints come from the standard environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``, ``AWS_PROFILE`` for
s3; ``GOOGLE_APPLICATION_CREDENTIALS`` for gs; ``AZURE_STORAGE_*`` for az), as each SDK reads
them; kdcache passes none itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import KdError
from pipeline.io import atomic_write_bytes, sha256_file

# scheme://rest, the scheme as RFC 3986 spells one (two letters at least: not a drive letter)
URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://(.*)$")
# s3:/bucket, s3:bucket: a scheme without its "//", almost surely a mistyped URL
ALMOST_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(/?)(?!/)(.+)$")
LOCAL_PROTOCOLS = ("file", "local")
BUCKETED = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl")
PACKAGES = {"s3": "'kdcache[s3]'", "s3a": "'kdcache[s3]'", "gs": "gcsfs", "gcs": "gcsfs",
            "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs", "adl": "adlfs"}
OBJECT_STORE_KEYS = ("cache", "cache_root", "out")  # config keys that may hold a URL

Location = Any  # a pathlib.Path (local) or a upath.UPath (object store)


def is_url(text: str) -> bool:
    return bool(URL.match(str(text)))


def check_path_text(text: str, key: str) -> None:
    """Refuse text for ``key`` that is a URL where only a local path is meant, or that looks
    like a mistyped URL (``s3:/bucket``: a local folder named ``s3:`` would be created)."""
    match = URL.match(text)
    if match and match.group(1).lower() not in LOCAL_PROTOCOLS and key not in OBJECT_STORE_KEYS:
        raise KdError(f"{key}={text} is a URL, but {key} must be a local path; only "
                      f"{', '.join(k + '=' for k in OBJECT_STORE_KEYS)} may be on object storage")
    almost = ALMOST_URL.match(text)
    if not match and almost and _known_protocol(almost.group(1)):
        scheme = almost.group(1)
        raise KdError(f"{key}={text} is not a URL (a scheme needs '//' after '{scheme}:') nor a "
                      f"local path; write {key}={scheme}://BUCKET/KEY, or ./{text} for a local "
                      "folder of that name")


def _known_protocol(scheme: str) -> bool:
    """Whether fsspec knows ``scheme`` (installed or not): ``s3:/x`` is a mistyped URL, while
    ``digits:v2`` is a local name."""
    from fsspec.registry import known_implementations, registry

    return scheme.lower() in known_implementations or scheme.lower() in registry


def location(text: str | os.PathLike, key: str = "cache") -> Location:
    """The location ``text`` names: a Path for a local path or ``file://`` URL, a UPath for
    an object store. A malformed URL, an unknown protocol or a missing filesystem package is
    refused here, in one line, before anything is created."""
    if _is_upath(text) or isinstance(text, Path):
        return text
    text = str(text)
    check_path_text(text, key)
    match = URL.match(text)
    if not match:
        return Path(text)
    protocol, rest = match.group(1).lower(), match.group(2)
    if protocol in LOCAL_PROTOCOLS:  # file:///abs/path, or file://localhost/abs/path (RFC 8089)
        return Path("/" + (rest[len("localhost"):] if rest.startswith("localhost/") else rest).lstrip("/"))
    if not rest.strip("/"):
        raise KdError(f"{key}={text} names no place; write {key}={protocol}://BUCKET/PATH")
    import fsspec

    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise KdError(f"{key}={text}: unknown storage protocol {protocol}://; use a local path or "
                      "one of s3://, gs://, az://, memory:// (fsspec's protocols)") from None
    except ImportError:
        package = PACKAGES.get(protocol, f"the fsspec package for {protocol}://")
        raise KdError(f"{key}={text} needs the {protocol}:// filesystem; install it: pip install "
                      f"{package}") from None
    bucket = rest.split("/", 1)[0]
    if protocol in BUCKETED and not bucket:
        raise KdError(f"{key}={text} names no bucket; write {key}={protocol}://BUCKET/PATH")
    if protocol in BUCKETED and rest.strip("/") == bucket:
        raise KdError(f"{key}={text} is a whole bucket; name a folder in it, e.g. "
                      f"{key}={protocol}://{bucket}/caches/NAME")
    from upath import UPath

    # Listings must not be cached: a lease, a shard's record or a results row written by
    # another process has to be seen at the next look.
    options = {"use_listings_cache": False} if protocol in ("s3", "s3a") else {}
    return UPath(text.rstrip("/"), **options)


def _is_upath(value: Any) -> bool:
    return type(value).__module__.startswith("upath")


def is_remote(loc: Location) -> bool:
    """Whether ``loc`` is on an object store (no rename, no flock, no fsync)."""
    return _is_upath(loc) and getattr(loc, "protocol", "") not in ("", *LOCAL_PROTOCOLS)


def write_bytes(loc: Location, data: bytes) -> None:
    """Write a whole file: atomically and durably on a local disk (temporary file, fsync,
    rename), as one PUT on an object store."""
    if is_remote(loc):
        loc.fs.pipe_file(loc.path, data)
    else:
        atomic_write_bytes(loc, data)


def write_text(loc: Location, text: str) -> None:
    write_bytes(loc, text.encode())


def create_exclusive(loc: Location, data: bytes) -> bool:
    """Create ``loc`` holding ``data`` only if nothing is there yet. Returns whether this call
    created it. Local: ``O_CREAT | O_EXCL``; object store: a conditional write
    (``If-None-Match: *`` on S3), which fails if the key exists, however many race for it."""
    if is_remote(loc):
        try:
            loc.fs.pipe_file(loc.path, data, mode="create")
        except FileExistsError:
            return False
        except OSError as exc:  # 409 ConditionalRequestConflict: a concurrent conditional write
            if _error_code(exc) in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        return True
    loc.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(loc, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def _error_code(exc: BaseException) -> str:
    """The S3 error code behind an exception s3fs translated (its cause is botocore's)."""
    response = getattr(exc.__cause__, "response", None) or getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def parquet_bytes(table) -> bytes:
    """A table as the bytes of one Parquet file (written whole, so also hashed whole)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def read_table(loc: Location):
    import pyarrow.parquet as pq

    if is_remote(loc):
        return pq.read_table(io.BytesIO(loc.read_bytes()))
    return pq.read_table(loc)


def sha256(loc: Location) -> str:
    if is_remote(loc):
        return hashlib.sha256(loc.read_bytes()).hexdigest()
    return sha256_file(loc)


def remove_tree(loc: Location) -> None:
    """Delete a folder (local) or every object under a prefix (object store)."""
    import shutil

    if is_remote(loc):
        if files(loc):
            loc.fs.rm(loc.path, recursive=True)
        # s3fs deletes in quiet batches that report no failure (e.g. no s3:DeleteObject)
        left = files(loc)
        if left:
            raise PermissionError(f"could not delete {len(left)} objects under {loc} (e.g. "
                                  f"{next(iter(left))}); deleting needs s3:DeleteObject")
    else:
        shutil.rmtree(loc, ignore_errors=True)


def remove_file(loc: Location) -> None:
    if is_remote(loc):
        with contextlib.suppress(FileNotFoundError):
            loc.fs.rm_file(loc.path)
    else:
        Path(loc).unlink(missing_ok=True)


def files(loc: Location) -> dict[str, int]:
    """Every file under ``loc``, by path relative to it, with its size in bytes."""
    if is_remote(loc):
        found = loc.fs.find(loc.path, detail=True)
        base = loc.path.rstrip("/") + "/"
        return {name[len(base):]: int(info.get("size") or 0) for name, info in found.items()
                if name.startswith(base) and info.get("type", "file") == "file"}
    root = Path(loc)
    if not root.is_dir():
        return {}
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def zarr_store(loc: Location, read_only: bool):
    """The Zarr store of the group at ``loc``: a local directory, or zarr's fsspec store."""
    if not is_remote(loc):
        return str(loc)
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(str(loc), storage_options=dict(loc.storage_options),
                                read_only=read_only)


def check_reachable(loc: Location, key: str = "cache") -> None:
    """For an object store: the bucket exists and the credentials work, checked with one
    listing before anything is written (a local folder is checked by paths.check_writable)."""
    if not is_remote(loc):
        return
    if loc.protocol not in BUCKETED:
        return
    bucket, _, prefix = loc.path.partition("/")
    with storage_errors(loc, key):
        try:
            if hasattr(loc.fs, "call_s3"):  # one key of the location's own prefix: a policy may
                loc.fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)  # allow no more
            else:
                loc.fs.ls(bucket, detail=False)  # signed: bad credentials fail here too
        except FileNotFoundError:
            raise FileNotFoundError(f"bucket {bucket} does not exist") from None


def describe_error(exc: BaseException, loc: Location | None = None, key: str = "cache") -> str | None:
    """One line for a storage failure at ``loc`` (None: somewhere on an object store), or None
    if ``exc`` is not one."""
    name = type(exc).__name__
    remote = loc is None or is_remote(loc)
    protocol = getattr(loc, "protocol", "s3") if loc is not None else "s3"
    where = f"{key}={loc}" if loc is not None else "object store"
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    at = f" at {endpoint}" if endpoint and remote and protocol in ("s3", "s3a") else ""
    text = str(exc).splitlines()[0][:160] if str(exc) else name
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                "DefaultCredentialsError"):
        return (f"{where}: no credentials for {protocol}://; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for s3, GOOGLE_APPLICATION_CREDENTIALS for gs")
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError",
                "ClientConnectorError", "ServerDisconnectedError"):
        # (not botocore's text: it holds the request's URL, query and all)
        return f"{where}: cannot reach the object store{at} ({name}); check AWS_ENDPOINT_URL and the network"
    if loc is None:  # only errors that cannot come from a local disk
        return (f"object store: {text}; check the bucket name" if "specified bucket does not exist"
                in text else None)
    if not remote or (isinstance(exc, OSError) and exc.filename is not None):
        return None  # a local file's error (they name their file; the object store's do not)
    if isinstance(exc, FileNotFoundError) and "bucket" in text.lower():
        bucket = loc.path.split("/", 1)[0] if loc is not None else "?"
        return f"{where}: bucket {bucket} does not exist{at}; create it first or fix the URL"
    if isinstance(exc, PermissionError) or name in ("AccessDenied", "InvalidAccessKeyId",
                                                    "SignatureDoesNotMatch"):
        return f"{where}: access denied{at} ({text}); check the credentials and the bucket's permissions"
    if isinstance(exc, OSError) or name in ("ClientError", "BotoCoreError"):
        return f"{where}: the object store failed{at} ({name}: {text})"
    return None


@contextlib.contextmanager
def storage_errors(loc: Location, key: str = "cache") -> Iterator[None]:
    """Turn a storage failure inside the block into one line (:class:`KdError`); other
    exceptions pass through untouched."""
    try:
        yield
    except KdError:
        raise
    except Exception as exc:
        text = describe_error(exc, loc, key)
        if text is None:
            raise
        raise KdError(text) from None
