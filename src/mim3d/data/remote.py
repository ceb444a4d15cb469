"""Store files on a local disk or behind any fsspec URL (``s3://``, ``gs://``, ``https://``...).

A remote store is read through fsspec with the backend's usual credentials (for S3: the
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_ENDPOINT_URL`` variables or
``~/.aws``). ``store.json`` and the manifest are fetched at every open; a case's array files are
downloaded once, on first use, into a local cache keyed by the case's content hash
(``$MIM3D_CACHE``, default ``~/.cache/mim3d/stores``), and crops are then read from there by the
same code as a local store: the crops are the same by construction.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

__all__ = ["StoreFiles", "cache_root", "is_remote"]


def is_remote(location: str | Path) -> bool:
    """True for an fsspec URL other than a plain local path (``file://`` counts as local)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def cache_root() -> Path:
    """Folder of the remote-store cache (``$MIM3D_CACHE`` or ``~/.cache/mim3d/stores``)."""
    env = os.environ.get("MIM3D_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mim3d" / "stores"


class StoreFiles:
    """Local paths of a store's files, downloading remote ones into the cache when needed.

    Args:
        location: a folder, or an fsspec URL of one.
        storage_options: extra fsspec options (e.g. ``{"anon": True}``).

    The fsspec file system is created lazily in each process (not pickled), so the object can
    go to forked or spawned DataLoader workers.
    """

    def __init__(self, location: str | Path, storage_options: dict[str, Any] | None = None) -> None:
        text = str(location)
        self.remote = is_remote(text)
        self.location = text.rstrip("/") if self.remote else str(Path(text.removeprefix("file://")))
        self.storage_options = dict(storage_options or {})
        self._fs: Any = None
        key = hashlib.sha1(self.location.encode("utf-8")).hexdigest()[:16]
        self.cache = cache_root() / key if self.remote else Path(self.location)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fs"] = None
        return state

    def _filesystem(self) -> tuple[Any, str]:
        import fsspec

        if self._fs is None:
            try:
                # A fresh instance: fsspec's cache would keep an old endpoint or credentials.
                self._fs, self._root = fsspec.core.url_to_fs(
                    self.location, skip_instance_cache=True, **self.storage_options)
            except ImportError as err:
                raise ValueError(f"{self.location}: reading this kind of URL needs an extra "
                                 f"package ({err}); for s3:// install 'mim3d[s3]'") from None
        return self._fs, self._root

    def path(self, rel: str, *, version: str = "", refresh: bool = False) -> Path:
        """Local path of the store file ``rel`` (e.g. ``cases/a/image.b2nd``).

        Args:
            rel: path inside the store, with ``/`` separators.
            version: a content tag (the case hash) that keys the cached copy, so a re-prepared
                case is fetched again instead of served stale.
            refresh: fetch again even if cached (store.json and the manifest).

        Raises:
            ValueError: (one line) the remote store cannot be reached or lacks the file.
        """
        if not self.remote:
            return Path(self.location) / rel
        local = self.cache / (f"{rel}.{version}" if version else rel)
        if local.is_file() and not refresh:
            return local
        fs, root = self._filesystem()
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f"{local.name}.part{os.getpid()}")
        try:
            fs.get_file(f"{root}/{rel}", str(tmp))
        except FileNotFoundError:
            tmp.unlink(missing_ok=True)
            raise
        except Exception as err:  # noqa: BLE001 - network, auth and backend errors differ by fs
            tmp.unlink(missing_ok=True)
            raise ValueError(f"{self.location}: cannot read {rel} ({type(err).__name__}: "
                             f"{' '.join(str(err).split())[:200]}); check the URL, the network "
                             "and the credentials") from None
        os.replace(tmp, local)
        return local
