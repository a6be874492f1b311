"""Pack a pretrained base model (stage 7) into a self-contained directory that can be committed.

    <out>/valid.acc.ave.pth    the weights (ESPnet's average of the best epochs; float16 with --half)
    <out>/config.yaml          the training config (its token list inline), bpemodel pointing into <out>
    <out>/bpe.model            (subword tokens only)
    <out>/train.log            the pretraining log's epoch summaries (valid accuracy per epoch)

The bpemodel path in config.yaml is written relative to the recipe dir (run.sh runs from there), so any run of
the recipe can pass ``--base_model <out>/valid.acc.ave.pth``. ``--half`` stores the floating-point tensors
in float16 (half the size; ESPnet loads them into its float32 model). Refuses to write a model file larger
than ``--max_mb``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import yaml


def epoch_summaries(log: Path) -> str:
    return "".join(line for line in log.read_text().splitlines(keepends=True) if "epoch results" in line)


def write_weights(model: Path, target: Path, half: bool) -> None:
    """Copy the state dict, its floating-point tensors cast to float16 when ``half``."""
    if not half:
        shutil.copyfile(model, target)
        return
    import torch

    try:
        state = torch.load(model, map_location="cpu")
    except Exception as error:
        raise SystemExit(f"{model} is not a torch checkpoint ({error}): pass stage 7's output dir") from error
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, target)


def pack(base_dir: Path, out: Path, max_mb: float, half: bool) -> None:
    model = (base_dir / "valid.acc.ave.pth").resolve()
    if not model.is_file():
        raise SystemExit(f"{base_dir}/valid.acc.ave.pth not found: run stage 7 first")
    config = yaml.safe_load((base_dir / "config.yaml").read_text())
    bpemodel = config.get("bpemodel")
    if bpemodel and not Path(bpemodel).is_file():
        raise SystemExit(
            f"{base_dir}/config.yaml names bpemodel {bpemodel}, which does not exist: "
            "run pack_base.py from the recipe dir, or restore the token list of stage 5"
        )
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        size_mb = write_package(base_dir, model, config, staging, out, max_mb, half)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    print(f"{out}: {size_mb:.1f} MB model, config.yaml{', bpe.model' if bpemodel else ''}")


def write_package(
    base_dir: Path, model: Path, config: dict, staging: Path, out: Path, max_mb: float, half: bool
) -> float:
    """Write the package's files into ``staging``; returns the model file's size in MB."""
    staging.chmod(0o755)
    weights = staging / "valid.acc.ave.pth"
    write_weights(model, weights, half)
    size_mb = weights.stat().st_size / 2**20
    if size_mb > max_mb:
        hint = "use a smaller model" if half else "pass --half or use a smaller model"
        raise SystemExit(f"{model} makes a {size_mb:.1f} MB model file, more than --max_mb {max_mb}: {hint}")
    if config.get("bpemodel"):
        shutil.copyfile(config["bpemodel"], staging / "bpe.model")
        config = {**config, "bpemodel": str(out / "bpe.model")}
    (staging / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    log = base_dir / "pretrain.log"
    if log.is_file():
        (staging / "train.log").write_text(epoch_summaries(log))
    return size_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base_dir", type=Path, required=True, help="stage 7's output, e.g. exp/full/base")
    parser.add_argument(
        "--out", type=Path, required=True, help="relative to the recipe dir, e.g. pretrained/full"
    )
    parser.add_argument("--max_mb", type=float, default=20.0)
    parser.add_argument("--half", action="store_true", help="store the weights in float16")
    args = parser.parse_args()
    if args.out.is_absolute():
        raise SystemExit("--out must be relative to the recipe dir: config.yaml refers to it from there")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pack(args.base_dir, args.out, args.max_mb, args.half)


if __name__ == "__main__":
    main()
