"""A model folder with random weights, for throughput runs where the real ones cannot travel.

    python tools/random_model.py SOURCE OUT [--no_weights] [--seed 0]

Copies every file of SOURCE (a Hugging Face or sentence-transformers model
folder) except its weights (`*.safetensors`, `*.bin`, `*.pt`, `*.h5`,
`*.msgpack`, `*.onnx` and the `onnx/`, `openvino/` folders) into OUT, then
writes `model.safetensors` with weights drawn by `transformers` from
`config.json` (`AutoModel.from_config`, torch seeded with --seed). Step
throughput does not depend on the weights' values, and the skeleton (config,
tokenizer, pooling) is small: build it with --no_weights where the model is,
carry it, and run this again on the machine (SOURCE may be OUT) to add the
weights there. OUT is written in a temporary folder beside it and renamed into
place, so an interrupted run leaves no half-written model.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".h5", ".msgpack", ".onnx")
WEIGHT_FOLDERS = ("onnx", "openvino")


def skeleton_files(source: pathlib.Path) -> list[pathlib.Path]:
    """SOURCE's files other than weights, relative to it."""
    files = []
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if not path.is_file() or relative.parts[0] in WEIGHT_FOLDERS:
            continue
        if path.name.endswith(WEIGHT_SUFFIXES):
            continue
        files.append(relative)
    return files


def write_random_weights(folder: pathlib.Path, seed: int) -> None:
    """model.safetensors for `folder`'s config.json, drawn with torch seeded by `seed`."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    torch.manual_seed(seed)
    model = transformers.AutoModel.from_config(config)
    model.save_pretrained(folder, safe_serialization=True)


def build(source: pathlib.Path, out: pathlib.Path, *, weights: bool, seed: int) -> pathlib.Path:
    """Writes OUT (see the module docstring) and returns it."""
    if not (source / "config.json").is_file():
        raise SystemExit(f"{source}: no config.json there; pass a model folder.")
    out.parent.mkdir(parents=True, exist_ok=True)
    building = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for relative in skeleton_files(source):
            (building / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / relative, building / relative)
        if weights:
            write_random_weights(building, seed)
        if out.exists():
            shutil.rmtree(out)
        building.rename(out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=pathlib.Path, help="model folder with config.json")
    parser.add_argument("out", type=pathlib.Path, help="folder to write (replaced if it exists)")
    parser.add_argument("--no_weights", action="store_true", help="copy the skeleton only")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the random weights")
    args = parser.parse_args()
    out = build(args.source, args.out, weights=not args.no_weights, seed=args.seed)
    print(out, file=sys.stderr)


if __name__ == "__main__":
    main()
