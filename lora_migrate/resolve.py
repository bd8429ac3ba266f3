"""Sources on the Hugging Face Hub: ``hf://org/name[@revision]`` → a local snapshot folder.

Sources are resolved with :func:`huggingface_hub.snapshot_download`, so ``HF_HUB_OFFLINE=1`` reads the local cache
and nothing else. Error messages mask the token (``HF_TOKEN``, the saved login) wherever it would appear.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import HubError, LoraMigrateError

HF_PREFIX = "hf://"
REPO_RX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_hub_ref(src) -> bool:
    return isinstance(src, str) and src.startswith(HF_PREFIX)


def parse_hub_ref(src: str) -> tuple[str, str | None]:
    """``hf://org/name@rev`` → ``("org/name", "rev")``; a one-line error for anything else."""
    body = src[len(HF_PREFIX):]
    repo_id, _, rev = body.partition("@")
    if not REPO_RX.match(repo_id) or ".." in repo_id or (body.count("@") and not rev):
        raise LoraMigrateError(f"{src}: expected hf://org/name or hf://org/name@revision")
    return repo_id, rev or None


def resolve_source(src):
    """A local path as is; an ``hf://`` id → the snapshot folder in the Hugging Face cache (downloaded if needed
    and allowed)."""
    if not is_hub_ref(src):
        return src
    repo_id, rev = parse_hub_ref(src)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        return Path(snapshot_download(repo_id, revision=rev))
    except LocalEntryNotFoundError:
        how = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        raise LoraMigrateError(f"{src}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and {how}; "
                               "download it first or unset HF_HUB_OFFLINE") from None
    except RevisionNotFoundError:
        raise LoraMigrateError(f"{src}: revision {rev!r} not found") from None
    except GatedRepoError:
        raise LoraMigrateError(f"{src}: gated repository; accept its terms and log in") from None
    except RepositoryNotFoundError:
        raise LoraMigrateError(f"{src}: repository not found (or private and no valid token)") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise HubError(f"{src}: cannot download: {mask_token(first_line(e))}") from None


def first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def mask_token(text: str) -> str:
    """``text`` with the token, wherever huggingface_hub would find it, masked: no message carries it; nor a URL's
    query (an upload URL is pre-signed: its query is a credential)."""
    try:
        from huggingface_hub import get_token

        tok = get_token()
    except Exception:  # noqa: BLE001 - masking must never fail
        tok = None
    if tok:
        text = text.replace(tok, "***")
    text = re.sub(r"(https?://[^\s?#]+)\?[^\s#]*", r"\1?…", text)
    return re.sub(r"hf_[A-Za-z0-9]{20,}", "hf_***", text)
