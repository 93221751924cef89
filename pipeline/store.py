"""One store URL (a local folder or s3://bucket/prefix) behind fsspec, with whole-file puts.

Every file is written in a single put: local files go to a temporary name in the same
folder and are renamed into place, S3 objects are uploaded in one request (or one
multipart upload). A reader therefore sees a file whole or not at all, and a retried work
unit overwrites its file instead of duplicating it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """A file in the store is missing, unreadable or corrupt."""


def storage_options(url: str, storage: Any | None) -> dict[str, Any]:
    """Return fsspec options for a store URL; credentials stay in the environment."""
    if not url.startswith("s3://") or storage is None:
        return {}
    options: dict[str, Any] = {}
    endpoint = storage.get("endpoint_url") if hasattr(storage, "get") else None
    region = storage.get("region") if hasattr(storage, "get") else None
    if endpoint:
        options["endpoint_url"] = endpoint
        # botocore's default checksums break some S3-compatible stores.
        options["config_kwargs"] = {
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
        }
    if region:
        options.setdefault("client_kwargs", {})["region_name"] = region
    if storage.get("anon"):
        options["anon"] = True
    return options


class Store:
    """Files of one store, addressed by paths relative to the store root."""

    def __init__(self, url: str, storage: Any | None = None) -> None:
        self.url = url.rstrip("/")
        self.storage = dict(storage) if storage is not None else {}
        self.options = storage_options(self.url, self.storage)
        self.fs, root = fsspec.core.url_to_fs(self.url, **self.options)
        self.root = root.rstrip("/")
        self.is_local = (
            self.fs.protocol in ("file", ("file", "local")) or "file" in self.fs.protocol
        )
        if self.is_local:
            self.root = os.path.abspath(self.root)

    def spec(self) -> dict[str, Any]:
        """Return what a Ray worker needs to open the same store (no credentials)."""
        return {"url": self.url, "storage": self.storage}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Store:
        return cls(spec["url"], spec["storage"])

    def path(self, relative: str) -> str:
        return f"{self.root}/{relative}" if relative else self.root

    def display(self, relative: str = "") -> str:
        """Return a URL for messages and for pandas.read_parquet."""
        if self.is_local:
            return self.path(relative)
        return f"{self.url}/{relative}" if relative else self.url

    def exists(self, relative: str) -> bool:
        return self.fs.exists(self.path(relative))

    def list(self, prefix: str, suffix: str = "") -> list[str]:
        """Return the relative paths of files under `prefix` ending in `suffix`, sorted."""
        base = self.path(prefix)
        if not self.fs.exists(base):
            return []
        found = self.fs.find(base)
        relative = []
        for item in found:
            name = item[len(self.root) + 1 :] if item.startswith(self.root) else item
            if name.endswith(suffix) and ".tmp-" not in name:
                relative.append(name)
        return sorted(relative)

    def write_bytes(self, relative: str, data: bytes) -> None:
        target = self.path(relative)
        if self.is_local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            temporary = f"{target}.tmp-{uuid.uuid4().hex}"
            with open(temporary, "wb") as handle:
                handle.write(data)
            os.replace(temporary, target)
        else:
            self.fs.pipe_file(target, data)

    def read_bytes(self, relative: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(relative))
        except FileNotFoundError as error:
            raise StoreError(f"file {self.display(relative)} not found") from error

    def write_json(self, relative: str, value: Any) -> None:
        self.write_bytes(relative, json.dumps(value, indent=2, sort_keys=True).encode())

    def read_json(self, relative: str) -> Any:
        data = self.read_bytes(relative)
        try:
            return json.loads(data)
        except json.JSONDecodeError as error:
            raise StoreError(f"file {self.display(relative)} is not valid JSON: {error}") from error

    def write_table(self, relative: str, table: pa.Table) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        self.write_bytes(relative, buffer.getvalue())

    def read_table(self, relative: str, columns: list[str] | None = None) -> pa.Table:
        data = self.read_bytes(relative)
        try:
            return pq.read_table(io.BytesIO(data), columns=columns)
        except (pa.ArrowInvalid, OSError) as error:
            raise StoreError(
                f"Parquet file {self.display(relative)} is corrupt or truncated ({error}); "
                "delete it and re-run the stage that writes it"
            ) from error

    def read_metadata(self, relative: str) -> dict[bytes, bytes]:
        """Return the key-value metadata of a Parquet file's schema."""
        data = self.read_bytes(relative)
        try:
            schema = pq.read_schema(io.BytesIO(data))
        except (pa.ArrowInvalid, OSError) as error:
            raise StoreError(
                f"Parquet file {self.display(relative)} is corrupt or truncated ({error})"
            ) from error
        return schema.metadata or {}

    def delete(self, relative: str, recursive: bool = False) -> None:
        target = self.path(relative)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=recursive)
