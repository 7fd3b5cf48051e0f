"""``--backbone timm:NAME``: any timm CNN as the backbone every method builds on.

The model is built with ``timm.create_model(NAME, pretrained=False, num_classes=0,
in_chans=C)`` (C from the dataset's images). mtlbench keeps its feature part
(``forward_features``: stem and stages) and replaces the model's own head (pooling, head
norm, classifier) by global average pooling, as on the built-in backbones, so every method's
task heads sit on the same features.

- **Stages.** The feature part is laid out as a chain of its modules (one level of
  ``nn.Sequential`` flattened) and cut into blocks after each module named in the model's
  ``feature_info``; cross-stitch units go between these blocks, one per stage boundary. A
  model whose feature part is not such a chain is refused: at build, the chain's output is
  checked to equal ``forward_features`` exactly.
- **Small inputs.** Most timm CNNs downsample by 32. Inputs with a side below ``min_input``
  (default: the model's total stride from ``feature_info``) are resized up to it (bilinear)
  before the stem, so 28×28 MNIST digits reach a 1×1 map instead of an empty one. The
  result records the rule (``backbone_details``) and the image size (``data.image_size``).
- **Pretrained weights** (``--pretrained``, optional, need files on disk): ``cache`` loads
  from timm's local cache with the Hugging Face hub set offline, so a missing file is a clear
  error at once instead of a hang; a path loads a state dict with ``weights_only=True``.
  With pretrained weights the input is re-normalised from the dataset's statistics to the
  model's pretrained mean and std, and both are recorded.
"""
from __future__ import annotations

import contextlib
import difflib
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mtlbench.backbones import Backbone
from mtlbench.errors import MtlbenchError
from mtlbench.registry import register_backbone

HEAD_NAMES = ("global_pool", "head", "fc", "classifier", "head_drop", "flatten")


@dataclass
class TimmConfig:
    in_channels: int = 3
    pretrained: str = ""        # "": random init; "cache": timm's local cache; else a weights file
    min_input: int = 0          # resize inputs with a smaller side up to this; 0: the model's stride
    # The dataset's normalisation (set from the data), for re-normalising to pretrained stats.
    data_mean: tuple[float, ...] = ()
    data_std: tuple[float, ...] = ()


class Prepare(nn.Module):
    """Before the stem: resize small inputs up, and map the dataset's normalisation to the
    pretrained model's (an affine per channel; identity without pretrained weights)."""

    def __init__(self, min_input: int, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> None:
        super().__init__()
        self.min_input = min_input
        self.renormalise = scale is not None
        if self.renormalise:
            self.register_buffer("scale", scale.view(1, -1, 1, 1))
            self.register_buffer("shift", shift.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.renormalise:
            x = x * self.scale + self.shift
        h, w = x.shape[-2:]
        if min(h, w) < self.min_input:
            size = (max(h, self.min_input), max(w, self.min_input))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x

    def extra_repr(self) -> str:
        return f"min_input={self.min_input}, renormalise={self.renormalise}"


def _timm():
    try:
        import timm
    except ImportError:
        raise MtlbenchError("--backbone timm:NAME needs timm: pip install timm") from None
    return timm


def _create(name: str, in_channels: int) -> nn.Module:
    timm = _timm()
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise MtlbenchError(f"timm has no model {name!r}{hint}")
    return timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels)


@contextlib.contextmanager
def _offline():
    """Hugging Face hub and torch hub downloads refused for the duration (cache only)."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    patched = []
    try:
        import huggingface_hub.constants as hf_constants
        patched.append((hf_constants, "HF_HUB_OFFLINE", hf_constants.HF_HUB_OFFLINE))
        hf_constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    try:
        yield
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_pretrained(model: nn.Module, name: str, source: str) -> None:
    """Weights from timm's cache (``source="cache"``) or a file, into ``model`` in place."""
    if source == "cache":
        with _offline():
            try:
                state = _timm().create_model(name, pretrained=True, num_classes=0,
                                             in_chans=_in_chans(model)).state_dict()
            except Exception as exc:  # noqa: BLE001 (timm raises many kinds; all mean "not cached")
                raise MtlbenchError(f"no pretrained weights for timm:{name} in the local cache and no network "
                                    f"access ({type(exc).__name__}); give a weights file: --pretrained PATH") from None
    else:
        if not os.path.isfile(source):
            raise MtlbenchError(f"--pretrained {source!r}: no such file")
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise MtlbenchError(f"--pretrained {source!r} is not a loadable state dict: {exc}") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    missing, _ = model.load_state_dict(state, strict=False)
    features = [k for k in missing if not k.startswith(HEAD_NAMES)]
    if features:
        raise MtlbenchError(f"--pretrained weights miss {len(features)} tensors of timm:{name} (first: {features[0]})")


def _in_chans(model: nn.Module) -> int:
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return conv.in_channels


def feature_chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The feature part's modules in forward order: top-level children up to the head, with
    ``nn.Sequential`` children flattened one level (``blocks.3``)."""
    out = []
    for name, child in model.named_children():
        if name in HEAD_NAMES:
            break
        if isinstance(child, nn.Sequential):
            out += [(f"{name}.{k}", m) for k, m in child.named_children()]
        else:
            out.append((name, child))
    return out


def stage_blocks(model: nn.Module) -> tuple[list[nn.Sequential], list[str]]:
    """The chain cut after each ``feature_info`` module; trailing modules join the last block."""
    chain = feature_chain(model)
    names = [n for n, _ in chain]
    cuts = []
    for info in getattr(model, "feature_info", []):
        module = info["module"] if isinstance(info, dict) else None
        inside = [i for i, n in enumerate(names) if n == module or n.startswith(f"{module}.")]
        if inside:  # the stage's module, or the last of its flattened children
            cuts.append(inside[-1])
    if not cuts:
        cuts = [len(chain) - 1]
    cuts[-1] = len(chain) - 1
    blocks, start = [], 0
    for cut in sorted(set(cuts)):
        blocks.append(nn.Sequential(*[m for _, m in chain[start:cut + 1]]))
        start = cut + 1
    return blocks, [names[c] for c in sorted(set(cuts))]


def _stride(model: nn.Module) -> int:
    info = getattr(model, "feature_info", None)
    try:
        return int(info[-1]["reduction"])
    except (TypeError, KeyError, IndexError):
        return 32


@register_backbone("timm", "Any timm CNN, as --backbone timm:NAME (e.g. timm:resnet18): its feature stages, "
                           "global average pooling; --pretrained optional.")
def timm_backbone(cfg: TimmConfig, model_name: str = "") -> Backbone:
    if not model_name:
        raise MtlbenchError("backbone timm needs a model name: --backbone timm:NAME, e.g. timm:resnet18")
    model = _create(model_name, cfg.in_channels)
    if cfg.pretrained:
        load_pretrained(model, model_name, cfg.pretrained)
    min_input = cfg.min_input or _stride(model)
    blocks, cut_names = stage_blocks(model)
    scale = shift = None
    mean, std = model.pretrained_cfg.get("mean"), model.pretrained_cfg.get("std")
    renorm = bool(cfg.pretrained and cfg.data_mean and mean and len(mean) == cfg.in_channels)
    if renorm:  # x_model = (x_raw - mean) / std, where x_raw = x_data * data_std + data_mean
        d_mean, d_std = torch.tensor(cfg.data_mean), torch.tensor(cfg.data_std)
        scale, shift = d_std / torch.tensor(std), (d_mean - torch.tensor(mean)) / torch.tensor(std)
    blocks[0].insert(0, Prepare(min_input, scale, shift))
    channels = _check_chain(model, blocks, model_name, cfg.in_channels, min_input)
    backbone = Backbone(blocks, channels)
    backbone.details = {
        "timm_model": model_name, "stage_ends": cut_names,
        "input_resize": f"inputs with a side below {min_input} px are resized up to {min_input} (bilinear)",
        "pretrained": cfg.pretrained or "no (random init)",
        "normalisation": ({"data_mean": list(cfg.data_mean), "data_std": list(cfg.data_std),
                           "model_mean": list(mean), "model_std": list(std)} if renorm else "the dataset's"),
        "head": "the model's head replaced by global average pooling",
    }
    return backbone


timm_backbone.config_class = TimmConfig
timm_backbone.takes_model = True

_CHECKED: dict[tuple, list[int]] = {}


def _check_chain(model: nn.Module, blocks: list[nn.Sequential], name: str, in_channels: int,
                 size: int) -> list[int]:
    """Each block's output channels; refuses a model whose chain is not its ``forward_features``."""
    key = (name, in_channels, size)
    if key not in _CHECKED:
        x = torch.randn(2, in_channels, size, size, generator=torch.Generator().manual_seed(0))
        was = model.training
        model.eval()
        with torch.no_grad():
            prepared = blocks[0][0](x)  # the Prepare step: its affine (pretrained) applies to both
            expected = model.forward_features(prepared) if hasattr(model, "forward_features") else None
            channels, y = [], x
            for block in blocks:
                y = block(y)
                channels.append(y.shape[1])
        model.train(was)
        if expected is None or expected.shape != y.shape or not torch.allclose(expected, y, atol=1e-5, rtol=1e-4):
            raise MtlbenchError(f"timm:{name}: its feature part is not a plain chain of its modules, so mtlbench "
                                "cannot cut it into stages; this model is not supported")
        _CHECKED[key] = channels
    return list(_CHECKED[key])
