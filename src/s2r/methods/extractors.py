"""The frozen torchvision backbones of paper 1 (`extractor-autoencoder-pirl-triplet`), cut at its layer "level -3":
shared by the extractor autoencoders (`ae`) and the Scratch / Pre-trained baselines (`classifier`). Holds no
method (the registry skips it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import cast

import torch
from torch import nn

from s2r.config import ConfigError

log = logging.getLogger(__name__)

# torchvision constructor, weights enum and the cut at the paper's layer "level -3" (appendix A.2.1).
EXTRACTORS: dict[str, tuple[str, str]] = {
    "vgg11": ("vgg11", "VGG11_Weights"),
    "resnet50": ("resnet50", "ResNet50_Weights"),
    "densenet121": ("densenet121", "DenseNet121_Weights"),
}
EXTRACTOR_CHANNELS = {"vgg11": 512, "resnet50": 1024, "densenet121": 1024}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
def expected_weights_file(name: str) -> Path:
    """Where torchvision looks for `name`'s ImageNet weights: $TORCH_HOME/hub/checkpoints/<file of its URL>."""
    import torchvision

    enum = getattr(torchvision.models, EXTRACTORS[name][1])
    url = enum.IMAGENET1K_V1.url
    out: Path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    return out


def build_extractor(name: str, weights: str, seed: int = 0) -> nn.Module:
    """The frozen backbone cut at layer "level -3" (appendix A.2.1), weights as `extractor_weights` says."""
    cut = cut_level3(name, load_torchvision_model(name, weights, seed))
    cut.eval()
    for p in cut.parameters():
        p.requires_grad_(False)
    return cut


def load_torchvision_model(name: str, weights: str, seed: int = 0) -> nn.Module:
    """The whole torchvision model `name` with `extractor_weights` (shared with the classification baselines).

    `imagenet` goes through torchvision's own weights API, which reads the torchvision cache layout
    ($TORCH_HOME/hub/checkpoints/<file>) before trying to download; offline, a missing file is an error naming
    it (never a silent fallback). `none` is a random initialisation from `seed`, logged as such. Any other
    value is a path to a state dict of the full torchvision model.
    """
    import torchvision

    if name not in EXTRACTORS:
        raise ConfigError(f"key 'methods.ae.extractor': unknown extractor {name!r}; known: {sorted(EXTRACTORS)}")
    ctor = getattr(torchvision.models, EXTRACTORS[name][0])
    if weights == "imagenet":
        path = expected_weights_file(name)
        if not path.is_file():
            raise FileNotFoundError(
                f"methods.ae.extractor_weights: imagenet: {name}'s ImageNet weights are not in the torchvision "
                f"cache; expected {path} (set TORCH_HOME, copy the file there, or set extractor_weights to a "
                f"local file or to 'none' for a random initialisation)"
            )
        model = ctor(weights=getattr(torchvision.models, EXTRACTORS[name][1]).IMAGENET1K_V1)
        log.info("extractor %s: ImageNet weights from %s", name, path)
    elif weights == "none":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ctor(weights=None)
        log.warning("extractor %s: RANDOM initialisation (extractor_weights: none, seed %d) - NOT ImageNet "
                    "features; set extractor_weights: imagenet with the weights file in the torchvision cache",
                    name, seed)
    else:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"methods.ae.extractor_weights: {path} does not exist")
        model = ctor(weights=None)
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ConfigError(f"methods.ae.extractor_weights: {path} is not a {name} state dict: {e}") from e
        log.info("extractor %s: weights from %s", name, path)
    out: nn.Module = model
    return out


def cut_level3(name: str, model: nn.Module) -> nn.Module:
    """The layers of a torchvision model up to the paper's layer "level -3" (appendix A.2.1), sharing its modules."""
    if name == "resnet50":
        return nn.Sequential(*list(model.children())[:-3])  # conv1 ... layer3 (ends in Bottleneck (5))
    features = cast(nn.Sequential, model.get_submodule("features"))  # torchvision's VGG / DenseNet layers
    # VGG-11: (16) Conv2d(512, 512) + (17) ReLU, the 7th conv; DenseNet-121: conv0 ... denseblock3 (denselayer24)
    return features[:18] if name == "vgg11" else features[:-3]
