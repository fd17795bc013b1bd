"""S3 access for tfanet: one boto3 client factory, bucket creation, directory upload and download.

boto3 is the only S3 client we use directly (DVC and the MLflow server bring their own), so
the endpoint and credential rules live in one place. Credentials are never stored here: they
come from the arguments or boto3's usual chain (environment, ``~/.aws``, an IAM role on a
cluster). A custom endpoint (SeaweedFS, MinIO) gets path-style addressing, which every
S3-compatible server understands, unlike virtual-host buckets on ``127.0.0.1``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError
from tqdm import tqdm

from tfanet_core.errors import ConfigError, TfanetError

__all__ = ["S3Settings", "download_dir", "ensure_bucket", "parse_s3_uri", "s3_client", "upload_dir"]

# Checked in this order: boto3's own service-specific variable, its global one, then MLflow's.
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")


@dataclass(frozen=True)
class S3Settings:
    """Where S3 is and who we are; ``None`` fields fall back to boto3's defaults (AWS, credential chain)."""

    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    region: str = "us-east-1"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> S3Settings:
        env = os.environ if env is None else env
        endpoint = next((env[v] for v in ENDPOINT_VARIABLES if env.get(v)), None)
        return cls(
            endpoint_url=endpoint,
            access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
            secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            region=env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or "us-east-1",
        )


class EmptyPrefixError(TfanetError):
    """Nothing is stored under an S3 prefix (a dataset never uploaded, or no checkpoint yet)."""


def s3_client(settings: S3Settings | None = None, **config: Any) -> Any:
    """A boto3 S3 client for ``settings`` (default: from the environment); ``config`` goes to botocore's Config."""
    settings = settings or S3Settings.from_env()
    options: dict[str, Any] = {"retries": {"mode": "standard", "max_attempts": 3}, **config}
    if settings.endpoint_url:
        options.setdefault("s3", {"addressing_style": "path"})
    return boto3.client(
        "s3",
        endpoint_url=settings.endpoint_url,
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=settings.secret_access_key,
        region_name=settings.region,
        config=Config(**options),
    )


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → ``("bucket", "some/prefix")``."""
    if not uri.startswith("s3://") or len(uri) <= len("s3://"):
        raise ConfigError(f"not an S3 URI: {uri!r}; expected s3://BUCKET[/PREFIX]")
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key.strip("/")


def ensure_bucket(client: Any, bucket: str) -> bool:
    """Create ``bucket`` unless it exists; True if it was created (idempotent, safe to call at every start)."""
    try:
        client.head_bucket(Bucket=bucket)
        return False
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise
    try:
        client.create_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise
        return False
    return True


def _join(prefix: str, rel: str) -> str:
    return f"{prefix.strip('/')}/{rel}" if prefix.strip("/") else rel


def upload_dir(client: Any, local_dir: Path | str, bucket: str, prefix: str = "", progress: bool = True) -> list[str]:
    """Upload every file under ``local_dir`` to ``bucket/prefix/<relative path>``; returns the keys written.

    Keys mirror the relative POSIX paths, so :func:`download_dir` restores the same tree.
    """
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise TfanetError(f"{local_dir}: no such directory to upload")
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    keys = []
    for path in tqdm(files, desc=f"upload s3://{bucket}/{prefix}", unit="file", disable=not progress, leave=False):
        key = _join(prefix, path.relative_to(local_dir).as_posix())
        client.upload_file(str(path), bucket, key)
        keys.append(key)
    return keys


def download_dir(client: Any, bucket: str, prefix: str, local_dir: Path | str, progress: bool = True) -> list[Path]:
    """Download every object under ``bucket/prefix/`` into ``local_dir`` (relative paths kept); returns the files.

    A key that would land outside ``local_dir`` (``..`` segments) is refused rather than written.
    """
    local_dir = Path(local_dir)
    base = prefix.strip("/")
    paginator = client.get_paginator("list_objects_v2")
    keys = [
        obj["Key"]
        for page in paginator.paginate(Bucket=bucket, Prefix=f"{base}/" if base else "")
        for obj in page.get("Contents", [])
        if not obj["Key"].endswith("/")
    ]
    if not keys:
        raise EmptyPrefixError(f"s3://{bucket}/{base}: no objects under this prefix")
    out = []
    for key in tqdm(keys, desc=f"download s3://{bucket}/{base}", unit="file", disable=not progress, leave=False):
        rel = PurePosixPath(key[len(base) :].lstrip("/") if base else key)
        if ".." in rel.parts or rel.is_absolute():
            raise ValueError(f"s3://{bucket}/{key}: refusing a key that escapes {local_dir}")
        target = local_dir.joinpath(*rel.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(target))
        out.append(target)
    return out


def s3_for(s3_endpoint: str) -> Any:
    """A boto3 S3 client: credentials from the environment (the mapped Secret), ``s3_endpoint`` if not empty."""
    settings = S3Settings.from_env()
    if s3_endpoint:
        settings = S3Settings(s3_endpoint, settings.access_key_id, settings.secret_access_key, settings.region)
    return s3_client(settings)
