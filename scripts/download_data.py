"""Downloads the training files a data_config.json names, from the Hugging Face Hub.

    python scripts/download_data.py --data_config configs/data/1b_pairs.json \
        --output gs://my-bucket/1b-pairs --skip_missing
    python scripts/download_data.py --data_config configs/data/1b_pairs.json \
        --output data/1b-pairs --only AllNLI.jsonl.gz gooaq_pairs.jsonl.gz

Each entry's "name" is a file's path both in the Hub dataset repo and under
--output (which then serves as the trainer's config.data_folder). By default the
files come from sentence-transformers/embedding-training-data
(https://huggingface.co/datasets/sentence-transformers/embedding-training-data),
the repo holding the 1B-pairs project's per-dataset .jsonl.gz files. Names in a
folder whose files live in another repo (the per-site Stack Exchange files) are
fetched by a run of their own:

    python scripts/download_data.py --data_config configs/data/1b_pairs.json \
        --output gs://my-bucket/1b-pairs --subfolder stackexchange_title_body \
        --repo_id flax-sentence-embeddings/stackexchange_title_body_jsonl

A file is skipped when --output already holds it at the size the Hub reports.
Downloads land in a staging folder first and are renamed into place only when
complete, so an interrupted run never leaves a file that looks finished (and
the next run resumes it). Writing to gs:// needs gcsfs (pip install gcsfs).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

# huggingface_hub's HTTP client; its transport errors are what "offline" looks like.
import httpx2
from etils import epath
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from tqdm import tqdm

DEFAULT_REPO_ID = "sentence-transformers/embedding-training-data"
# Hub metadata arrives in one request per this many paths.
_PATHS_PER_REQUEST = 100
_COPY_CHUNK_BYTES = 8 * 1024 * 1024


class DownloadError(Exception):
    """A problem the user has to fix; main() prints it without a traceback."""


def read_file_names(data_config: Path) -> list[str]:
    """Returns the "name" of every entry in a data_config.json.

    Raises:
        DownloadError: if the file is missing, not JSON, not a list of objects,
            or a name is not a relative path inside the data folder.
    """
    try:
        entries = json.loads(data_config.read_text())
    except FileNotFoundError:
        raise DownloadError(f"{data_config}: no such file; pass --data_config PATH.") from None
    except json.JSONDecodeError as e:
        raise DownloadError(
            f"{data_config} line {e.lineno}: invalid JSON ({e.msg}); fix the file."
        ) from None
    if not isinstance(entries, list):
        raise DownloadError(
            f'{data_config}: expected a list of {{"name", "lines", "weight"}} objects, '
            f"got {type(entries).__name__}."
        )
    names = []
    for index, entry in enumerate(entries):
        where = f"{data_config} entry {index}"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise DownloadError(f'{where}: needs a "name" key with a file path, got {entry!r}.')
        name = entry["name"]
        parts = PurePosixPath(name).parts
        if not name or name.startswith("/") or ".." in parts or "\\" in name:
            raise DownloadError(
                f'{where}: "name" must be a relative path inside the data folder, got {name!r}.'
            )
        names.append(name)
    return names


def select_names(names: list[str], only: Sequence[str] | None, data_config: Path) -> list[str]:
    """Keeps the names in `only` (all when None), in data_config order."""
    if not only:
        return names
    wanted = set(only)
    unknown = sorted(wanted - set(names))
    if unknown:
        raise DownloadError(
            f"--only {' '.join(unknown)}: not in {data_config}; its names are: {', '.join(names)}."
        )
    return [name for name in names if name in wanted]


def repo_paths(names: list[str], subfolder: str | None, data_config: Path) -> dict[str, str]:
    """Maps each data_config name to its path in the Hub repo.

    Without `subfolder` the two are the same. With it, only the names under
    SUBFOLDER/ are kept, and the repo holds them without that prefix.
    """
    if not subfolder:
        return {name: name for name in names}
    prefix = subfolder.strip("/") + "/"
    paths = {name: name[len(prefix) :] for name in names if name.startswith(prefix)}
    if not paths:
        raise DownloadError(
            f"--subfolder {subfolder}: no name in {data_config} starts with {prefix}"
        )
    return paths


def hub_file_sizes(repo_id: str, revision: str | None, names: list[str]) -> dict[str, int]:
    """The size in bytes of each file (a path in the repo) the repo holds, from its metadata.

    Raises:
        DownloadError: if the Hub cannot be reached or the repo does not exist.
    """
    api = HfApi()
    sizes = {}
    try:
        for start in range(0, len(names), _PATHS_PER_REQUEST):
            chunk = names[start : start + _PATHS_PER_REQUEST]
            for info in api.get_paths_info(repo_id, chunk, repo_type="dataset", revision=revision):
                if hasattr(info, "size"):  # Folders have no size and are not wanted.
                    sizes[info.path] = info.size
    except RepositoryNotFoundError:
        raise DownloadError(
            f"dataset repo {repo_id} not found on the Hub (or it is private): check --repo_id."
        ) from None
    except HfHubHTTPError as e:
        raise DownloadError(f"the Hub refused the file list of {repo_id}: {e}") from None
    except (ConnectionError, TimeoutError, httpx2.TransportError) as e:
        raise _unreachable(e) from None
    return sizes


def drop_missing(
    paths: dict[str, str], sizes: dict[str, int], repo_id: str, skip_missing: bool
) -> dict[str, str]:
    """Removes the names the repo lacks, or fails naming them unless `skip_missing`."""
    missing = [name for name, path in paths.items() if path not in sizes]
    if not missing:
        return paths
    shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if missing[10:] else "")
    if not skip_missing:
        raise DownloadError(
            f"{len(missing)} file(s) not in dataset repo {repo_id}: {shown}. Pick the names this "
            "repo holds with --only, --subfolder or --skip_missing, use another --repo_id, or "
            "fix the data_config."
        )
    tqdm.write(f"not in {repo_id}, left for another run: {shown}")
    return {name: path for name, path in paths.items() if path in sizes}


def _unreachable(error: Exception) -> DownloadError:
    return DownloadError(
        f"cannot reach the Hugging Face Hub: {str(error).rstrip('.')}. Check the network, "
        "and that HF_HUB_OFFLINE is not set (HF_ENDPOINT selects a mirror)."
    )


def is_local(path: epath.Path) -> bool:
    return "://" not in os.fspath(path)


def check_output(output: epath.Path) -> None:
    """Fails early when a bucket cannot be written for lack of gcsfs."""
    try:
        output.exists()
    except ImportError as e:  # etils needs gcsfs for gs:// paths.
        raise DownloadError(f"--output {output}: {e} (pip install gcsfs).") from None


def is_complete(path: epath.Path, size: int) -> bool:
    """Whether `path` holds a whole file: present, at the size the Hub reports."""
    return path.is_file() and path.stat().length == size


def copy_to_bucket(source: Path, dest: epath.Path) -> None:
    """Copies a local file to `dest` through a temporary name, with a progress bar.

    The final name appears only once the copy is whole (a bucket's rename is a
    server-side copy, so the object is never seen half written).
    """
    partial = dest.parent / f"{dest.name}.partial"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with (
        source.open("rb") as reader,
        partial.open("wb") as writer,
        tqdm(
            total=source.stat().st_size, unit="B", unit_scale=True, desc=f"upload {dest.name}"
        ) as progress,
    ):
        while chunk := reader.read(_COPY_CHUNK_BYTES):
            writer.write(chunk)
            progress.update(len(chunk))
    partial.rename(dest)


def fetch(
    repo_id: str,
    revision: str | None,
    repo_path: str,
    size: int,
    dest: epath.Path,
    staging: Path,
    force: bool,
) -> None:
    """Downloads one file into `staging`, checks its size, then moves it to `dest`."""
    try:
        staged = Path(
            hf_hub_download(
                repo_id,
                repo_path,
                repo_type="dataset",
                revision=revision,
                local_dir=staging,
                force_download=force,
            )
        )
    except LocalEntryNotFoundError as e:  # What hf_hub_download raises when offline.
        raise _unreachable(e.__cause__ or e) from None
    except (ConnectionError, TimeoutError, httpx2.TransportError) as e:
        raise _unreachable(e) from None
    got = staged.stat().st_size
    if got != size:
        staged.unlink()
        raise DownloadError(
            f"{repo_path}: downloaded {got} bytes but the Hub lists {size}; run again."
        )
    if is_local(dest):
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, dest)  # Same file system as the staging folder: atomic.
    else:
        copy_to_bucket(staged, dest)
        staged.unlink()


def default_staging(output: epath.Path) -> Path:
    """Inside --output for a local folder (so the final rename is atomic), else a temp folder.

    The folder is the same on every run, so an interrupted download resumes.
    """
    if is_local(output):
        return Path(output) / ".download-staging"
    return Path(tempfile.gettempdir()) / "embeddings-download-staging"


def download(
    data_config: Path,
    output: epath.Path,
    repo_id: str = DEFAULT_REPO_ID,
    revision: str | None = None,
    only: Sequence[str] | None = None,
    subfolder: str | None = None,
    skip_missing: bool = False,
    force: bool = False,
) -> dict[str, list[str]]:
    """Fetches the files data_config names into `output`.

    Returns:
        {"downloaded": [...], "skipped": [...], "missing": [...]}: names fetched
        now, names already complete, and (with skip_missing) names the repo lacks.

    Raises:
        DownloadError: on bad input, an unreachable Hub, or a short download.
    """
    names = select_names(read_file_names(data_config), only, data_config)
    paths = repo_paths(names, subfolder, data_config)
    check_output(output)
    sizes = hub_file_sizes(repo_id, revision, list(paths.values()))
    present = drop_missing(paths, sizes, repo_id, skip_missing)
    staging = default_staging(output)
    done: dict[str, list[str]] = {"downloaded": [], "skipped": []}
    done["missing"] = [name for name in paths if name not in present]
    for name, repo_path in tqdm(present.items(), unit="file", desc="files"):
        dest, size = output / name, sizes[repo_path]
        if not force and is_complete(dest, size):
            tqdm.write(f"{name}: complete ({size:,} bytes), skipped")
            done["skipped"].append(name)
            continue
        fetch(repo_id, revision, repo_path, size, dest, staging, force)
        tqdm.write(f"{name}: downloaded ({size:,} bytes) to {dest}")
        done["downloaded"].append(name)
    shutil.rmtree(staging, ignore_errors=True)
    return done


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=(
            f"The default --repo_id, {DEFAULT_REPO_ID}, holds the 1B-pairs\n"
            f"training files: https://huggingface.co/datasets/{DEFAULT_REPO_ID}\n"
            "Files already complete in --output are skipped; interrupted downloads resume."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data_config", type=Path, required=True, help="data_config.json.")
    parser.add_argument(
        "--output", required=True, help="Folder or gs://BUCKET/PATH (config.data_folder)."
    )
    parser.add_argument(
        "--repo_id", default=DEFAULT_REPO_ID, help="Hub dataset repo holding the files."
    )
    parser.add_argument("--revision", default=None, help="Branch, tag or commit (default main).")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="Only these data_config names.")
    parser.add_argument(
        "--subfolder",
        metavar="DIR",
        help="Only the names under DIR/, which the repo holds without that prefix.",
    )
    parser.add_argument(
        "--skip_missing",
        action="store_true",
        help="List the names the repo lacks and download the rest (default: fail).",
    )
    parser.add_argument("--force", action="store_true", help="Download even complete files.")
    args = parser.parse_args(argv)
    try:
        done = download(
            args.data_config,
            epath.Path(args.output),
            repo_id=args.repo_id,
            revision=args.revision,
            only=args.only,
            subfolder=args.subfolder,
            skip_missing=args.skip_missing,
            force=args.force,
        )
    except DownloadError as e:
        print(f"download_data.py: error: {e}", file=sys.stderr)
        return 1
    missing = f", {len(done['missing'])} not in {args.repo_id}" if done["missing"] else ""
    print(
        f"{len(done['downloaded'])} downloaded, {len(done['skipped'])} already complete"
        f"{missing}, in {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
