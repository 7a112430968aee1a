"""A Hub id for model.init: a refusal by the Hub is not reported as an unreachable Hub."""

import httpx2
import huggingface_hub
import pytest
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)

from embeddings.models.pretrained import resolve_model_dir


def response(status: int) -> httpx2.Response:
    request = httpx2.Request("GET", "https://huggingface.co/api/models/org/model/revision/main")
    return httpx2.Response(status, request=request)


def fail_with(monkeypatch, error: Exception) -> None:
    def snapshot_download(repo_id, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.mark.parametrize(
    "error",
    [
        # What huggingface_hub raises for a private repo or a missing token (401)...
        RepositoryNotFoundError("401 Client Error. Repository Not Found", response=response(401)),
        # ...for a gated model whose terms were not accepted...
        GatedRepoError("403 Client Error. Cannot access gated repo", response=response(403)),
        # ...and for a token without the permission (403).
        HfHubHTTPError("403 Forbidden: token lacks permission", response=response(403)),
    ],
)
def test_a_refusal_says_the_hub_answered(monkeypatch, error):
    fail_with(monkeypatch, error)
    with pytest.raises(FileNotFoundError) as raised:
        resolve_model_dir("org/model")
    message = str(raised.value)
    assert "could not be reached" not in message
    assert "refused" in message and f"HTTP {error.response.status_code}" in message
    assert "token" in message and "gated" in message and "private" in message


def test_an_unreachable_hub_is_still_said_so(monkeypatch):
    fail_with(monkeypatch, LocalEntryNotFoundError("cannot reach the Hub and no cached copy"))
    with pytest.raises(FileNotFoundError, match="the Hub could not be reached"):
        resolve_model_dir("org/model")


def test_a_missing_model_is_said_so(monkeypatch):
    fail_with(monkeypatch, RepositoryNotFoundError("404 Not Found", response=response(404)))
    with pytest.raises(FileNotFoundError, match=r"has no model 'org/model' \(HTTP 404\)"):
        resolve_model_dir("org/model")
