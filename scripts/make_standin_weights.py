"""Make the stand-in "pretrained" packages that the recipe-learning tests start from.

The papers fine-tune ImageNet (or COCO) backbones; the tests cannot download those and train
narrowed architectures that no published weights fit. A stand-in plays the part: the same
narrowed architecture trained with Adam on a *different* generated project whose annotations
carry other class names (``Tumor`` -> ``Dark``, ``Stroma`` -> ``Fibre``, ``Necrosis`` ->
``Pale``; a ``Region`` annotation makes each slide exhaustively labelled). Passed as
``init_from``, its feature layers load and every class head of the recipe's own classes starts
fresh, as a head does on an ImageNet backbone: what the recipe then learns (loss falling, Dice
above chance) is the recipe's own doing.

    python scripts/make_standin_weights.py --arch fcn32s_vgg16 --out tests/data/standin

writes ``<out>/<arch>/config.json`` and ``weights.pt`` (a qpseg model package) and
``<out>/<arch>/standin.json`` (how it was made and what it scored). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: Proxy training per architecture: the narrowed model of the recipe test, its data, Adam.
PRESETS: dict[str, dict[str, Any]] = {
    # H2G-Net: only the patch classifier has a pretrained start (pedersen2022 §3.4), so the
    # proxy training is the patch stage. The refinement U-Net, "trained from scratch" in the
    # paper, stays untrained: one step (steps >= 1 is required) at lr 1e-12, and filters
    # [2, 2], so that init_from (by name and shape) loads none of its weights into the recipe
    # test's U-Net; only its BN num_batches_tracked counters and the Background entry of its
    # head bias (class-aligned; still its random initial value) share a name and shape.
    "h2g_net": {
        "model_kwargs": {"patch_kwargs": {"width_mult": 0.25, "tile_px": 32},
                         "refine_kwargs": {"filters": [2, 2], "tile_px": 32}},
        "stages": {
            "patch": {
                "data": {"mpp": 1.0, "group_by": None},
                "optimizer": {"name": "adam", "lr": 1.0e-3},
                "loss": {"name": "ce"},
                "sampler": {"name": "uniform", "samples_per_epoch": 64 * 50,
                            "val_samples": 512},
                "augment": {"preset": "none", "rot90": True, "hflip": True, "vflip": True},
                "train": {"batch_size": 64},
            },
            "refine": {"optimizer": {"name": "adam", "lr": 1.0e-12},
                       "train": {"steps": 1, "early_stopping": None}},
        },
        "train": {"batch_size": 64},
    },
    "fcn32s_vgg16": {
        "model_kwargs": {"width_mult": 0.0625, "tile_px": 256},
        "data": {"mpp": 1.0, "min_labelled": 0.05},
        "optimizer": {"name": "adam", "lr": 1.0e-3},
        "loss": {"name": "ce"},
        "sampler": {"name": "uniform"},
        "augment": {"preset": "none", "rot90": True, "hflip": True, "vflip": True},
        "train": {"batch_size": 4, "val_every": 10_000},
    },
    # lagree2021's three GB U-Net members as tests/test_recipe_learns_lagree2021.py narrows
    # them (one member_kwargs for all three): width 0.1, a small decoder, 64 px tiles at the
    # recipe's 0.25 µm/px. Region targets, raw colours (the lagree2021 defaults of these
    # architectures, nuclei targets and Vahadane normalisation, are the recipe's, not ImageNet's).
    **{f"unet_{encoder}": {
        "model_kwargs": {"width_mult": 0.1, "decoder_filters": [16, 16, 8, 8, 8],
                         "tile_px": 64},
        "data": {"mpp": 0.25, "min_labelled": 0.05, "target": "semantic",
                 "stain_normalization": None},
        "optimizer": {"name": "adam", "lr": 1.0e-3},
        "loss": {"name": "ce"},
        "sampler": {"name": "uniform"},
        "augment": {"preset": "none", "rot90": True, "hflip": True, "vflip": True},
        "train": {"batch_size": 8, "early_stopping": None},
    } for encoder in ("vgg19", "resnet101", "densenet121")},
}

#: The proxy project's class names: the generated styles under names no recipe test uses.
RENAME = {"Tumor": "Dark", "Stroma": "Fibre", "Necrosis": "Pale"}
SIZE_PX = 1536
SEED = 100


def make_proxy_project(folder: Path, n_slides: int = 3) -> Path:
    """A generated project (slides at 0.5 µm/px) annotated exhaustively under RENAME's names;
    returns its manifest folder."""
    from shapely.geometry import box

    from qpseg.manifest import import_project
    from qpseg.qupath.geojson import QuPathObject, read_geojson, write_geojson
    from qpseg.testing.projects import make_project

    proj = make_project(folder / "p", n_slides=n_slides, width=SIZE_PX, height=SIZE_PX,
                        seed=SEED)
    for f in proj.annotation_files:
        objs = [QuPathObject(geometry=o.geometry, object_type="annotation",
                             classification=RENAME[str(o.classification)])
                for o in read_geojson(f)]
        objs.append(QuPathObject(geometry=box(0, 0, SIZE_PX, SIZE_PX),
                                 object_type="annotation", classification="Region"))
        write_geojson(f, objs)
    import_project(proj.path, folder / "m", use_paquo=False)
    return folder / "m"


def stage_scores(package_config: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Validation accuracy and Dice per class of each trained stage of a package (for a
    two-stage model the first stage is the one a stand-in is for)."""
    stages = package_config["training"]["stages"]
    return {name: {k: round(float(v), 4) for k, v in (st["best"].get("last_metrics") or {}).items()
                   if k.startswith("val_dice_") or k == "val_accuracy"}
            for name, st in stages.items()}


def make_standin(arch: str, out: Path, steps: int, threads: int) -> dict[str, Any]:
    """Train ``arch``'s stand-in and copy its package into ``out/arch``."""
    import warnings

    import torch

    from qpseg.models.registry import InitWarning
    from qpseg.training import train

    torch.set_num_threads(threads)
    warnings.simplefilter("ignore", InitWarning)  # a stand-in starts from random init on purpose
    preset = PRESETS[arch]
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_proxy_project(Path(tmp))
        start = time.perf_counter()
        cfg = {**preset, "classes": sorted(RENAME.values()), "pretrained": None,
               "split": {"val": 0.34, "test": 0.0},
               "train": {**preset["train"], "steps": steps, "epochs": 10_000,
                         "log_every": 50, "checkpoint_every": 0}}
        train(manifest, Path(tmp) / "run", model=arch, config=cfg)
        seconds = time.perf_counter() - start
        dest = out / arch
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "weights.pt"):
            shutil.copyfile(Path(tmp) / "run" / name, dest / name)
    record = {
        "arch": arch, "steps": steps, "seconds": round(seconds, 1), "proxy_seed": SEED,
        "proxy_classes": RENAME, "config": cfg,
        "val": stage_scores(json.loads((dest / "config.json").read_text(encoding="utf-8"))),
        "made_with": "python scripts/make_standin_weights.py --arch "
                     f"{arch} --steps {steps}",
    }
    (dest / "standin.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", choices=sorted(PRESETS), required=True)
    parser.add_argument("--out", type=Path, default=Path("tests/data/standin"))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    records = [make_standin(a, args.out, args.steps, args.threads) for a in args.arch]
    json.dump(records, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
