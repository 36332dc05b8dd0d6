"""Publishing on the Hub (uploads against a stubbed `HfApi`) and loading back (folders and an offline Hub cache)."""

import json

import pytest

import analytic_schedulers.hub as hub
from analytic_schedulers import AnalyticDPMScheduler
from analytic_schedulers.cli import main
from analytic_schedulers.loading import BUNDLED_MODEL


class RecordingApi:
    """Stands in for `huggingface_hub.HfApi`: records every call and what the uploaded folder held at that time."""

    calls = []

    def __init__(self, token=None):
        RecordingApi.calls.append(("HfApi", {"token": token}))

    def create_repo(self, repo_id, **kwargs):
        RecordingApi.calls.append(("create_repo", dict(kwargs, repo_id=repo_id)))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_branch(self, repo_id, **kwargs):
        RecordingApi.calls.append(("create_branch", dict(kwargs, repo_id=repo_id)))

    def upload_folder(self, **kwargs):
        from pathlib import Path

        folder = Path(kwargs["folder_path"])
        files = {str(p.relative_to(folder)): p.read_text() if p.suffix in (".json", ".md") else None
                 for p in folder.rglob("*") if p.is_file()}
        RecordingApi.calls.append(("upload_folder", dict(kwargs, files=files)))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/0"})()


@pytest.fixture
def api(monkeypatch):
    RecordingApi.calls = []
    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    return RecordingApi


def calls_named(api, name):
    return [kwargs for call, kwargs in api.calls if call == name]


def test_estimate_gamma_pushes_the_scheduler_folder_with_a_card(api, tmp_path, capsys):
    out = tmp_path / "gamma"
    assert main(["estimate-gamma", "--model", str(BUNDLED_MODEL), "--data", "sklearn-digits", "--num-samples", "8",
                 "--steps", "2", "--seed", "5", "--output", str(out), "--no-progress",
                 "--push-to-hub", "me/digits-analytic", "--hub-token", "hf_secret", "--private",
                 "--revision", "tables", "--commit-message", "Gamma of the digits model"]) == 0
    assert "Uploaded to https://huggingface.co/me/digits-analytic" in capsys.readouterr().out
    assert {"token": "hf_secret"} in [kwargs for call, kwargs in api.calls if call == "HfApi"]
    (repo,) = calls_named(api, "create_repo")
    assert repo["repo_id"] == "me/digits-analytic" and repo["private"] is True and repo["exist_ok"]
    assert repo["token"] == "hf_secret"
    (branch,) = calls_named(api, "create_branch")
    assert branch["branch"] == "tables" and branch["token"] == "hf_secret"
    (upload,) = calls_named(api, "upload_folder")
    assert upload["path_in_repo"] == "analytic_scheduler" and upload["folder_path"] == str(out)
    assert upload["commit_message"] == "Gamma of the digits model" and upload["revision"] == "tables"
    assert upload["token"] == "hf_secret"
    assert sorted(upload["files"]) == ["README.md", "gamma_estimate.json", "scheduler_config.json"]
    card = upload["files"]["README.md"]
    for fact in ("images M | 8 |", "| seed | 5 |", "sklearn-digits", str(BUNDLED_MODEL), "2 of 1000",
                 "largest standard error", "analytic-schedulers 0.", 'subfolder=\'analytic_scheduler\''):
        assert fact in card, fact
    assert json.loads(upload["files"]["scheduler_config.json"])["gamma"] is not None


def test_push_gamma_refuses_a_folder_without_a_table(api, tmp_path):
    AnalyticDPMScheduler().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="estimate-gamma --output"):
        hub.push_gamma_to_hub(tmp_path, "me/x")
    assert not calls_named(api, "upload_folder")


def test_push_gamma_defaults(api, tmp_path):
    AnalyticDPMScheduler(gamma=[0.5] * 1000).save_pretrained(tmp_path)
    hub.push_gamma_to_hub(tmp_path, "me/x")
    (upload,) = calls_named(api, "upload_folder")
    assert upload["path_in_repo"] == "analytic_scheduler" and upload["revision"] is None
    assert upload["commit_message"] == "Analytic-DPM Gamma table in analytic_scheduler/"
    assert not calls_named(api, "create_branch") and "README.md" in upload["files"]  # a card even then


def test_train_head_pushes_the_head_alone_with_a_card(api, tmp_path, capsys):
    out = tmp_path / "head"
    assert main(["train-head", "--model", str(BUNDLED_MODEL), "--data", "sklearn-digits", "--covariance-type", "npr",
                 "--steps", "2", "--batch-size", "4", "--checkpoint-every", "1", "--output", str(out),
                 "--no-progress", "--push-to-hub", "me/digits-heads", "--commit-message", "an NPR head"]) == 0
    (upload,) = calls_named(api, "upload_folder")
    assert upload["path_in_repo"] == "npr_head" and upload["commit_message"] == "an NPR head"
    assert upload["token"] is None and calls_named(api, "create_repo")[0]["private"] is None
    assert "checkpoints/*" in upload["ignore_patterns"]  # the checkpoints stay behind
    card = upload["files"]["README.md"]
    for fact in ("NPR-DPM noise-square head", "sklearn-digits", "steps 2", "batch_size 4", "final loss",
                 "subfolder='npr_head'"):
        assert fact in card, fact
    assert json.loads(upload["files"]["config.json"])["_class_name"] == "NoiseSquareHead"
