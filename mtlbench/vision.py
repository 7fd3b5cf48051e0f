"""Shared machinery for the real image datasets: data root, task selection, decoding cache.

Each dataset file reads its format through torchvision's dataset class where torchvision
has one, then turns class labels or attributes into binary tasks here.
"""
from __future__ import annotations

import contextlib
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torchvision.transforms.functional as TF
from PIL import Image

from mtlbench.data import TaskDataset, check_split
from mtlbench.errors import MtlbenchError

ENV_ROOT = "MTLBENCH_DATA"
ENV_CACHE = "MTLBENCH_CACHE"


def data_root(root: str | os.PathLike | None) -> Path:
    """``root``, else ``$MTLBENCH_DATA``, else ``~/.cache/mtlbench``."""
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get(ENV_ROOT) or Path.home() / ".cache" / "mtlbench")


def cache_dir() -> Path:
    """Where compressed files from a read-only folder are extracted (``$MTLBENCH_CACHE``)."""
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "mtlbench" / "extracted")


@dataclass
class VisionConfig:
    """Options shared by the real datasets (``-o dataset.KEY=VALUE``)."""

    image_size: int = 0          # 0 keeps each dataset's default size
    channels: int = 0            # 0 keeps native channels; 3 repeats grayscale to RGB
    only_task_classes: bool = False  # one-vs-rest: keep only images of the selected classes
    verify: bool = True          # check torchvision's published checksums where it has them
    # Pickled formats (CIFAR) are never loaded unverified unless this is set too: unpickling a
    # planted file runs its code. Only for files you made yourself (``--trust-data``).
    trust_data: bool = False


def one_vs_rest(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class ids ``[N]`` -> binary labels ``[N, num_classes]`` (task c: "is class c")."""
    return torch.nn.functional.one_hot(targets.long(), num_classes).to(torch.uint8)


def select_tasks(labels: torch.Tensor, names: list[str], num_tasks: int, task_names: list[str] | None,
                 dataset: str) -> tuple[torch.Tensor, list[str]]:
    """The first ``num_tasks`` tasks in the documented order, or the named ones."""
    if task_names:
        unknown = [n for n in task_names if n not in names]
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
            raise MtlbenchError(f"{dataset} has no task {unknown[0]!r}{hint} Tasks: {shown}")
        idx = [names.index(n) for n in task_names]
    else:
        if not 1 <= num_tasks <= len(names):
            raise MtlbenchError(f"{dataset} offers 1 to {len(names)} tasks; --tasks {num_tasks} is out of range")
        idx = list(range(num_tasks))
    return labels[:, idx], [names[i] for i in idx]


def to_uint8_images(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """``[N, H, W]`` or ``[N, C, H, W]`` uint8 -> resized ``[N, C', size, size]`` uint8."""
    if images.dim() == 3:
        images = images[:, None]
    if size and images.shape[-1] != size:
        images = TF.resize(images, [size, size], antialias=True)
    if channels == 3 and images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.contiguous()


def decode_image(path: Path, size: int, mode: str, dataset: str) -> torch.Tensor:
    """One image file -> uint8 ``[C, size, size]`` (PIL, as torchvision's datasets load them)."""
    with reading(path, dataset), Image.open(path) as image:
        tensor = TF.pil_to_tensor(image.convert(mode))
    return TF.resize(tensor, [size, size], antialias=True)


@contextlib.contextmanager
def reading(path: str | os.PathLike, dataset: str) -> Iterator[None]:
    """Turn any failure while parsing ``path`` into one clear error naming the file."""
    try:
        yield
    except MtlbenchError:
        raise
    except Exception as exc:
        why = f"{type(exc).__name__}: {str(exc)[:120]}"
        if not Path(path).exists():  # it never arrived: a download (or an extraction) failed
            raise MtlbenchError(f"{dataset}: could not get {str(path)!r}: the download failed ({why}); check "
                                "the network connection, or place the official files there by hand") from None
        raise MtlbenchError(f"{dataset}: {str(path)!r} is corrupt or truncated ({why}); "
                            "delete it and download it again") from None


def missing(dataset: str, folder: Path, files: list[str], how: str) -> MtlbenchError:
    return MtlbenchError(f"{dataset}: missing {', '.join(files)} in {str(folder)!r}; {how}")


_DECODED: dict[tuple, object] = {}


def cached(key: tuple, decode: Callable[[], object]) -> object:
    """Decoded data of the most recent dataset splits, so a sweep decodes each once."""
    if key not in _DECODED:
        while len(_DECODED) >= 2:
            _DECODED.pop(next(iter(_DECODED)))
        _DECODED[key] = decode()
    return _DECODED[key]


class VisionTaskDataset(TaskDataset):
    """Base for real datasets: subclasses implement :meth:`load` -> (images, labels, names)."""

    config_class = VisionConfig
    name = ""                    # the registered name, for messages
    max_tasks = 0
    default_size = 0
    pickled = False              # its files are Python pickles: never loaded unverified without trust_data

    def __init__(self, root: str | None = None, split: str = "train", num_tasks: int = 10,
                 config: VisionConfig | None = None, download: bool = False,
                 task_names: list[str] | None = None) -> None:
        self.config = config or self.config_class()
        check_split(split, self.splits, self.name)
        if self.pickled and not self.config.verify and not self.config.trust_data:
            raise MtlbenchError(f"{self.name}: its files are Python pickles, which run code when loaded, so they "
                                "are always checked against their published MD5; -o dataset.verify=false is "
                                "refused unless --trust-data is given too (only for files you made yourself)")
        self.root, self.split, self.download = data_root(root), split, download
        key = (type(self).__name__, str(self.root), split, self.config.image_size, self.config.channels,
               self.config.verify)
        images, labels, names = cached(key, self.load)
        labels, self.task_names = select_tasks(labels, names, num_tasks, task_names, self.name)
        if self.config.only_task_classes:
            keep = labels.any(dim=1).nonzero().flatten()
            images, labels = images[keep], labels[keep]
        self.images, self.labels = images, labels

    def load(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        raise NotImplementedError

    def finish(self, images: torch.Tensor) -> torch.Tensor:
        return to_uint8_images(images, self.config.image_size or self.default_size, self.config.channels)
