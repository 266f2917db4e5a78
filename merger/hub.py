"""Upload a committed merge to the Hugging Face Hub (``--push-to-hub``).

The push runs only after OUT is validated and committed, so a failed upload never costs the
merge: the error says OUT is complete and gives the command that finishes the upload.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from .errors import HubPushError, OptionsError
from .options import MergeOptions

COMMIT_MESSAGE = "Upload merged model (merge-adapter)"
_TOKEN = re.compile(r"hf_[A-Za-z0-9]{30,}")  # a user access token: hf_ and 34 letters or digits


@dataclass(frozen=True)
class HubPush:
    """Where a merged folder went: the repo, the branch, the commit (and the pull request, with create_pr)."""

    repo_id: str
    revision: str
    commit_url: str
    pr_url: str | None = None

    def summary(self) -> str:
        return f"pushed to {self.repo_id}@{self.revision}: {self.pr_url or self.commit_url}"


def push_folder(folder: str | Path, options: MergeOptions, api=None) -> HubPush:
    """Upload ``folder`` to the model repo ``options.push_to_hub`` (created when missing, ``private`` if
    asked) on branch ``options.revision`` (created from main when missing) or as a pull request.

    ``api`` defaults to ``huggingface_hub.HfApi()``, which finds the token as huggingface_hub does
    (HF_TOKEN, then the cached login). Any failure raises HubPushError: one line saying the folder
    is complete and the exact command that retries the upload.
    """
    if not options.push_to_hub:
        raise OptionsError("push_folder: options.push_to_hub is not set; pass the repo id (owner/name) to push to")
    repo, branch = options.push_to_hub, options.revision
    try:
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi()
        # private=None leaves a new repo's visibility to the Hub's default (an organisation may make it private)
        api.create_repo(repo_id=repo, private=options.private or None, exist_ok=True, repo_type="model")
        if branch and branch != "main" and not branch.startswith("refs/pr/"):  # a PR ref exists or cannot be created
            api.create_branch(repo_id=repo, branch=branch, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=folder, repo_id=repo, repo_type="model", revision=branch,
                                 create_pr=options.create_pr, commit_message=COMMIT_MESSAGE)
    except Exception as exc:  # whatever failed (HTTP, auth, network, a file), the merge stands: say so
        raise HubPushError(_failure(exc, Path(folder), options)) from exc
    return HubPush(repo, branch or "main", str(info.commit_url), getattr(info, "pr_url", None))


def _failure(exc: Exception, folder: Path, options: MergeOptions) -> str:
    text = str(exc).strip()
    reason = _TOKEN.sub("hf_***", f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__)
    status = getattr(getattr(exc, "response", None), "status_code", None)
    owner = options.push_to_hub.split("/")[0]
    hint = f"; check that your token (HF_TOKEN or `hf auth login`) may write to {owner}" if status in (401, 403) else ""
    return (f"pushing {folder} to the Hub repo {options.push_to_hub} failed ({reason}){hint}; the merge itself is "
            f"complete and committed at {folder}: retry the upload with `{retry_command(folder, options)}`")


def retry_command(folder: Path, options: MergeOptions) -> str:
    """The huggingface_hub CLI command that uploads ``folder`` the way push_folder would have."""
    words = [_cli_name(), "upload", options.push_to_hub, str(folder)]
    if options.revision:
        words += ["--revision", options.revision]
    if options.create_pr:
        words.append("--create-pr")
    if options.private:
        words.append("--private")
    return shlex.join(words)


def _cli_name() -> str:
    """`hf` since huggingface_hub 0.34 (the only name from 1.0 on); `huggingface-cli` before."""
    try:
        import huggingface_hub
        from packaging.version import Version

        return "hf" if Version(huggingface_hub.__version__) >= Version("0.34") else "huggingface-cli"
    except Exception:  # no huggingface_hub at all: the current name
        return "hf"
