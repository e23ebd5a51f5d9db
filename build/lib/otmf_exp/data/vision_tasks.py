"""The 20 CLIP vision tasks (TA8 / TALL14 / TALL20): hub suffixes, datasets, columns, splits, prompts.

Task names are the exact hub suffixes of FusionBench's fine-tuned towers
(``tanganke/clip-vit-base-patch32_<task>``). Class names (``vision_classnames.json``) follow the
label order of the listed datasets; they are the standard CLIP / task_vectors names as used by
FusionBench, with one fix: CIFAR-100's ``cra`` typo is ``crab`` (torchvision's name). Templates
are the standard CLIP zero-shot templates (Radford et al. 2021; Ilharco et al. 2023 task_vectors).

Each template is a ``str.format`` pattern with one field ``{c}`` (the class name).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

#: TA8 then the 6 TALL14 additions then the 6 TALL20 additions (standard order)
TASKS20 = [
    "sun397",
    "stanford-cars",
    "resisc45",
    "eurosat",
    "svhn",
    "gtsrb",
    "mnist",
    "dtd",
    "oxford_flowers102",
    "pcam",
    "fer2013",
    "oxford-iiit-pet",
    "stl10",
    "cifar100",
    "cifar10",
    "food101",
    "fashion_mnist",
    "emnist_letters",
    "kmnist",
    "rendered-sst2",
]
VIT8, VIT14, VIT20 = TASKS20[:8], TASKS20[:14], TASKS20


@dataclass(frozen=True)
class VisionTask:
    """Where one task's images live and how to read them.

    Attributes:
        dataset: hub dataset id (``<task_seq.local_dir>/<dataset>`` offline).
        config: dataset config name, or None.
        test_split / train_split: hub split names (validation = 10% of train, seed 0).
        image / label: column names after ``rename`` (the first label column present is used).
        rename: column renames applied on load (fer2013's webdataset ``jpg``/``cls``).
        templates: zero-shot prompt patterns.
    """

    dataset: str
    templates: tuple[str, ...]
    config: str | None = None
    test_split: str = "test"
    train_split: str = "train"
    image: str = "image"
    label: tuple[str, ...] = ("label",)
    rename: dict[str, str] = field(default_factory=dict)


_PHOTO = ("a photo of a {c}.", "a photo of the {c}.")
_NUMBER = ('a photo of the number: "{c}".',)
_CARS = _PHOTO + (
    "a photo of my {c}.",
    "i love my {c}!",
    "a photo of my dirty {c}.",
    "a photo of my clean {c}.",
    "a photo of my new {c}.",
    "a photo of my old {c}.",
)
_RESISC = tuple(
    f"{kind} {view} of {art}{{c}}."
    for art in ("", "a ", "the ")
    for kind, view in (
        ("satellite", "imagery"),
        ("aerial", "imagery"),
        ("satellite", "photo"),
        ("aerial", "photo"),
        ("satellite", "view"),
        ("aerial", "view"),
    )
)
_EUROSAT = (
    "a centered satellite photo of {c}.",
    "a centered satellite photo of a {c}.",
    "a centered satellite photo of the {c}.",
)
_GTSRB = tuple(f'a {how} photo of a "{{c}}" traffic sign.' for how in ("zoomed in", "centered", "close up"))
_DTD = tuple(
    f"a photo of {art} {{c}} {what}."
    for art in ("a", "the")
    for what in ("texture", "pattern", "thing", "object")
)
_CIFAR = tuple(
    f"a {adj}photo of {art} {size}{{c}}."
    for art in ("a", "the")
    for adj, size in (
        ("", ""),
        ("blurry ", ""),
        ("black and white ", ""),
        ("low contrast ", ""),
        ("high contrast ", ""),
        ("bad ", ""),
        ("good ", ""),
        ("", "small "),
        ("", "big "),
    )
)
_FER = (
    "a photo of a {c} looking face.",
    "a photo of a face showing the emotion: {c}.",
    "a photo of a face looking {c}.",
    "a face that looks {c}.",
    "they look {c}.",
    "look at how {c} they are.",
)

VISION_TASKS: dict[str, VisionTask] = {
    "sun397": VisionTask("tanganke/sun397", _PHOTO),
    "stanford-cars": VisionTask("tanganke/stanford_cars", _CARS),
    "resisc45": VisionTask("tanganke/resisc45", _RESISC),
    "eurosat": VisionTask("tanganke/eurosat", _EUROSAT),
    "svhn": VisionTask("ufldl-stanford/svhn", _NUMBER, config="cropped_digits"),
    "gtsrb": VisionTask("tanganke/gtsrb", _GTSRB),
    "mnist": VisionTask("ylecun/mnist", _NUMBER),
    "dtd": VisionTask("tanganke/dtd", _DTD),
    "oxford_flowers102": VisionTask(
        "dpdl-benchmark/oxford_flowers102", ("a photo of a {c}, a type of flower.",)
    ),
    "pcam": VisionTask("1aurent/PatchCamelyon", ("this is a photo of {c}",)),  # bool labels -> int
    "fer2013": VisionTask("clip-benchmark/wds_fer2013", _FER, rename={"jpg": "image", "cls": "label"}),
    "oxford-iiit-pet": VisionTask("timm/oxford-iiit-pet", ("a photo of a {c}, a type of pet.",)),
    "stl10": VisionTask("tanganke/stl10", _PHOTO),
    "cifar100": VisionTask("tanganke/cifar100", _CIFAR, label=("fine_label", "label")),
    "cifar10": VisionTask("tanganke/cifar10", _CIFAR),
    "food101": VisionTask("ethz/food101", ("a photo of {c}, a type of food.",), test_split="validation"),
    "fashion_mnist": VisionTask("zalando-datasets/fashion_mnist", _PHOTO),
    "emnist_letters": VisionTask("tanganke/emnist_letters", ('a photo of the digit character: "{c}".',)),
    "kmnist": VisionTask("tanganke/kmnist", ("a photo of the character {c}.",)),
    "rendered-sst2": VisionTask("nateraw/rendered-sst2", ("a {c} review of a movie.",)),
}

#: dataset class names of the task_vectors / TALL-masks code (their checkpoint directory names)
TASK_VECTORS_NAMES = {
    "sun397": "SUN397",
    "stanford-cars": "Cars",
    "resisc45": "RESISC45",
    "eurosat": "EuroSAT",
    "svhn": "SVHN",
    "gtsrb": "GTSRB",
    "mnist": "MNIST",
    "dtd": "DTD",
    "oxford_flowers102": "Flowers102",
    "pcam": "PCAM",
    "fer2013": "FER2013",
    "oxford-iiit-pet": "OxfordIIITPet",
    "stl10": "STL10",
    "cifar100": "CIFAR100",
    "cifar10": "CIFAR10",
    "food101": "Food101",
    "fashion_mnist": "FashionMNIST",
    "emnist_letters": "EMNIST",
    "kmnist": "KMNIST",
    "rendered-sst2": "RenderedSST2",
}


@cache
def _classnames() -> dict[str, list[str]]:
    raw = json.loads((Path(__file__).with_name("vision_classnames.json")).read_text(encoding="utf-8"))
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def classnames(task: str) -> list[str]:
    """Class names of ``task`` in its dataset's label order."""
    return list(_classnames()[task])
