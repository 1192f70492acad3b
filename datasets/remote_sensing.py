"""Dassl dataset classes for every catalogue row, plus the yaml-only ``ImageFolderRS``.

Importing this module registers one ``DatasetBase`` subclass per :data:`datasets.catalog.CATALOG` key
(the registry name is the key) and ``ImageFolderRS`` with Dassl's ``DATASET_REGISTRY``. Every instance
has ``spec``, ``template`` (one ``{}``) and ``image_dir`` (absolute) attributes, and its ``Datum``
class names are the display names that trainers put into prompts.
"""

from __future__ import annotations

import logging
from collections import Counter

from dassl.data.data_manager import DatasetWrapper
from dassl.data.datasets import DATASET_REGISTRY, DatasetBase, Datum

from datasets.catalog import CATALOG, GENERIC_NAME, CorruptImageError, DatasetInfo, spec_from_cfg
from datasets.splits import VERIFY_DOES, Item, few_shot, image_decodes, load_splits, subsample_classes

logger = logging.getLogger(__name__)

# Importing dassl.data.datasets runs `logging.disable(logging.WARNING)` (its wilds module), which would
# hide every warning of the run, ours included (split mismatch allowed, ignored files). Undo only that.
if logging.getLogger().manager.disable == logging.WARNING:
    logging.disable(logging.NOTSET)


class RemoteSensingDataset(DatasetBase):
    """A scene-classification dataset laid out as ``<root>/<dir>/images/<class>/<file>``.

    Reads the official split file (or the generated 49/21/30 split), draws ``DATASET.NUM_SHOTS`` shots
    per class with ``SEED`` (cached, shared by base/new/all), then keeps ``DATASET.SUBSAMPLE_CLASSES``.
    ``shots_per_class`` (display name -> training images) records what was really drawn: a class with fewer
    training images than ``NUM_SHOTS`` gives all it has (with a warning).
    """

    def __init__(self, cfg):
        self.spec = spec_from_cfg(cfg)
        self.dataset_dir = str(self.spec.dataset_dir)
        self.image_dir = str(self.spec.image_dir)
        self.template = self.spec.template
        splits = load_splits(self.spec)
        num_shots = int(cfg.DATASET.NUM_SHOTS)
        if num_shots >= 1:
            splits = few_shot(splits, num_shots, int(cfg.SEED), self.spec.fewshot_dir)
        subsample = str(cfg.DATASET.get("SUBSAMPLE_CLASSES", "all"))
        train, val, test = subsample_classes(splits["train"], splits["val"], splits["test"], subsample=subsample)
        logger.info(
            "%s: %d train / %d val / %d test images (%s classes, %s shots)",
            self.spec.label, len(train), len(val), len(test), subsample, num_shots if num_shots >= 1 else "all",
        )  # fmt: skip
        counts = Counter(cls for _, _, cls in train)
        self.shots_per_class = {self.spec.display_name(cls): counts[cls] for cls in dict.fromkeys(c for *_, c in train)}
        short = {name: n for name, n in self.shots_per_class.items() if n < num_shots}
        if short:
            shown = ", ".join(f"{name} {n}" for name, n in list(short.items())[:8]) + (", ..." if len(short) > 8 else "")
            logger.warning(
                "!!! DATASET.NUM_SHOTS is %d, but %d of %d classes have fewer training images, so they train on all "
                "they have: %s. results.json records the real count per class (shots_per_class).",
                num_shots, len(short), len(self.shots_per_class), shown,
            )  # fmt: skip
        super().__init__(train_x=self._datums(train), val=self._datums(val), test=self._datums(test))

    def _datums(self, items: list[Item]) -> list[Datum]:
        return [
            Datum(impath=str(self.spec.image_dir / rel), label=label, classname=self.spec.display_name(cls))
            for rel, label, cls in items
        ]


class NamedImageErrors(DatasetWrapper):
    """Dassl's dataset wrapper, but an image that cannot be read is an error naming the file and the fix."""

    def __getitem__(self, idx: int) -> dict:
        try:
            return super().__getitem__(idx)
        except (OSError, SyntaxError, ValueError) as exc:  # PIL: truncated, unidentified or broken files
            impath = self.data_source[idx].impath
            if image_decodes(impath):
                raise  # the image is fine: the error is elsewhere (a transform), keep it as it is
            command = spec_from_cfg(self.cfg).prepare_command
            raise CorruptImageError(
                f"cannot read image {impath} ({exc}). Run `{command} --verify`: {VERIFY_DOES}."
            ) from exc


class ImageFolderRS(RemoteSensingDataset):
    """Any folder of class sub-folders, configured entirely from yaml (see docs/datasets.md).

    Keys: ``DATASET.FOLDER`` (required), ``SPLIT_FILE``/``SPLIT_MD5`` (optional; otherwise a seeded
    49/21/30 split is generated once), ``CLASSNAME_MAP`` (folder name -> prompt name), ``TEMPLATE``.
    """


def _dataset_class(info: DatasetInfo) -> type[RemoteSensingDataset]:
    doc = (
        f"{info.name}: {info.description}\n\n"
        f"Classes ({info.num_classes}, label order): {', '.join(info.classnames)}.\n"
        f"Source: {info.homepage or info.images_source}\nLicence: {info.license}\nCitation: {info.citation}\n"
    )
    return type(info.name, (RemoteSensingDataset,), {"__doc__": doc, "__module__": __name__})


DATASET_CLASSES: dict[str, type[RemoteSensingDataset]] = {name: _dataset_class(info) for name, info in CATALOG.items()}
DATASET_CLASSES[GENERIC_NAME] = ImageFolderRS

for _name, _cls in DATASET_CLASSES.items():
    if _name not in DATASET_REGISTRY.registered_names():
        DATASET_REGISTRY.register(_cls)
