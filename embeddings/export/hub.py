"""Uploading an exported model to the Hugging Face Hub."""

from etils import epath


class HubUploadError(RuntimeError):
    """The upload failed; the local export is intact."""


def push_to_hub(
    folder,
    repo_id: str,
    *,
    private: bool = False,
    commit_message: str = "Upload sentence-transformers model",
    api=None,
) -> str:
    """Creates `repo_id` if needed and uploads `folder`; returns the commit URL.

    The token comes from huggingface_hub's usual places (the HF_TOKEN
    environment variable or `hf auth login`'s cache); it is never printed.

    Args:
      folder: the exported model folder.
      repo_id: "org/name" on the Hub.
      private: create the repository as private.
      commit_message: message of the upload commit.
      api: a `huggingface_hub.HfApi` (tests pass one pointed at a local server).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = api or HfApi()
    folder = epath.Path(folder)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message=commit_message,
        )
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = (
            "set HF_TOKEN or run `hf auth login` with a token that can write to it"
            if status in (401, 403)
            else "check the repository name and your permissions"
        )
        raise HubUploadError(
            f"Upload of {folder} to {repo_id} failed (HTTP {status}): {hint}. "
            f"The exported model is intact in {folder}."
        ) from e
    except Exception as e:  # no network, DNS failure, offline mode (OSError or httpx errors)
        raise HubUploadError(
            f"Cannot reach the Hugging Face Hub to upload to {repo_id} ({type(e).__name__}: {e}). "
            f"The exported model is intact in {folder}; push it later with "
            f"`hf upload {repo_id} {folder}` or rerun the export with --push_to_hub."
        ) from e
    return str(getattr(info, "commit_url", info))
