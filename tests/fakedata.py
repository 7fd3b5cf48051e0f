"""Writers of small fake datasets in the real on-disk formats (as torchvision's tests do)."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def write_idx(folder: Path, prefix: str, labels: list[int], gz: bool = False, size: int = 28) -> None:
    """MNIST's IDX format: big-endian magic, dimensions, then uint8 data."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(labels)
    images = np.arange(n * size * size, dtype=np.uint8).reshape(n, size, size)
    blobs = {f"{prefix}-images-idx3-ubyte": struct.pack(">IIII", 0x0803, n, size, size) + images.tobytes(),
             f"{prefix}-labels-idx1-ubyte": struct.pack(">II", 0x0801, n) + bytes(labels)}
    for name, blob in blobs.items():
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(blob))
        else:
            (folder / name).write_bytes(blob)


def write_cifar(root: Path, hundred: bool, labels_per_batch: list[list[int]], test_labels: list[int]) -> Path:
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True, exist_ok=True)
    key = "fine_labels" if hundred else "labels"

    def batch(labels):
        data = np.random.default_rng(0).integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        return {"data": data, key: labels}

    if hundred:
        pickle.dump(batch(sum(labels_per_batch, [])), open(folder / "train", "wb"))
        pickle.dump(batch(test_labels), open(folder / "test", "wb"))
        pickle.dump({"fine_label_names": [f"class{i:02d}" for i in range(100)]}, open(folder / "meta", "wb"))
    else:
        for i, labels in enumerate(labels_per_batch, 1):
            pickle.dump(batch(labels), open(folder / f"data_batch_{i}", "wb"))
        pickle.dump(batch(test_labels), open(folder / "test_batch", "wb"))
        names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        pickle.dump({"label_names": names}, open(folder / "batches.meta", "wb"))
    return folder


def write_jpeg(path: Path, size: int = 24, value: int = 0) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color=(value, value, value)).save(path, format="JPEG")


def write_celeba(root: Path, attrs: np.ndarray, partition: list[int]) -> Path:
    """``attrs``: [N, 40] of +1/-1; ``partition``: 0 train, 1 valid, 2 test per image."""
    folder = root / "celeba"
    names = [f"Attr_{i:02d}" for i in range(attrs.shape[1])]
    files = [f"{i + 1:06d}.jpg" for i in range(len(attrs))]
    n = len(files)
    (folder / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    for f in files:
        write_jpeg(folder / "img_align_celeba" / f)
    rows = lambda cells: "\n".join(f"{f} " + " ".join(map(str, c)) for f, c in zip(files, cells))  # noqa: E731
    (folder / "list_attr_celeba.txt").write_text(f"{n}\n" + " ".join(names) + "\n" + rows(attrs.tolist()) + "\n")
    (folder / "list_eval_partition.txt").write_text(rows([[p] for p in partition]) + "\n")
    (folder / "identity_CelebA.txt").write_text(rows([[1]] * n) + "\n")
    (folder / "list_bbox_celeba.txt").write_text(f"{n}\nimage_id x_1 y_1 width height\n" + rows([[0, 0, 5, 5]] * n) + "\n")
    lm = "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y"
    (folder / "list_landmarks_align_celeba.txt").write_text(f"{n}\n{lm}\n" + rows([[1] * 10] * n) + "\n")
    return folder


def write_cub(root: Path, present: np.ndarray, is_train: list[int], with_names: bool = True) -> Path:
    """``present``: [N, 312] of 0/1."""
    folder = root / "CUB_200_2011"
    paths = [f"{1 + i % 3:03d}.Bird_{i % 3}/img_{i}.jpg" for i in range(len(present))]
    for p in paths:
        write_jpeg(folder / "images" / p)
    (folder / "images.txt").write_text("".join(f"{i + 1} {p}\n" for i, p in enumerate(paths)))
    (folder / "train_test_split.txt").write_text("".join(f"{i + 1} {t}\n" for i, t in enumerate(is_train)))
    (folder / "attributes").mkdir(parents=True, exist_ok=True)
    lines = [f"{i + 1} {a + 1} {present[i, a]} 3 1.5\n" for i in range(len(present)) for a in range(312)]
    (folder / "attributes" / "image_attribute_labels.txt").write_text("".join(lines))
    if with_names:
        (root / "attributes.txt").write_text("".join(f"{a + 1} has_part::value_{a + 1}\n" for a in range(312)))
    return folder


def write_omniglot(root: Path, characters: dict[str, list[str]], drawers: int = 20) -> Path:
    """``characters``: alphabet -> character folder names; ``drawers`` PNGs each."""
    from PIL import Image
    folder = root / "omniglot-py" / "images_background"
    for a, chars in characters.items():
        for ci, c in enumerate(chars):
            d = folder / a / c
            d.mkdir(parents=True, exist_ok=True)
            for k in range(1, drawers + 1):
                Image.new("L", (105, 105), color=255 if k % 2 else 0).save(d / f"{ci:04d}_{k:02d}.png")
    return folder
