"""Offline-aware Hub access: ask once whether the Hugging Face Hub answers, and if not, go offline.

Without this, a Hub id that is not cached costs ~50 s of huggingface_hub / datasets retries before
the error (and a cached one the same before it loads). `offline_unless_reachable()` is called where a
name turns out not to be a local folder or file; the first call probes the endpoint once (one HEAD
request, PROBE_TIMEOUT_S), and when nothing answers it sets offline mode for the whole process
(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, and the copies huggingface_hub, transformers and datasets read
at import), so the cache is still used and a miss fails at once. It does nothing when the user set
HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE) either way. Imports nothing heavy.
"""

from __future__ import annotations

import logging
import os
import sys
import urllib.error
import urllib.request

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0
DEFAULT_ENDPOINT = "https://huggingface.co"
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUE = {"1", "ON", "YES", "TRUE"}   # huggingface_hub's and datasets' spelling of true

# The environment variables, as modules already imported copied them (transformers' is what its
# is_offline_mode() returns).
_IMPORTED_COPIES = (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("transformers.utils.hub", "_is_offline_mode"),
                    ("datasets.config", "HF_HUB_OFFLINE"), ("datasets.config", "HF_DATASETS_OFFLINE"))

_probed: bool | None = None          # the answer of the one probe of this process (None: not asked yet)


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or DEFAULT_ENDPOINT


def is_offline() -> bool:
    """True when offline mode is on (set by the user, or by a failed probe of this process)."""
    return any(os.environ.get(v, "").strip().upper() in _TRUE for v in OFFLINE_VARS)


def hub_answers(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True when an HTTP server answers `url` (any status below 500: a 401 or 404 is an answer)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError as e:   # an answer, though not a 2xx one
        return e.code < 500
    except (OSError, ValueError):         # URLError, refused, DNS, timeout; ValueError: a malformed endpoint
        return False


def offline_unless_reachable() -> bool:
    """Probe the Hub once per process (unless the user chose online or offline); go offline when it does
    not answer. Returns True when offline mode is on afterwards."""
    global _probed
    if any(v in os.environ for v in OFFLINE_VARS):   # the user's choice, whichever way
        return is_offline()
    if _probed is None:
        _probed = hub_answers(endpoint())
        if not _probed:
            set_offline()
            log.info("the Hugging Face Hub (%s) does not answer: offline mode (HF_HUB_OFFLINE=1), only files "
                     "in the local cache are used", endpoint())
    return is_offline()


def offline_reason() -> str:
    """Why Hub files cannot be fetched now, for an error message."""
    if _probed is False:
        return f"the Hugging Face Hub ({endpoint()}) did not answer, so memcirc ran offline"
    if is_offline():
        return "offline mode is on (HF_HUB_OFFLINE=1)"
    return "the Hugging Face Hub could not be reached"


def set_offline() -> None:
    """Offline mode for this process and its children, also in the modules that read it at import."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[name] = "1"
    for module, attribute in _IMPORTED_COPIES:
        if (imported := sys.modules.get(module)) is not None:
            setattr(imported, attribute, True)
    if (reset := getattr(sys.modules.get("huggingface_hub.utils._http"), "reset_sessions", None)) is not None:
        reset()   # sessions made before now have online adapters mounted


def reset_probe() -> None:
    """Forget this process's probe (tests)."""
    global _probed
    _probed = None
