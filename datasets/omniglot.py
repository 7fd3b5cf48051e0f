"""``omniglot``: handwritten characters of 50 alphabets, one-vs-rest per character.

Source: torchvision's ``Omniglot`` (Lake, Salakhutdinov, Tenenbaum, "Human-level concept
learning through probabilistic program induction", Science 2015). Licence: MIT. The
background set has 964 characters and the evaluation set 659, each drawn by 20 people;
105x105 binary images, resized here to 28x28 by default.

Expected layout under the data root (torchvision's; the zip is not needed once extracted)::

    omniglot-py/images_background/<alphabet>/<character>/<id>_<drawer>.png
    omniglot-py/images_evaluation/...   (with -o dataset.background=false)

Splits: Omniglot's background/evaluation split separates characters, which one-vs-rest
tasks cannot use, so each character's drawings are split by drawer: drawers 1-15 are
``train`` and 16-20 ``test`` (fixed, documented here). Tasks, in order: the characters in
torchvision's order (alphabets, then characters, sorted), named ``<alphabet>/<character>``.
By default only images of the selected characters are kept (``only_task_classes``), so
with T tasks each has about 1/T positives.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision

from mtlbench.errors import MtlbenchError
from mtlbench.registry import register_dataset
from mtlbench.vision import VisionConfig, VisionTaskDataset, decode_image, missing, one_vs_rest, reading

TRAIN_DRAWERS = range(1, 16)
FILE_NAME = re.compile(r"\d+_(\d+)")


def drawer(path: Path) -> int:
    """The drawer number of ``<id>_<drawer>.png``; any other name is an error naming the file."""
    match = FILE_NAME.fullmatch(path.stem)
    if not match:
        raise MtlbenchError(f"omniglot: unexpected file {str(path)!r} (Omniglot's files are named "
                            "<id>_<drawer>.png); move it out of the dataset folder")
    return int(match.group(1))


@dataclass
class OmniglotConfig(VisionConfig):
    only_task_classes: bool = True
    background: bool = True


class _Omniglot(torchvision.datasets.Omniglot):
    def _check_integrity(self) -> bool:  # an extracted folder tree is enough, zip or not
        return os.path.isdir(os.path.join(self.root, self._get_target_folder())) or super()._check_integrity()


@register_dataset("omniglot", "Omniglot characters: one-vs-rest per character, up to 964 tasks (torchvision Omniglot).")
class Omniglot(VisionTaskDataset):
    name = "omniglot"
    config_class = OmniglotConfig
    max_tasks = 964
    default_size = 28
    # Not measured here (no files): 15 drawings per character, so an epoch is short (21
    # batches at T=100); 30 epochs give every task about as many steps as MNIST's default.
    default_budget = {"epochs": 30}
    default_pos_weight = "auto"  # one-vs-rest: 1 positive in T
    mean, std = (0.9221,), (0.2681,)

    def load(self):
        sub = "images_background" if self.config.background else "images_evaluation"
        folder = self.root / "omniglot-py"
        if not (folder / sub).is_dir() and not (folder / f"{sub}.zip").is_file() and not self.download:
            raise missing(self.name, folder, [f"{sub}/ (or {sub}.zip)"], "rerun with --download")
        with reading(folder / sub, self.name):
            data = _Omniglot(str(self.root), background=self.config.background, download=self.download)
        files = [(Path(data.target_folder) / data._characters[c] / f, c) for f, c in data._flat_character_images]
        if not files:
            raise MtlbenchError(f"{self.name}: no character images under {str(folder / sub)!r} (expected "
                                "<alphabet>/<character>/<id>_<drawer>.png); the folder is empty or incomplete")
        files = [(p, c) for p, c in files if (drawer(p) in TRAIN_DRAWERS) == (self.split == "train")]
        size = self.config.image_size or self.default_size
        images = torch.empty(len(files), 1, size, size, dtype=torch.uint8)
        for i, (path, _) in enumerate(files):
            images[i] = decode_image(path, size, "L", self.name)
        # torchvision lists folders in file-system order; tasks go in sorted name order.
        names = sorted(data._characters)
        rank = {c: names.index(name) for c, name in enumerate(data._characters)}
        targets = torch.tensor([rank[c] for _, c in files], dtype=torch.long)
        return self.finish(images), one_vs_rest(targets, len(names)), names
