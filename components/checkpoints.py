"""Durable training checkpoints for the cluster: a local checkpoint directory mirrored to S3 (or a volume).

In a pod, ``checkpoints/`` lives in the container and dies with it, so a preempted or retried train
task would start again from epoch 1. :class:`CheckpointMirror` wraps the train step from the outside
(the training loop stays as it is): before the step it restores the directory from the durable copy,
while the step runs a thread uploads every checkpoint file the loop replaces, and on success it deletes
the durable copy (the trained model is the task's output; the checkpoints have served their purpose).

Where: :func:`checkpoint_location` keys the copy by ``<root>/<run id>/<product>/``. The run id is
KFP's run UUID, the same for every retry of a task within the run (pod retry, or "Retry run" in the
UI) and new for every new run, so a retry finds the checkpoints and a new run does not. The product
keeps the parallel train tasks of ``multi_product`` apart. ``root`` is ``s3://bucket/prefix`` (the
default in the cluster) or a directory (a mounted volume, or a local path for ``kfp.local``).

Only files the training loop writes atomically are mirrored (``tfanet_core.training`` replaces
``checkpoint.pt`` with ``os.replace``); hidden temporary files are skipped, so the copy is never a
half-written checkpoint. The loop's own fingerprint check still decides whether a restored checkpoint
belongs to this training.
"""

from __future__ import annotations

import logging
import shutil
import signal
import sys
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

__all__ = ["CheckpointMirror", "checkpoint_location"]

log = logging.getLogger(__name__)


def checkpoint_location(root: str, run_id: str, product: str) -> str:
    """``<root>/<run_id>/<product>``: where one run's train task of ``product`` keeps its checkpoints."""
    for name, value in (("root", root), ("run_id", run_id), ("product", product)):
        if not value or (name != "root" and ("/" in value or value in (".", ".."))):
            raise ValueError(f"checkpoint {name} must be a non-empty name, got {value!r}")
    if "{{" in run_id:
        raise ValueError(f"run_id {run_id!r} is an unresolved KFP placeholder: pass dsl.PIPELINE_JOB_ID_PLACEHOLDER")
    return f"{root.rstrip('/')}/{run_id}/{product}"


class CheckpointMirror:
    """Keep ``remote`` (``s3://...`` or a directory) a copy of the local checkpoint directory ``local``.

    A context manager: entering restores and starts the upload thread, leaving uploads what changed
    last and, when the block succeeded, deletes the remote copy. SIGTERM (Kubernetes' notice before
    a preemption kill) becomes ``SystemExit`` while inside, so the last checkpoint is uploaded then too.
    """

    def __init__(self, local: Path | str, remote: str, s3_endpoint: str = "", interval: float = 2.0) -> None:
        self.local = Path(local)
        self.remote = remote.rstrip("/")
        self.interval = interval
        self.restored: list[str] = []
        self._s3_endpoint = s3_endpoint
        self._client: Any = None
        self._seen: dict[str, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous_handler: Any = None

    # -- the durable side: S3 or a directory -------------------------------------------------------
    @property
    def _on_s3(self) -> bool:
        return self.remote.startswith("s3://")

    def _s3(self) -> tuple[Any, str, str]:
        from components.storage import parse_s3_uri, s3_for

        if self._client is None:
            self._client = s3_for(self._s3_endpoint)
        bucket, prefix = parse_s3_uri(self.remote)
        return self._client, bucket, prefix

    def _files(self) -> list[Path]:
        if not self.local.is_dir():
            return []
        return sorted(p for p in self.local.rglob("*") if p.is_file() and not p.name.startswith("."))

    def restore(self) -> list[str]:
        """Copy the remote checkpoints into ``local``; returns the relative paths restored (none: a fresh start)."""
        self.local.mkdir(parents=True, exist_ok=True)
        if self._on_s3:
            from components.storage import EmptyPrefixError, download_dir

            client, bucket, prefix = self._s3()
            try:
                files = download_dir(client, bucket, prefix, self.local, progress=False)
            except EmptyPrefixError:
                files = []
        else:
            source = Path(self.remote)
            files = []
            if source.is_dir():
                shutil.copytree(source, self.local, dirs_exist_ok=True)
                files = [self.local / p.relative_to(source) for p in source.rglob("*") if p.is_file()]
        self.restored = sorted(p.relative_to(self.local).as_posix() for p in files)
        for path in self._files():  # what was restored is already remote: not uploaded again
            stat = path.stat()
            self._seen[path.relative_to(self.local).as_posix()] = (stat.st_mtime_ns, stat.st_size)
        log.info("checkpoints %s: %s", self.remote, f"restored {self.restored}" if self.restored else "none")
        return self.restored

    def sync(self) -> list[str]:
        """Upload every local checkpoint file that changed since the last sync; returns their relative paths."""
        uploaded = []
        for path in self._files():
            rel = path.relative_to(self.local).as_posix()
            stat = path.stat()
            if self._seen.get(rel) == (stat.st_mtime_ns, stat.st_size):
                continue
            if self._on_s3:
                client, bucket, prefix = self._s3()
                client.upload_file(str(path), bucket, f"{prefix}/{rel}")
            else:
                target = Path(self.remote) / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.tmp")
                shutil.copy2(path, tmp)
                tmp.replace(target)  # the durable copy is replaced atomically too
            self._seen[rel] = (stat.st_mtime_ns, stat.st_size)
            uploaded.append(rel)
        return uploaded

    def clear(self) -> None:
        """Delete the remote copy (after a successful training)."""
        if self._on_s3:
            client, bucket, prefix = self._s3()
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
            for page in pages:
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
        else:
            shutil.rmtree(self.remote, ignore_errors=True)

    # -- while the step runs -----------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sync()
            except Exception as exc:  # a storage hiccup must not kill the training; the next round retries
                log.warning("checkpoint upload to %s failed (retrying): %s", self.remote, exc)

    @staticmethod
    def _terminate(signum: int, frame: FrameType | None) -> None:
        sys.exit(128 + signum)

    def __enter__(self) -> CheckpointMirror:
        self.restore()
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._terminate)
        self._thread = threading.Thread(target=self._loop, name="checkpoint-mirror", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
        if exc_type is None:
            self.clear()
            return
        try:
            self.sync()  # the last checkpoint before a failure or SIGTERM: what the retry resumes from
        except Exception as sync_error:  # keep the step's own error; the retry resumes from the previous upload
            log.warning("last checkpoint upload to %s failed: %s", self.remote, sync_error)
