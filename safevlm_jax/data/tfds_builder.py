"""TFDS builder: SafeVLM JSON + image folder -> array_record shards, plus `report.json`.

Each example stores the encoded image bytes as found on disk (checked to decode first), the turns
as JSON text, and the labels; no TensorFlow is needed to build or read. Records are assigned
to `validation` when a fixed hash of their `id` falls below `validation_fraction`, so the split
never changes when records are added or reordered. Bad records are skipped and counted by
reason (`errors.REASONS`), or with `strict` the first one raises `BadRecord` naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from safevlm_jax.data import images
from safevlm_jax.data.errors import BadRecord
from safevlm_jax.data.records import Record, check_records, load_json

REPORT_FILE = "report.json"


@dataclasses.dataclass
class BuildReport:
    """What the build did: kept examples per split, skipped ones per reason and by record."""

    json_path: str
    image_root: str
    total: int = 0
    kept: dict[str, int] = dataclasses.field(default_factory=lambda: {"train": 0, "validation": 0})
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped_records: list[dict[str, str]] = dataclasses.field(default_factory=list)

    def skip(self, error: BadRecord) -> None:
        self.skipped[error.reason] = self.skipped.get(error.reason, 0) + 1
        self.skipped_records.append(error.to_json())

    def save(self, directory: str) -> str:
        path = os.path.join(directory, REPORT_FILE)
        with open(path, "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=2, sort_keys=True)
        return path


def is_validation(record_id: str, validation_fraction: float) -> bool:
    """Fixed split: the first 8 bytes of sha256(id) as a fraction of 2**64."""
    h = int.from_bytes(hashlib.sha256(record_id.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < validation_fraction


class SafeVlmData(tfds.core.GeneratorBasedBuilder):
    """SafeVLM records with encoded images. Build with `build_dataset`, read with
    `pipeline.data_source`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Encoded image bytes, turns as JSON text, safe_level/safe_type."}

    def __init__(self, *, json_path: str | None = None, image_root: str | None = None,
                 max_pixels: int = images.DEFAULT_MAX_PIXELS, validation_fraction: float = 0.05,
                 strict: bool = False, progress: bool = False, **kwargs):
        self._json_path, self._image_root = json_path, image_root
        self._max_pixels, self._validation_fraction = max_pixels, validation_fraction
        self._strict, self._progress = strict, progress
        self.report = BuildReport(str(json_path), str(image_root))
        super().__init__(file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded bytes
                "image_path": tfds.features.Text(),
                "conversations": tfds.features.Text(),  # JSON list of {"from", "value"}
                "safe_level": tfds.features.Tensor(shape=(), dtype=np.int32),
                "safe_type": tfds.features.Tensor(shape=(), dtype=np.int32),
            }),
        )

    # TFDS prints "Downloading and preparing dataset ..." and "... downloaded and prepared" to
    # stdout; nothing is downloaded here, and `build_dataset`'s callers report the build.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _split_generators(self, dl_manager):
        split = self._valid_records()
        if not any(split.values()):
            raise ValueError(f"{self._json_path}: no valid record (skipped: {self.report.skipped})")
        # TFDS refuses empty splits; a split with no valid record is simply absent.
        return {name: self._generate_examples(rs) for name, rs in split.items() if rs}

    def _generate_examples(self, records: Iterable[tuple[Record, bytes]]) -> Iterator[tuple[str, dict]]:
        for r, digest in records:
            with open(images.resolve_image_path(self._image_root, r.image), "rb") as f:
                data = f.read()
            if hashlib.sha256(data).digest() != digest:
                raise RuntimeError(f"record {r.id}: image {r.image!r} changed while the dataset was being built")
            yield r.id, {"id": r.id, "image": data, "image_path": r.image, "conversations": r.turns_json(),
                         "safe_level": r.safe_level, "safe_type": r.safe_type}

    def _valid_records(self) -> dict[str, list[tuple[Record, bytes]]]:
        """Per split, every record that passes all checks, with the sha256 of its image bytes.

        Images are decoded here once; examples are written from the same bytes (the digest
        guards against a file changing in between).
        """
        raw = load_json(self._json_path)
        self.report.total = len(raw)
        valid = {"train": [], "validation": []}
        for record, data in tqdm.tqdm(check_records(raw, self._image_root, self._max_pixels), total=len(raw),
                                      desc="checking records", unit="rec", disable=not self._progress):
            if isinstance(record, BadRecord):
                self._refuse(record)
                continue
            split = "validation" if is_validation(record.id, self._validation_fraction) else "train"
            self.report.kept[split] += 1
            valid[split].append((record, hashlib.sha256(data).digest()))
        return valid

    def _refuse(self, error: BadRecord) -> None:
        if self._strict:
            raise error
        self.report.skip(error)


def build_dataset(json_path: str, image_root: str, out_dir: str, *, strict: bool = False,
                  max_pixels: int = images.DEFAULT_MAX_PIXELS, validation_fraction: float = 0.05,
                  overwrite: bool = False, progress: bool = False) -> tuple[str, BuildReport]:
    """Builds the dataset under `out_dir`; returns (dataset directory, report).

    The dataset directory (`out_dir/safe_vlm_data/1.0.0`) holds the array_record shards,
    TFDS metadata and `report.json`.

    Raises:
      BadRecord: with `strict`, at the first bad record.
      FileExistsError: if the dataset exists and not `overwrite`.
    """
    builder = SafeVlmData(json_path=json_path, image_root=image_root, max_pixels=max_pixels,
                          validation_fraction=validation_fraction, strict=strict, progress=progress,
                          data_dir=out_dir)
    if os.path.exists(builder.data_dir) and not overwrite:
        raise FileExistsError(f"{builder.data_dir} already exists; pass overwrite=True (--overwrite) or another out dir")
    mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
    builder.report.save(builder.data_dir)
    return builder.data_dir, builder.report


def load_report(dataset_dir: str) -> dict:
    with open(os.path.join(dataset_dir, REPORT_FILE)) as f:
        return json.load(f)
