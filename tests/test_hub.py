"""--push-to-hub: the validated, committed OUT is uploaded with huggingface_hub's HfApi.

Nothing here reaches the network: ``huggingface_hub.HfApi`` is replaced by ``FakeHub``, which
records every call (and what OUT held at upload time) and can fail at a chosen step the way the
Hub fails (HfHubHTTPError with a status, a dropped connection).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from merger import OptionsError, merge_adapter
from merger.cli import main
from merger.errors import HubPushError, IncompatibleError, ValidationFailedError
from merger.hub import COMMIT_MESSAGE, HubPush, push_folder
from merger.options import MergeOptions

from .test_bad_input import assert_one_line_error, nothing_written, run_cli

REPO = "me/llama-merged"
TOKEN = "hf_abcdefghijklmnopqrstuvwxyz012345"  # a made-up token: never shown in any message


def unauthorized(_step):
    from huggingface_hub.errors import HfHubHTTPError

    response = SimpleNamespace(status_code=401, headers={}, request=None)
    return HfHubHTTPError(f"401 Client Error: Unauthorized for url: https://huggingface.co/api/repos/create (token {TOKEN})\n\n"
                          "Invalid credentials in Authorization header", response=response)


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records calls; ``fail={step: make_exception}`` raises at that step."""

    def __init__(self, fail=None):
        self.calls, self.fail = [], fail or {}
        self.uploaded: dict[str, bytes] = {}  # OUT's files as the upload saw them
        self.token_seen = None

    def _call(self, step, **kwargs):
        self.calls.append((step, kwargs))
        if step in self.fail:
            raise self.fail[step](step)

    def create_repo(self, **kwargs):
        self._call("create_repo", **kwargs)

    def create_branch(self, **kwargs):
        self._call("create_branch", **kwargs)

    def upload_folder(self, **kwargs):
        self.token_seen = os.environ.get("HF_TOKEN")
        self.uploaded = {p.name: p.read_bytes() for p in Path(kwargs["folder_path"]).iterdir() if p.is_file()}
        self._call("upload_folder", **kwargs)
        repo = kwargs["repo_id"]
        if kwargs["create_pr"]:
            return SimpleNamespace(commit_url=f"https://huggingface.co/{repo}/commit/abc123",
                                   pr_url=f"https://huggingface.co/{repo}/discussions/7")
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo}/commit/abc123", pr_url=None)

    @property
    def steps(self):
        return [step for step, _ in self.calls]

    def kwargs(self, step):
        return next(kwargs for s, kwargs in self.calls if s == step)


@pytest.fixture
def hub(monkeypatch):
    """A FakeHub that every ``huggingface_hub.HfApi()`` in this test returns; ``hub.fail`` sets failures."""
    import huggingface_hub

    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *args, **kwargs: fake)
    return fake


def committed(out: Path) -> bool:
    names = {p.name for p in out.iterdir()}
    return {"model.safetensors", "config.json", "merge_report.json"} <= names and not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_cli_pushes_the_committed_out_with_every_option(demo_pair, tmp_path, capsys, hub):
    base, adapter = demo_pair
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "--base", base, "--adapter", adapter, "--out", out, "-q",
                                "--push-to-hub", REPO, "--private", "--revision", "merged", "--create-pr")
    assert code == 0, err
    assert hub.calls == [
        ("create_repo", {"repo_id": REPO, "private": True, "exist_ok": True, "repo_type": "model"}),
        ("create_branch", {"repo_id": REPO, "branch": "merged", "exist_ok": True, "repo_type": "model"}),
        ("upload_folder", {"folder_path": out, "repo_id": REPO, "repo_type": "model", "revision": "merged",
                           "create_pr": True, "commit_message": COMMIT_MESSAGE}),
    ]
    # what went up is the committed OUT, byte for byte, report included
    assert hub.uploaded == {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert committed(out)
    assert stdout.strip().endswith(f"; pushed to {REPO}@merged: https://huggingface.co/{REPO}/discussions/7")


def test_api_push_defaults_and_result(demo_pair, tmp_path, capsys, hub):
    from merger.render import result_dict

    base, adapter = demo_pair
    out = tmp_path / "out"
    result = merge_adapter(base, adapter, out, push_to_hub=REPO)
    # no --private: the Hub's default visibility (private=None); no --revision: main, no branch to create
    assert hub.calls == [
        ("create_repo", {"repo_id": REPO, "private": None, "exist_ok": True, "repo_type": "model"}),
        ("upload_folder", {"folder_path": out, "repo_id": REPO, "repo_type": "model", "revision": None,
                           "create_pr": False, "commit_message": COMMIT_MESSAGE}),
    ]
    assert result.hub == HubPush(REPO, "main", f"https://huggingface.co/{REPO}/commit/abc123", None)
    assert result_dict(result)["hub"] == {"repo_id": REPO, "revision": "main",
                                          "commit_url": f"https://huggingface.co/{REPO}/commit/abc123", "pr_url": None}
    assert result.summary().endswith(f"; pushed to {REPO}@main: https://huggingface.co/{REPO}/commit/abc123")


def test_json_result_carries_the_push(demo_pair, tmp_path, capsys, hub):
    base, adapter = demo_pair
    code, stdout, err = run_cli(capsys, "--base", base, "--adapter", adapter, "--out", tmp_path / "out", "--json",
                                "--push-to-hub", REPO)
    assert code == 0, err
    assert json.loads(stdout)["hub"]["commit_url"] == f"https://huggingface.co/{REPO}/commit/abc123"


def test_without_push_to_hub_nothing_is_pushed(demo_pair, tmp_path, hub):
    result = merge_adapter(*demo_pair, tmp_path / "out")
    assert hub.calls == [] and result.hub is None
    assert "pushed" not in result.summary()


@pytest.mark.parametrize("existing_pr", ["main", "refs/pr/3"])
def test_no_branch_is_created_for_main_or_a_pr_ref(tmp_path, existing_pr):
    fake = FakeHub()
    (tmp_path / "model.safetensors").write_bytes(b"x")
    push_folder(tmp_path, MergeOptions(push_to_hub=REPO, revision=existing_pr), api=fake)
    assert fake.steps == ["create_repo", "upload_folder"]
    assert fake.kwargs("upload_folder")["revision"] == existing_pr


def test_nothing_is_pushed_when_validation_fails(demo_pair, tmp_path, monkeypatch, hub):
    import merger.api

    real = merger.api.validate_output

    def failing(folder, plan, mode):
        report = real(folder, plan, mode)
        report.fail("new-rows-lost", "new-token rows were lost (on purpose)")
        return report

    monkeypatch.setattr(merger.api, "validate_output", failing)
    out = tmp_path / "out"
    with pytest.raises(ValidationFailedError):
        merge_adapter(*demo_pair, out, push_to_hub=REPO)
    assert hub.calls == []
    nothing_written(out)


def test_nothing_is_pushed_when_the_merge_is_refused(copies, tmp_path, capsys, hub):
    base, adapter = copies
    config = json.loads((base / "config.json").read_text())
    config["hidden_size"] = 48  # the adapter's LoRA pairs no longer fit
    (base / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--base", base, "--adapter", adapter, "--out", out, "--push-to-hub", REPO)
    assert code == 2 and "error: " in err
    assert hub.calls == []
    nothing_written(out)
    with pytest.raises(IncompatibleError):
        merge_adapter(base, adapter, out, push_to_hub=REPO)
    assert hub.calls == []


def test_nothing_is_pushed_when_out_is_taken(demo_pair, tmp_path, capsys, hub):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, err = run_cli(capsys, "--base", demo_pair[0], "--adapter", demo_pair[1], "--out", out, "--push-to-hub", REPO)
    assert_one_line_error(code, err, "exists and is not empty")
    assert hub.calls == [] and [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("step, make_error, reason", [
    ("create_repo", unauthorized, "(HfHubHTTPError: 401 Client Error: Unauthorized for url: https://huggingface.co/api/repos/create "
                                  "(token hf_***)); check that your token (HF_TOKEN or `hf auth login`) may write to me;"),
    ("create_branch", lambda _: OSError("404 branch base not found"), "(OSError: 404 branch base not found);"),
    ("upload_folder", lambda _: ConnectionError("Connection reset by peer"), "(ConnectionError: Connection reset by peer);"),
])
def test_a_hub_failure_is_one_line_exit_2_and_out_stays_committed(demo_pair, tmp_path, capsys, monkeypatch, hub,
                                                                  step, make_error, reason):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.fail = {step: make_error}
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "--base", demo_pair[0], "--adapter", demo_pair[1], "--out", out,
                                "--push-to-hub", REPO, "--revision", "v1", "--json")
    assert_one_line_error(code, err, f"error: pushing {out} to the Hub repo {REPO} failed {reason}",
                          f"the merge itself is complete and committed at {out}: "
                          f"retry the upload with `hf upload {REPO} {out} --revision v1`")
    assert err.strip().endswith("--revision v1`")
    assert TOKEN not in err + stdout
    assert json.loads(stdout) == {"ok": False, "exit_code": 2, "error": err.strip().removeprefix("error: ")}
    assert committed(out)
    assert json.loads((out / "merge_report.json").read_text())["validation"]["ok"] is True


def test_retry_command_quotes_the_folder_and_repeats_the_options(tmp_path):
    folder = tmp_path / "my merged"
    folder.mkdir()
    fake = FakeHub(fail={"create_repo": lambda _: TimeoutError("timed out")})
    with pytest.raises(HubPushError) as caught:
        push_folder(folder, MergeOptions(push_to_hub=REPO, private=True, create_pr=True), api=fake)
    assert str(caught.value).endswith(f"retry the upload with `hf upload {REPO} '{folder}' --create-pr --private`")
    assert caught.value.exit_code == 2 and isinstance(caught.value, ConnectionError)


@pytest.mark.parametrize("args, fragments", [
    (["--private"], ["option private: only applies to a push to the Hub; add --push-to-hub OWNER/NAME or drop --private"]),
    (["--revision", "v1"], ["option revision: only applies to a push to the Hub", "drop --revision"]),
    (["--create-pr"], ["option create_pr: only applies to a push to the Hub", "drop --create-pr"]),
    (["--push-to-hub", "llama-merged"], ["option push_to_hub: 'llama-merged' is not a Hub repo id; expected owner/name"]),
    (["--push-to-hub", "me/a/b"], ["option push_to_hub: 'me/a/b' is not a Hub repo id"]),
    (["--push-to-hub", "me/bad--name"], ["option push_to_hub: 'me/bad--name' is not a Hub repo id"]),
    (["--push-to-hub", REPO, "--revision", "my branch"], ["option revision: 'my branch' is not a branch name"]),
])
def test_bad_push_options_are_one_line_and_nothing_is_written(demo_pair, tmp_path, capsys, hub, args, fragments):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--base", demo_pair[0], "--adapter", demo_pair[1], "--out", out, *args)
    assert_one_line_error(code, err, *fragments)
    nothing_written(out)
    assert hub.calls == []


def test_bad_push_options_in_python_and_config_files(tmp_path):
    with pytest.raises(OptionsError, match=r"^option private: only applies to a push to the Hub"):
        MergeOptions(private=True)
    config = tmp_path / "push.yaml"
    config.write_text(f"push_to_hub: {REPO}\nprivate: true\nrevision: merged\n")
    from merger.options import load_config_file

    options = MergeOptions.from_mapping(load_config_file(config))
    assert (options.push_to_hub, options.private, options.revision, options.create_pr) == (REPO, True, "merged", False)


@pytest.mark.parametrize("command", ["inspect", "validate"])
def test_inspect_and_validate_do_not_offer_push_flags(demo_pair, tmp_path, capsys, command):
    target = [str(tmp_path)] if command == "validate" else []
    with pytest.raises(SystemExit) as stop:  # argparse's own exit, with the one-line message
        main([command, *target, "--base", str(demo_pair[0]), "--adapter", str(demo_pair[1]), "--push-to-hub", REPO])
    assert_one_line_error(stop.value.code, capsys.readouterr().err, "unrecognized arguments: --push-to-hub")


# the hook ---------------------------------------------------------------------------------------

def peft_model(base: Path):
    """A small LoRA fine-tune of the demo base (no vocabulary change), standing in for training."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], base_model_name_or_path=str(base)))
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param) * 0.05)
    return model


def train_end(callback, model, output_dir):
    """The hook called the way transformers' CallbackHandler calls it at the end of training."""
    control = object()
    args, state = SimpleNamespace(output_dir=str(output_dir)), SimpleNamespace(is_world_process_zero=True)
    assert callback.on_train_end(args, state, control, model=model) is control


def test_callback_pushes_after_the_merge(demo_pair, tmp_path, hub):
    from merger import MergeAdapterCallback

    out = tmp_path / "merged"
    callback = MergeAdapterCallback(demo_pair[0], out, push_to_hub=REPO, private=True)
    train_end(callback, peft_model(demo_pair[0]), tmp_path / "run")
    assert callback.error is None, callback.error
    assert callback.result.hub == HubPush(REPO, "main", f"https://huggingface.co/{REPO}/commit/abc123")
    assert hub.steps == ["create_repo", "upload_folder"] and hub.kwargs("create_repo")["private"] is True
    assert hub.kwargs("upload_folder")["folder_path"] == out and committed(out)


def test_callback_keeps_the_merge_when_only_the_push_fails(demo_pair, tmp_path, hub):
    from merger import MergeAdapterCallback

    hub.fail = {"upload_folder": lambda _: ConnectionError("Connection reset by peer")}
    out = tmp_path / "merged"
    callback = MergeAdapterCallback(demo_pair[0], out, push_to_hub=REPO)
    train_end(callback, peft_model(demo_pair[0]), tmp_path / "run")  # never raises into training
    assert isinstance(callback.exception, HubPushError)
    assert callback.error.endswith(f"retry the upload with `hf upload {REPO} {out}`")
    assert callback.result is not None and callback.result.out == out and callback.result.hub is None
    assert committed(out)


def test_callback_refuses_bad_push_options_before_training(demo_pair, tmp_path):
    from merger import MergeAdapterCallback

    with pytest.raises(OptionsError, match=r"^option push_to_hub: 'nope' is not a Hub repo id"):
        MergeAdapterCallback(demo_pair[0], tmp_path / "merged", push_to_hub="nope")


def test_merge_peft_model_pushes(demo_pair, tmp_path, hub):
    from merger import merge_peft_model

    out = tmp_path / "merged"
    result = merge_peft_model(peft_model(demo_pair[0]), out, base=demo_pair[0], push_to_hub=REPO, revision="sft")
    assert result.hub.revision == "sft"
    assert hub.steps == ["create_repo", "create_branch", "upload_folder"]
    assert hub.kwargs("upload_folder")["folder_path"] == out and hub.kwargs("upload_folder")["revision"] == "sft"


# the Autotrain drop-ins -------------------------------------------------------------------------

@pytest.fixture
def hub_adapter(demo_pair, monkeypatch):
    """The demo adapter as the Hub id owner/my-lora (snapshot_download answers from the local folder)."""
    import huggingface_hub

    def snapshot_download(repo_id, **_):
        assert repo_id == "owner/my-lora"
        return str(demo_pair[1])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return "owner/my-lora"


def test_merge_llm_adapter_pushes_to_the_adapters_repo_like_autotrain(demo_pair, tmp_path, monkeypatch, hub, hub_adapter):
    from merger.integrations.autotrain import merge_llm_adapter

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", "the user's own")
    result = merge_llm_adapter(str(demo_pair[0]), hub_adapter, token="hf_call", push_to_hub=True)
    out = tmp_path / "my-lora-merged"
    assert result.out == out and committed(out)
    # Autotrain: model.push_to_hub(adapter_path), i.e. into the adapter's own repo
    assert hub.kwargs("create_repo")["repo_id"] == "owner/my-lora"
    assert hub.kwargs("upload_folder")["repo_id"] == "owner/my-lora" and hub.kwargs("upload_folder")["folder_path"] == out
    assert hub.token_seen == "hf_call"  # the call's token authorised the push ...
    assert os.environ["HF_TOKEN"] == "the user's own"  # ... and only the call


def test_merge_llm_adapter_push_from_a_local_adapter(demo_pair, tmp_path, hub):
    from merger.integrations.autotrain import merge_llm_adapter

    out = tmp_path / "out"
    with pytest.raises(OptionsError, match=r"^merge_llm_adapter: push_to_hub=True pushes to the adapter's Hub repo, as Autotrain "
                                           r"does, but adapter_path .* is a local folder; pass push_to_hub='owner/name'"):
        merge_llm_adapter(str(demo_pair[0]), str(demo_pair[1]), output_folder=str(out), push_to_hub=True)
    assert not out.exists() and hub.calls == []  # refused before any work
    result = merge_llm_adapter(str(demo_pair[0]), str(demo_pair[1]), output_folder=str(out), push_to_hub=REPO)
    assert result.hub.repo_id == REPO and hub.kwargs("upload_folder")["folder_path"] == out


def test_autotrain_merge_adapter_pushes_the_target_once_it_holds_the_merge(demo_pair, tmp_path, hub):
    import shutil

    from merger.integrations.autotrain import merge_adapter as autotrain_merge

    project = tmp_path / "project"
    shutil.copytree(demo_pair[1], project)
    (project / "README.md").write_text("autotrain model card")
    result = autotrain_merge(str(demo_pair[0]), str(project), str(project), push_to_hub=REPO)
    assert result.out == project and result.hub.repo_id == REPO
    assert hub.kwargs("upload_folder")["folder_path"] == project
    assert "model.safetensors" in hub.uploaded and "adapter_model.safetensors" not in hub.uploaded


def test_autotrain_merge_adapter_refuses_bad_push_options_first(demo_pair, tmp_path, hub):
    from merger.integrations.autotrain import merge_adapter as autotrain_merge

    with pytest.raises(OptionsError, match=r"^option push_to_hub: 'nope' is not a Hub repo id"):
        autotrain_merge(str(demo_pair[0]), str(tmp_path / "target"), str(demo_pair[1]), push_to_hub="nope")
    assert not (tmp_path / "target").exists() and hub.calls == []
