"""Finding the weights of the metrics' feature models without ever hanging offline.

A weight file is looked up, in order: the configured local path (if one is set, it is the only
place looked at), then the download cache (``metrics.cache_dir``, default
``torch.hub.get_dir()/checkpoints`` - where torch.hub, torch-fidelity and torchmetrics put
their downloads). Only then, and only when downloads are allowed, is the public URL fetched,
after a reachability probe bounded by ``metrics.download_timeout`` seconds.

Downloads are allowed with ``metrics.download: true``, never with ``false``, and with ``auto``
unless one of ``UNLEARN_OFFLINE``, ``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE`` is set to a
true value. A metric whose weights cannot be found raises :class:`WeightsUnavailable`, whose
message names the config key and file that would provide them; the suite turns it into one
warning per metric and process and a ``{"status": "missing"}`` result.
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

logger = logging.getLogger("unlearn.metrics")

OFFLINE_ENV = ("UNLEARN_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")

_WARNED: set[str] = set()


class WeightsUnavailable(RuntimeError):
    """The weights of a metric's feature model are not available; the message says how to provide them."""


def warn_missing(metric: str, reason: str) -> bool:
    """Log one warning per metric and process; returns whether it was logged now."""
    if metric in _WARNED:
        return False
    _WARNED.add(metric)
    logger.warning("metric '%s' is skipped and marked missing: %s", metric, reason)
    return True


def reset_warnings() -> None:
    """Forget which metrics were warned about (tests)."""
    _WARNED.clear()


def _truthy(v: str | None) -> bool:
    return v is not None and v.strip().lower() not in ("", "0", "false", "no", "off")


def offline_env() -> str | None:
    """The first offline environment variable that is set to a true value, or None."""
    return next((k for k in OFFLINE_ENV if _truthy(os.environ.get(k))), None)


def download_allowed(setting) -> tuple[bool, str]:
    """``(allowed, why)`` for ``metrics.download`` in ``auto | true | false``."""
    s = str(setting).strip().lower()
    if s in ("false", "0", "no", "off", "none"):
        return False, "metrics.download=false"
    if s in ("true", "1", "yes", "on"):
        return True, "metrics.download=true"
    env = offline_env()
    if env:
        return False, f"{env} is set (metrics.download=auto)"
    return True, "metrics.download=auto"


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir:
        return Path(os.path.expanduser(str(cache_dir)))
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def reachable(url: str, timeout: float) -> tuple[bool, str]:
    """Whether ``url``'s host accepts a TCP connection within ``timeout`` seconds (DNS included).

    Runs in a daemon thread so that a stuck DNS lookup cannot block the caller longer.
    """
    u = urlparse(url)
    host, port = u.hostname, u.port or (443 if u.scheme == "https" else 80)
    if not host:
        return False, f"bad URL {url!r}"
    out: dict = {}

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            out["ok"] = True
        except OSError as e:  # DNS failure, refused, unreachable, timeout
            out["err"] = f"{type(e).__name__}: {e}"

    th = threading.Thread(target=probe, daemon=True)
    th.start()
    th.join(timeout)
    if out.get("ok"):
        return True, ""
    return False, out.get("err", f"no answer from {host}:{port} within {timeout:g} s")


def download(url: str, dst: Path, timeout: float) -> Path:
    """Fetch ``url`` to ``dst`` (torch.hub's downloader), after a bounded reachability probe."""
    ok, err = reachable(url, timeout)
    if not ok:
        raise OSError(f"{url} is not reachable ({err})")
    import torch

    dst.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s to %s", url, dst)
    torch.hub.download_url_to_file(url, str(dst), progress=False)
    return dst


def resolve_weights(metric: str, *, path, path_key: str, filename: str, url: str | None, cache_dir=None,
                    download_setting="auto", timeout: float = 20.0) -> tuple[Path, str]:
    """The local file holding a metric's weights and where it came from (``config``, ``cache``, ``download``).

    Raises :class:`WeightsUnavailable` with a message that says how to provide the file.
    """
    if path:
        p = Path(os.path.expanduser(str(path)))
        if p.is_file():
            return p, "config"
        raise WeightsUnavailable(f"{path_key}={path} does not exist; point {path_key} at the {filename} file")
    cached = default_cache_dir(cache_dir) / filename
    if cached.is_file():
        return cached, "cache"
    hint = f"set {path_key}=/path/to/{filename} or put the file at {cached}"
    if url:
        allowed, why = download_allowed(download_setting)
        if not allowed:
            raise WeightsUnavailable(f"no local weights and downloads are off ({why}); {hint} (public URL: {url})")
        try:
            return download(url, cached, timeout), "download"
        except Exception as e:  # noqa: BLE001 - any failure means: not available
            raise WeightsUnavailable(f"download failed ({e}); {hint}") from None
    raise WeightsUnavailable(f"no local weights; {hint}")


@lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file (cached per path, size and modification time)."""
    st = os.stat(path)
    return _sha256(str(path), st.st_size, st.st_mtime)


def file_record(path: str | os.PathLike, source: str) -> dict:
    """What a protocol records about a weight file."""
    p = Path(path)
    return {"file": p.name, "path": str(p), "sha256": sha256(p), "bytes": p.stat().st_size, "source": source}
