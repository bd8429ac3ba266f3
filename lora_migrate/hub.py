"""``push``: convert, verify, then upload to the Hugging Face Hub (``hf://`` sources are resolved in resolve.py).

Uploads go through :class:`huggingface_hub.HfApi` (``create_repo`` + ``create_commit``) to
``HF_ENDPOINT``; the token comes from huggingface_hub's usual places (``HF_TOKEN``, the saved login) and is
never printed: every message that leaves this module has it masked (:func:`resolve.mask_token`).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from pydantic import BaseModel

from .errors import HubError, LoraMigrateError, VerificationFailed
from .resolve import REPO_RX, first_line, mask_token, resolve_source

CARD_BEGIN = "<!-- lora-migrate:begin -->"
CARD_END = "<!-- lora-migrate:end -->"


class PushedFile(BaseModel):
    path: str
    bytes: int


class PushResult(BaseModel):
    source: str
    repo_id: str
    revision: str | None
    source_convention: str
    target_convention: str
    checked_for: str  # the library versions the target convention describes
    dry_run: bool
    files: list[PushedFile]
    checks: dict[str, str]  # adapter → the numeric check's summary
    model_card_section: str
    commit_url: str | None
    convert: dict  # the ConvertResult as JSON (api.ConvertResult.model_validate() gives it back typed)


def _error_line(e: BaseException) -> str:
    """One line for a failed request: huggingface_hub's first line, and the server's own message when that line
    leaves it out (a storage 403 reads "403 Forbidden: None." before it)."""
    line = first_line(e)
    said = (getattr(e, "server_message", None) or "").strip().splitlines()
    if said and said[0].lower() not in line.lower():
        line = f"{line} {said[0]}" if line.endswith(":") else f"{line} ({said[0]})"
    return line


def card_section(result, target) -> str:
    """The model-card section: convention, library versions it was checked for, the numeric check's figures."""
    from . import __version__

    try:
        import torch

        tv = torch.__version__
    except ImportError:  # pragma: no cover
        tv = "?"
    lines = [CARD_BEGIN, "## LoRA convention (lora-migrate)", "",
             f"This adapter is in the **{target.name}** convention: {target.library} {target.versions} "
             f"(scaling: {target.scaling_notes}).", "",
             f"Checked for {target.library} {target.versions}: converted from {result.source_convention} "
             f"by lora-migrate {__version__} (torch {tv}), and every module's ΔW = s·B·A compared with the "
             "source's:", "",
             "| adapter | modules | r | alpha | max rel. error (Frobenius) | max rel. error (probes) | tolerance "
             "| result |",
             "|---|---|---|---|---|---|---|---|"]
    for a in result.adapters:
        v = a.verify
        lines.append(f"| {a.plan.adapter} | {a.plan.modules} | {a.plan.r} | {a.plan.alpha_out:g} "
                     f"| {v.max_rel_fro:.3g} | {v.max_rel_probe:.3g} "
                     f"| {v.tolerance:.2g} | {'OK' if v.ok else 'FAILED'} |")
    lines += ["", f"Load it with {target.library} {target.versions}.", CARD_END]
    return "\n".join(lines) + "\n"


def model_card(existing: str | None, section: str) -> str:
    """``existing`` (the source's README.md) with our section added, or replacing the one a previous push added."""
    if not existing:
        return ("---\ntags:\n- lora\n- lora-migrate\n---\n\n# LoRA adapter\n\n" + section)
    if CARD_BEGIN in existing and CARD_END in existing:
        head, _, rest = existing.partition(CARD_BEGIN)
        _, _, tail = rest.partition(CARD_END)
        return head + section.rstrip("\n") + tail
    return existing.rstrip("\n") + "\n\n" + section


def push(src, repo_id: str, *, to: str, from_: str | None = None, adapter: str | None = None,
         revision: str | None = None, private: bool | None = None, dry_run: bool = False,
         safetensors: bool = False, keep_head: bool = False, commit_message: str | None = None,
         initial_adapter=None, base_model=None, model_type: str | None = None, num_layers: int | None = None,
         allow_nonfinite: bool = False) -> PushResult:
    """Convert SRC to ``to``, check it, and upload the result with a model card to ``repo_id``.

    Raises :class:`VerificationFailed` (nothing uploaded) when the numeric check fails, and
    :class:`LoraMigrateError` for bad input or a refused upload.
    """
    from . import api
    from .codecs import codec_for
    from .schemas import get_convention

    if not REPO_RX.match(repo_id):
        raise LoraMigrateError(f"{repo_id}: expected a repo id org/name")
    target = get_convention(to)
    tmp = Path(tempfile.mkdtemp(prefix="lora-migrate-push-"))
    try:
        out = tmp / "upload"
        codec = codec_for(target)
        dest = codec.output_path(out, repo_id.rsplit("/", 1)[-1]) if codec.output == "file" else out
        try:
            result = api.convert(src, dest, to=to, from_=from_, adapter=adapter, safetensors=safetensors,
                                 keep_head=keep_head, initial_adapter=initial_adapter, base_model=base_model,
                                 model_type=model_type, num_layers=num_layers, allow_nonfinite=allow_nonfinite)
        except VerificationFailed as e:
            raise VerificationFailed(f"refusing to upload to {repo_id}: {e}", e.report, tail="nothing was uploaded") \
                from None
        section = card_section(result, target)
        local = Path(resolve_source(src))
        readme = local / "README.md" if local.is_dir() else None
        existing = readme.read_text(encoding="utf-8") if readme is not None and readme.is_file() else None
        (out / "README.md").write_text(model_card(existing, section), encoding="utf-8")
        files = sorted((PushedFile(path=p.relative_to(out).as_posix(), bytes=p.stat().st_size)
                        for p in out.rglob("*") if p.is_file()), key=lambda f: f.path)
        commit_url = None
        if not dry_run:
            commit_url = _upload(out, repo_id, revision, private, commit_message
                                 or f"lora-migrate: {result.source_convention} → {target.name}, checked")
        return PushResult(source=str(src), repo_id=repo_id, revision=revision,
                          source_convention=result.source_convention, target_convention=target.name,
                          checked_for=f"{target.library} {target.versions}", dry_run=dry_run, files=files,
                          checks={a.plan.adapter: a.verify.summary() for a in result.adapters},
                          model_card_section=section, commit_url=commit_url, convert=result.model_dump(mode="json"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _upload(folder: Path, repo_id: str, revision: str | None, private: bool | None, message: str) -> str:
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if constants.HF_HUB_OFFLINE:
        raise LoraMigrateError("HF_HUB_OFFLINE=1: cannot upload; unset it, or use --dry-run")
    if not get_token():
        raise LoraMigrateError("no Hugging Face token: set HF_TOKEN or run `hf auth login`; nothing was uploaded")
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    expected = (HfHubHTTPError, OfflineModeIsEnabled, OSError, ValueError)  # requests' errors are OSErrors
    hf = HfApi()
    # huggingface_hub draws a tqdm bar on stderr for each LFS file; off a terminal it is noise in a log, and the
    # error line would be glued to it
    quiet = not sys.stderr.isatty() and not are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        hf.create_repo(repo_id, private=private, exist_ok=True)
        info = hf.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision, commit_message=message)
    except expected as e:
        raise HubError(f"upload to {repo_id} failed: {mask_token(_error_line(e))}") from None
    except RuntimeError as e:
        # an LFS upload's HTTP error comes wrapped: RuntimeError("Error while uploading 'f' to the Hub.") from it
        # (huggingface_hub/_commit_api.py, _wrapped_lfs_upload); a server's answer, not a bug here
        if not isinstance(e.__cause__, expected):
            raise
        raise HubError(mask_token(f"upload to {repo_id} failed: {first_line(e).rstrip('.')}: "
                                     f"{_error_line(e.__cause__)}")) from None
    finally:
        if quiet:
            enable_progress_bars()
    return str(info.commit_url if hasattr(info, "commit_url") else info)
