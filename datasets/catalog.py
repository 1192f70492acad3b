"""The catalogue of remote-sensing scene datasets, and how a dataset name resolves to files on disk.

Pure module (no Dassl import): one :class:`DatasetInfo` row per dataset in :data:`CATALOG`, the dataset
config keys (:func:`add_dataset_config`), and one resolution path (:func:`spec_from_cfg`, used by both
:func:`resolve_dataset` and the Dassl dataset classes) from a config to a :class:`DatasetSpec`.

Class names are the folder names on disk; their order in ``classnames`` is the label order of the
official split file (which is not alphabetical) or, for datasets without one, the label order of the
generated split.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yacs.config import CfgNode

from common.errors import ExpectedError

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs" / "datasets"
GENERIC_NAME = "ImageFolderRS"
DEFAULT_TEMPLATE = "a photo of a {}."
SPLIT_URL = "https://raw.githubusercontent.com/mainaksingha01/APPLeNet/master/json/{}.json"
GENERATED_SPLIT_FILE = "split_generated.json"
FEWSHOT_DIR = "split_fewshot"
DOWNLOADS_DIR = "downloads"


# --------------------------------------------------------------------------------------------- errors
class DatasetError(ExpectedError):
    """Base class of every dataset error (bad layout, bad split file, failed download)."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset folder, image folder or split file is missing; the message says how to prepare it."""


class ChecksumError(DatasetError, ValueError):
    """A file's md5 differs from the catalogue's."""


class SplitError(DatasetError, ValueError):
    """A split file or an image tree is inconsistent (bad entry, missing images, empty class folder)."""


class ManualDownloadRequired(DatasetNotFoundError):
    """The images have no direct public download; the message says what to download and where to put it."""


class CorruptImageError(DatasetError, ValueError):
    """Image files that cannot be decoded (found by ``tools.prepare_data --verify``)."""


# ------------------------------------------------------------------------------------------ catalogue
_NOT_STATED = "Not stated by the authors; distributed for academic research use."


@dataclass(frozen=True)
class DatasetInfo:
    """One catalogue row; a row states only what differs from the defaults.

    ``images_source`` is ``gdrive:<file id>``, an ``http(s)://`` URL, ``generated`` (built offline by
    ``tools.prepare_data``) or ``manual:<what to download and from where>``. ``dir`` defaults to ``name``,
    ``num_classes`` to the number of ``classnames`` and ``split_url`` (when there is a ``split_file``) to the
    APPLeNet repository's copy of that file.
    """

    name: str
    classnames: tuple[str, ...]
    images_source: str
    citation: str
    dir: str = ""
    num_classes: int = 0
    display_names: dict[str, str] = field(default_factory=dict)
    split_file: str | None = None
    split_md5: str | None = None
    split_url: str | None = None
    split_sizes: tuple[int, int, int] | None = None  # train/val/test of the official split file
    num_images: int | None = None  # images of a row without a split file (the generated split's sizes follow)
    images_md5: str | None = None
    template: str = DEFAULT_TEMPLATE
    license: str = _NOT_STATED
    homepage: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if not self.dir:
            object.__setattr__(self, "dir", self.name)
        if self.num_classes and self.num_classes != len(self.classnames):
            raise ValueError(f"{self.name}: num_classes {self.num_classes} but {len(self.classnames)} classnames")
        object.__setattr__(self, "num_classes", len(self.classnames))
        if self.split_file and self.split_url is None:
            object.__setattr__(self, "split_url", SPLIT_URL.format(Path(self.split_file).stem))

    @property
    def source_kind(self) -> str:
        """``gdrive``, ``url``, ``generated`` or ``manual``."""
        return source_kind(self.images_source)


def source_kind(source: str) -> str:
    """Classify an ``images_source`` string: ``gdrive``, ``url``, ``generated`` or ``manual``."""
    if source.startswith("gdrive:"):
        return "gdrive"
    if source.startswith(("http://", "https://")):
        return "url"
    if source == "generated":
        return "generated"
    return "manual"


_V2_CLASSES = (
    "baseballfield", "sparse_residential", "harbor", "intersection", "forest", "bridge", "overpass",
    "railway", "parking", "meadow", "river", "desert", "stadium", "storage_tank", "dense_residential",
    "beach",
)  # fmt: skip
_V2_DISPLAY = {"baseballfield": "baseball field"}
_APPLENET_CITATION = (
    "M. Singha, A. Jha, B. Solanki, S. Bose, B. Banerjee. APPLeNet: Visual Attention Parameterized "
    "Prompt Learning for Few-Shot Remote Sensing Image Generalization using CLIP. CVPR Workshops, 2023."
)
_V2_LICENSE = (
    "Re-distribution by the APPLeNet authors of images from {src}; the source dataset's terms apply "
    "(academic research use)."
)


def _v2(name: str, src: str, drive_id: str, md5: str, sizes: tuple[int, int, int]) -> DatasetInfo:
    return DatasetInfo(
        name=name,
        classnames=_V2_CLASSES,
        display_names=dict(_V2_DISPLAY),
        split_file=f"{name.lower()}.json",
        split_md5=md5,
        split_sizes=sizes,
        images_source=f"gdrive:{drive_id}",
        license=_V2_LICENSE.format(src=src),
        citation=_APPLENET_CITATION,
        homepage="https://github.com/mainaksingha01/APPLeNet",
        description=f"The 16 classes {src} shares with the other v2 sets (domain-generalisation protocol).",
    )


_ROWS = (
    DatasetInfo(
        name="PatternNet",
        classnames=(
            "oil_well", "runway", "baseball_field", "sparse_residential", "parking_lot", "oil_gas_field",
            "wastewater_treatment_plant", "crosswalk", "swimming_pool", "shipping_yard", "harbor",
            "intersection", "forest", "nursing_home", "mobile_home_park", "bridge", "closed_road",
            "coastal_mansion", "golf_course", "runway_marking", "overpass", "transformer_station",
            "tennis_court", "railway", "basketball_court", "christmas_tree_farm", "parking_space",
            "cemetery", "river", "solar_panel", "chaparral", "ferry_terminal", "storage_tank",
            "dense_residential", "beach", "football_field", "freeway", "airplane",
        ),  # fmt: skip
        split_file="patternnet.json",
        split_md5="16b950df95ab777eb9bcc8a402660652",
        images_source="gdrive:127lxXYqzO6Bd0yZhvEbgIfz95HaEnr9K",
        images_md5="96d54b3224c5350a98d55d5a7e6984ad",
        citation=(
            "W. Zhou, S. Newsam, C. Li, Z. Shao. PatternNet: A benchmark dataset for performance "
            "evaluation of remote sensing image retrieval. ISPRS J. Photogramm. Remote Sens. 145, 2018."
        ),
        homepage="https://sites.google.com/view/zhouwx/dataset",
        description="30,400 images, 256x256 px, 38 classes x 800 (Google Earth / Google Maps API).",
        split_sizes=(14896, 6384, 9120),
    ),
    DatasetInfo(
        name="RSICD",
        classnames=(
            "center", "farmland", "baseballfield", "playground", "industrial", "storagetanks", "resort",
            "forest", "bridge", "port", "railwaystation", "sparseresidential", "viaduct", "airport",
            "denseresidential", "school", "mountain", "park", "commercial", "parking",
            "mediumresidential", "meadow", "pond", "river", "bareland", "desert", "church", "stadium",
            "square", "beach",
        ),  # fmt: skip
        display_names={
            "baseballfield": "baseball field",
            "storagetanks": "storage tanks",
            "railwaystation": "railway station",
            "sparseresidential": "sparse residential",
            "denseresidential": "dense residential",
            "mediumresidential": "medium residential",
            "bareland": "bare land",
        },
        split_file="rsicd.json",
        split_md5="428f0a39f30fc83ec0ce3501e0e9fdf3",
        images_source=(
            "manual:Download the RSICD images (the folder RSICD_images, 10,921 .jpg files, as an archive "
            "or extracted) from the links in the README of https://github.com/201528014227051/RSICD_optimal"
        ),
        citation=(
            "X. Lu, B. Wang, X. Zheng, X. Li. Exploring Models and Data for Remote Sensing Image Caption "
            "Generation. IEEE TGRS 56(4), 2018."
        ),
        homepage="https://github.com/201528014227051/RSICD_optimal",
        description="10,000 of the RSICD captioning images in 30 scene classes, 224x224 px.",
        split_sizes=(4887, 2112, 3001),
    ),
    DatasetInfo(
        name="RESISC45",
        classnames=(
            "runway", "lake", "sparse_residential", "wetland", "parking_lot", "roundabout", "terrace",
            "sea_ice", "baseball_diamond", "harbor", "palace", "ship", "intersection", "forest",
            "ground_track_field", "mobile_home_park", "commercial_area", "bridge", "island",
            "golf_course", "thermal_power_station", "airport", "mountain", "overpass",
            "industrial_area", "tennis_court", "railway", "cloud", "basketball_court",
            "circular_farmland", "meadow", "railway_station", "river", "chaparral", "desert", "church",
            "stadium", "medium_residential", "rectangular_farmland", "snowberg", "storage_tank",
            "dense_residential", "beach", "freeway", "airplane",
        ),  # fmt: skip
        split_file="resisc45.json",
        split_md5="c4ab31f5cac405b31383e2e88a23748e",
        images_source=(
            "https://hf.co/datasets/isaaccorley/resisc45/resolve/"
            "883edc0eee77b2c84225472f10f126e3ed83fa6e/NWPU-RESISC45.zip"
        ),
        images_md5="75206b2e16446591afa88e2628744886",
        citation=(
            "G. Cheng, J. Han, X. Lu. Remote Sensing Image Scene Classification: Benchmark and State of "
            "the Art. Proceedings of the IEEE 105(10), 2017."
        ),
        homepage="https://gcheng-nwpu.github.io/#Datasets",
        description="NWPU-RESISC45: 31,500 images, 256x256 px, 45 classes x 700.",
        split_sizes=(15435, 6615, 9450),
    ),
    DatasetInfo(
        name="MLRSNet",
        classnames=(
            "airplane", "airport", "bareland", "baseball_diamond", "basketball_court", "beach", "bridge",
            "chaparral", "cloud", "commercial_area", "dense_residential_area", "desert",
            "eroded_farmland", "farmland", "forest", "freeway", "golf_course", "ground_track_field",
            "harbor&port", "industrial_area", "intersection", "island", "lake", "meadow",
            "mobile_home_park", "mountain", "overpass", "park", "parking_lot", "parkway", "railway",
            "railway_station", "river", "roundabout", "shipping_yard", "snowberg",
            "sparse_residential_area", "stadium", "storage_tank", "swimmimg_pool", "tennis_court",
            "terrace", "transmission_tower", "vegetable_greenhouse", "wetland", "wind_turbine",
        ),  # fmt: skip
        display_names={"bareland": "bare land", "harbor&port": "harbor and port", "swimmimg_pool": "swimming pool"},
        images_source=(
            "manual:Download the MLRSNet images (folder Images: one .rar archive per class) from "
            "https://data.mendeley.com/datasets/7j9bv9vwsx/3"
        ),
        license="CC BY 4.0 (Mendeley Data record).",
        citation=(
            "X. Qi, P. Zhu, Y. Wang, L. Zhang, J. Peng, M. Wu, J. Chen, X. Zhao, N. Zang, P. T. Mathiopoulos. "
            "MLRSNet: A multi-label high spatial resolution remote sensing dataset for semantic scene "
            "understanding. ISPRS J. Photogramm. Remote Sens. 169, 2020."
        ),
        homepage="https://github.com/cugbrs/MLRSNet",
        description="109,161 images, 256x256 px, 46 scene categories (the folder names; labels are multi-label).",
        num_images=109161,
    ),
    _v2("PatternNetv2", "PatternNet", "1K-GZ2KjQ3hn17JJBrxnmXsTxAFeg2XUT", "e45b3d511eaa31001d443c44cd6b50f0",
        (6272, 2688, 3840)),
    _v2("RSICDv2", "RSICD", "1uhlTHQCHkE0KD04YGBAKsxPgG14eQez_", "bec509a1c997484328ccbe9b2c5954c6",
        (2620, 1132, 1608)),
    _v2("RESISC45v2", "RESISC45", "1Zfsko5swyQqu5HiuRwZe5jIGoUKfBgxq", "e74eb46a4f90ea4c2da8e327a2de2ecf",
        (5488, 2352, 3360)),
    _v2("MLRSNetv2", "MLRSNet", "1OJrAwU1i9hYe7kEsHIIq_TodJDiwnnAz", "ec405a4d571d41981bc284ae6701ca25",
        (19163, 8219, 11741)),
    DatasetInfo(
        name="UCMerced",
        classnames=(
            "agricultural", "airplane", "baseballdiamond", "beach", "buildings", "chaparral",
            "denseresidential", "forest", "freeway", "golfcourse", "harbor", "intersection",
            "mediumresidential", "mobilehomepark", "overpass", "parkinglot", "river", "runway",
            "sparseresidential", "storagetanks", "tenniscourt",
        ),  # fmt: skip
        display_names={
            "agricultural": "agricultural land",
            "baseballdiamond": "baseball diamond",
            "denseresidential": "dense residential",
            "golfcourse": "golf course",
            "mediumresidential": "medium residential",
            "mobilehomepark": "mobile home park",
            "parkinglot": "parking lot",
            "sparseresidential": "sparse residential",
            "storagetanks": "storage tanks",
            "tenniscourt": "tennis court",
        },
        images_source=(
            "https://hf.co/datasets/torchgeo/ucmerced/resolve/"
            "7c5ef3454d9b1cccfa7ccde0c01fc8f00a45909a/UCMerced_LandUse.zip"
        ),
        images_md5="5b7ec56793786b6dc8a908e8854ac0e4",
        license="Public-domain imagery (USGS National Map Urban Area Imagery); cite the paper.",
        citation=(
            "Y. Yang, S. Newsam. Bag-of-visual-words and spatial extensions for land-use classification. "
            "ACM SIGSPATIAL GIS, 2010."
        ),
        homepage="http://weegee.vision.ucmerced.edu/datasets/landuse.html",
        description="2,100 images (.tif), 256x256 px, 21 classes x 100, 1 ft per pixel.",
        num_images=2100,
    ),
    DatasetInfo(
        name="AID",
        classnames=(
            "Airport", "BareLand", "BaseballField", "Beach", "Bridge", "Center", "Church", "Commercial",
            "DenseResidential", "Desert", "Farmland", "Forest", "Industrial", "Meadow",
            "MediumResidential", "Mountain", "Park", "Parking", "Playground", "Pond", "Port",
            "RailwayStation", "Resort", "River", "School", "SparseResidential", "Square", "Stadium",
            "StorageTanks", "Viaduct",
        ),  # fmt: skip
        images_source=(
            "manual:Download AID (10,000 .jpg images in 30 class folders, archive AID.zip or AID.rar) from "
            "the OneDrive or Baidu links on https://captain-whu.github.io/AID/"
        ),
        citation=(
            "G.-S. Xia, J. Hu, F. Hu, B. Shi, X. Bai, Y. Zhong, L. Zhang, X. Lu. AID: A Benchmark Data Set "
            "for Performance Evaluation of Aerial Scene Classification. IEEE TGRS 55(7), 2017."
        ),
        homepage="https://captain-whu.github.io/AID/",
        description="10,000 images, 600x600 px, 30 classes (220-420 each), Google Earth.",
        num_images=10000,
    ),
    DatasetInfo(
        name="WHURS19",
        dir="WHU-RS19",
        classnames=(
            "Airport", "Beach", "Bridge", "Commercial", "Desert", "Farmland", "footballField", "Forest",
            "Industrial", "Meadow", "Mountain", "Park", "Parking", "Pond", "Port", "railwayStation",
            "Residential", "River", "Viaduct",
        ),  # fmt: skip
        images_source=(
            "manual:Download WHU-RS19 (1,005 .jpg images in 19 class folders, archive WHU-RS19.zip) from "
            "the CAPTAIN group's dataset page https://captain-whu.github.io/BED4RS/ (or a mirror of it)"
        ),
        citation=(
            "D. Dai, W. Yang. Satellite Image Classification via Two-Layer Sparse Coding With Biased Image "
            "Representation. IEEE GRSL 8(1), 2011."
        ),
        homepage="https://captain-whu.github.io/BED4RS/",
        description="1,005 images, 600x600 px, 19 classes (about 50 each), Google Earth.",
        num_images=1005,
    ),
    DatasetInfo(
        name="EuroSAT",
        classnames=(
            "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
            "PermanentCrop", "Residential", "River", "SeaLake",
        ),  # fmt: skip
        display_names={
            "AnnualCrop": "annual crop land",
            "HerbaceousVegetation": "herbaceous vegetation land",
            "Highway": "highway or road",
            "Industrial": "industrial buildings",
            "Pasture": "pasture land",
            "PermanentCrop": "permanent crop land",
            "Residential": "residential buildings",
            "SeaLake": "sea or lake",
        },
        images_source=(
            "https://hf.co/datasets/torchgeo/eurosat/resolve/"
            "c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip"
        ),
        images_md5="c8fa014336c82ac7804f0398fcb19387",
        template="a centered satellite photo of {}.",
        license="MIT (https://github.com/phelber/EuroSAT).",
        citation=(
            "P. Helber, B. Bischke, A. Dengel, D. Borth. EuroSAT: A Novel Dataset and Deep Learning "
            "Benchmark for Land Use and Land Cover Classification. IEEE JSTARS 12(7), 2019."
        ),
        homepage="https://github.com/phelber/EuroSAT",
        description="27,000 Sentinel-2 RGB images, 64x64 px, 10 classes (2,000-3,000 each).",
        num_images=27000,
    ),
    DatasetInfo(
        name="OPTIMAL31",
        dir="OPTIMAL-31",
        classnames=(
            "airplane", "airport", "baseball_diamond", "basketball_court", "beach", "bridge",
            "chaparral", "church", "circular_farmland", "commercial_area", "dense_residential",
            "desert", "forest", "freeway", "golf_course", "ground_track_field", "harbor",
            "industrial_area", "intersection", "island", "lake", "meadow", "medium_residential",
            "mobile_home_park", "mountain", "overpass", "parking_lot", "railway",
            "rectangular_farmland", "roundabout", "runway",
        ),  # fmt: skip
        images_source=(
            "manual:Download OPTIMAL-31 (1,860 .jpg images in 31 class folders) as distributed by the "
            "authors of Wang et al., TGRS 2019 (Q. Wang's group, Northwestern Polytechnical University); "
            "there is no stable official direct link"
        ),
        citation=(
            "Q. Wang, S. Liu, J. Chanussot, X. Li. Scene Classification With Recurrent Attention of VHR "
            "Remote Sensing Images. IEEE TGRS 57(2), 2019."
        ),
        description="1,860 images, 256x256 px, 31 classes x 60, Google Earth.",
        num_images=1860,
    ),
    DatasetInfo(
        name="ToyRS",
        classnames=("farmland", "water", "road", "buildings", "forest", "desert", "parking_lot", "river"),
        images_source="generated",
        license="Generated by this repository (datasets/toyrs.py); same licence as the code.",
        citation="None: procedurally drawn aerial-like scenes for smoke runs and tests.",
        description="480 procedurally drawn aerial-like PNG images, 64x64 px, 8 classes x 60, deterministic.",
        num_images=480,
    ),
)

CATALOG: dict[str, DatasetInfo] = {row.name: row for row in _ROWS}


# --------------------------------------------------------------------------------------------- config
_DATASET_DEFAULTS: dict[str, Any] = {
    "SUBSAMPLE_CLASSES": "all",  # all | base | new (base-to-new protocol)
    "FOLDER": "",  # folder under DATASET.ROOT (ImageFolderRS; overrides a catalogue row's folder)
    "SPLIT_FILE": "",  # split file, relative to the dataset folder or absolute
    "SPLIT_MD5": "",  # expected md5 of SPLIT_FILE ("" = do not check)
    "TEMPLATE": "",  # prompt template with one {} ("" = the catalogue's, or "a photo of a {}.")
    "ALLOW_SPLIT_MISMATCH": False,  # accept a split file whose md5 differs from the expected one
}


def add_dataset_config(cfg: CfgNode) -> CfgNode:
    """Add the dataset keys our dataset classes read, with defaults that keep upstream behaviour.

    Only missing keys are added, so calling it twice (or on a config that already has them) is safe.
    ``DATASET.CLASSNAME_MAP`` is a node that accepts new keys from yaml (``raw folder name: display name``).
    """
    if "DATASET" not in cfg:
        cfg.DATASET = CfgNode()
    node = cfg.DATASET
    for key, value in _DATASET_DEFAULTS.items():
        if key not in node:
            node[key] = value
    if "CLASSNAME_MAP" not in node:
        node.CLASSNAME_MAP = CfgNode(new_allowed=True)
    return cfg


def _dataset_cfg(name: str, root: str | Path) -> CfgNode:
    cfg = CfgNode()
    cfg.DATASET = CfgNode(new_allowed=True)
    cfg.DATASET.NAME = name
    cfg.DATASET.ROOT = str(root)
    return add_dataset_config(cfg)


# ----------------------------------------------------------------------------------------------- spec
def humanize(raw: str) -> str:
    """Default display name: ``_``/``-`` to spaces, camelCase split, lower case (``BareLand`` -> ``bare land``).

    CLIP's tokenizer lower-cases text anyway; for the published datasets this equals their
    ``name.replace("_", " ")``.
    """
    text = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", raw.replace("_", " ").replace("-", " "))
    return " ".join(text.split()).lower()


@dataclass
class DatasetSpec:
    """Where one dataset lives on disk and how its class names are shown in prompts."""

    name: str
    dataset_dir: Path
    image_dir: Path
    split_path: Path | None
    split_md5: str | None
    classname_map: dict[str, str]
    template: str
    generated_split_path: Path
    fewshot_dir: Path
    root: Path
    classnames: tuple[str, ...] | None = None  # label order for a generated split (catalogue rows)
    allow_split_mismatch: bool = False
    split_sizes: tuple[int, int, int] | None = None
    info: DatasetInfo | None = None
    ref: str = ""  # what to pass to `python -m tools.prepare_data`

    def display_name(self, raw: str) -> str:
        """The class name put into prompts for the folder name ``raw``."""
        return self.classname_map.get(raw) or humanize(raw)

    @property
    def label(self) -> str:
        """The dataset's name in messages: the catalogue name, or the folder name for ``ImageFolderRS``."""
        return self.dataset_dir.name if self.info is None else self.name

    @property
    def prepare_command(self) -> str:
        """The command line that prepares this dataset."""
        return prepare_command(self.ref or self.name, self.root)


def prepare_command(dataset: str, root: str | Path) -> str:
    """The exact command line that prepares ``dataset`` (config stem, yaml path or name) under ``root``."""
    return f"python -m tools.prepare_data {dataset} --root {root}"


def _config_stem(name: str) -> str:
    return name.lower()


def spec_from_cfg(cfg: CfgNode, ref: str | None = None) -> DatasetSpec:
    """Build the :class:`DatasetSpec` of ``cfg.DATASET`` (a catalogue name or ``ImageFolderRS``).

    Non-empty ``FOLDER``, ``SPLIT_FILE``, ``SPLIT_MD5``, ``TEMPLATE`` and ``CLASSNAME_MAP`` entries
    override the catalogue row. ``ref`` is the argument shown in "prepare it with" messages.
    """
    node = cfg.DATASET
    name = str(node.NAME)
    info = CATALOG.get(name)
    if info is None and name != GENERIC_NAME:
        raise DatasetError(
            f"Unknown dataset name DATASET.NAME={name!r}. Use one of {', '.join(CATALOG)}, or "
            f"{GENERIC_NAME!r} with DATASET.FOLDER set (see docs/datasets.md, 'Adding a dataset')."
        )
    folder = str(node.get("FOLDER", "") or (info.dir if info else ""))
    if not folder:
        raise DatasetError(
            f"DATASET.NAME {GENERIC_NAME!r} needs DATASET.FOLDER: the folder under --root that holds "
            "images/<class>/<file> (add `FOLDER: \"MyScenes\"` to the dataset yaml)."
        )
    root_raw = str(node.get("ROOT", "") or "")
    if not root_raw:
        raise DatasetError("DATASET.ROOT is empty: pass --root DATA (the folder that holds the datasets).")
    root = Path(root_raw).expanduser().absolute()
    dataset_dir = root / folder

    split_file = str(node.get("SPLIT_FILE", "") or "")
    split_md5 = str(node.get("SPLIT_MD5", "") or "") or None
    split_sizes = None
    if split_file:
        if info is not None and split_md5 is None and split_file == info.split_file:
            split_md5, split_sizes = info.split_md5, info.split_sizes
    elif info is not None and info.split_file:
        split_file = info.split_file
        split_md5 = split_md5 or info.split_md5
        split_sizes = info.split_sizes
    split_path = dataset_dir / split_file if split_file else None

    classname_map = dict(info.display_names) if info else {}
    classname_map.update({str(k): str(v) for k, v in dict(node.get("CLASSNAME_MAP", {}) or {}).items()})

    template = str(node.get("TEMPLATE", "") or (info.template if info else DEFAULT_TEMPLATE))
    if template.count("{}") != 1:
        raise DatasetError(
            f"DATASET.TEMPLATE {template!r} must contain exactly one '{{}}' where the class name goes, "
            "e.g. 'a satellite photo of a {}.'"
        )
    if ref is None:
        ref = _config_stem(name) if info else "<your dataset yaml>"
    return DatasetSpec(
        name=name,
        dataset_dir=dataset_dir,
        image_dir=dataset_dir / "images",
        split_path=split_path,
        split_md5=split_md5,
        classname_map=classname_map,
        template=template,
        generated_split_path=dataset_dir / GENERATED_SPLIT_FILE,
        fewshot_dir=dataset_dir / FEWSHOT_DIR,
        root=root,
        classnames=info.classnames if info else None,
        allow_split_mismatch=bool(node.get("ALLOW_SPLIT_MISMATCH", False)),
        split_sizes=split_sizes,
        info=info,
        ref=ref,
    )


def load_dataset_yaml(path: str | Path, root: str | Path = "") -> CfgNode:
    """Read the ``DATASET`` node of a dataset yaml into a fresh config (other top-level keys are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"Dataset config {path} does not exist.")
    with path.open() as f:
        loaded = CfgNode.load_cfg(f)
    if "DATASET" not in loaded or "NAME" not in loaded.DATASET:
        raise DatasetError(f"{path} has no DATASET.NAME: a dataset yaml starts with `DATASET:\\n  NAME: ...`.")
    cfg = _dataset_cfg(str(loaded.DATASET.NAME), root)
    cfg.DATASET.merge_from_other_cfg(loaded.DATASET)
    if root:
        cfg.DATASET.ROOT = str(root)
    return cfg


def config_files() -> dict[str, Path]:
    """The dataset configs shipped in ``configs/datasets/`` (examples excluded), by file stem."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.yaml"))}


def resolve_dataset(dataset: str, root: str | Path) -> DatasetSpec:
    """Resolve a config stem (``patternnet``), a dataset yaml path or a catalogue name to a spec."""
    text = str(dataset)
    path = Path(text).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        cfg = load_dataset_yaml(path, root)
    elif (CONFIG_DIR / f"{text}.yaml").is_file():
        cfg = load_dataset_yaml(CONFIG_DIR / f"{text}.yaml", root)
    else:
        matches = [name for name in CATALOG if name.lower() == text.lower()]
        if not matches:
            raise DatasetError(
                f"Unknown dataset {text!r}: give a config stem ({', '.join(config_files()) or 'none found'}), "
                f"a path to a dataset yaml, or a catalogue name ({', '.join(CATALOG)})."
            )
        cfg = _dataset_cfg(matches[0], root)
    return spec_from_cfg(cfg, ref=text)
