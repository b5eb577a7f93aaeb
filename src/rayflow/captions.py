"""Image-caption data in the layouts diffusers' training examples read, and the image transform of those scripts.

Specs (``--data`` of ``rayflow distill --teacher PIPE_DIR``):

* ``captions:path=DIR`` - an ``imagefolder``: images plus ``metadata.jsonl`` with one JSON object per line,
  ``{"file_name": "0001.png", "text": "a photo of ..."}`` (``file_name`` relative to ``DIR``). When ``DIR`` holds
  no ``metadata.jsonl`` but a ``datasets`` folder written by ``Dataset.save_to_disk`` (``dataset_info.json`` /
  ``state.json``), or webdataset ``*.tar`` shards, those are read instead.
* ``captions:path=FILE.tar`` - one webdataset shard; members grouped by key, ``jpg|jpeg|png|webp`` + ``txt|caption``.
* ``prompts:path=FILE`` - prompts only (one per line, or JSON lines with ``text``), for methods whose data are
  the teacher's own samples.

Options: ``image_column=`` / ``caption_column=`` (``datasets`` folders; defaults ``image`` / ``text``),
``limit=N`` (first N records).

Every caption record is checked up front (missing image files, bad JSON lines, empty folders): a one-line
:class:`RayflowError` names the file and line instead of a failure hours into preprocessing.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from rayflow.errors import RayflowError, require

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_WDS_IMAGE = ("jpg", "jpeg", "png", "webp")
_WDS_TEXT = ("txt", "caption")


@dataclass
class CaptionRecord:
    """One training example: a caption and a way to read its image (``None`` for prompts-only data)."""

    text: str
    load_image: Callable[[], Image.Image] | None
    source: str  # file (and member) name, for error messages


@dataclass
class CaptionData:
    records: list[CaptionRecord]
    spec: str
    has_images: bool

    def __len__(self) -> int:
        return len(self.records)

    @property
    def texts(self) -> list[str]:
        return [r.text for r in self.records]


def _open_image(path: Path) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise RayflowError(f"{path}: cannot read the image ({exc})") from exc

    return load


def _bytes_image(data: bytes, where: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        try:
            with Image.open(io.BytesIO(data)) as im:
                return im.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise RayflowError(f"{where}: cannot read the image ({exc})") from exc

    return load


def _read_metadata(directory: Path) -> list[CaptionRecord]:
    meta = directory / "metadata.jsonl"
    records = []
    for lineno, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RayflowError(f"{meta}:{lineno}: not a JSON line ({exc.msg})") from exc
        require(isinstance(obj, dict) and isinstance(obj.get("file_name"), str) and isinstance(obj.get("text"), str),
                f"{meta}:{lineno}: expected an object with string \"file_name\" and \"text\"")
        path = directory / obj["file_name"]
        require(path.is_file(), f"{meta}:{lineno}: image {obj['file_name']!r} does not exist in {directory}")
        records.append(CaptionRecord(obj["text"], _open_image(path), str(path)))
    return records


def _read_webdataset(shards: list[Path]) -> list[CaptionRecord]:
    records = []
    for shard in shards:
        try:
            with tarfile.open(shard) as tar:
                groups: dict[str, dict[str, bytes]] = {}
                for member in tar:
                    if not member.isfile():
                        continue
                    name = member.name
                    base = name.rsplit("/", 1)[-1]
                    if "." not in base:
                        continue
                    key, ext = name[: len(name) - len(base)] + base.split(".", 1)[0], base.split(".", 1)[1].lower()
                    f = tar.extractfile(member)
                    if f is not None and ext in _WDS_IMAGE + _WDS_TEXT:
                        groups.setdefault(key, {})[ext] = f.read()
        except (tarfile.TarError, OSError) as exc:
            raise RayflowError(f"{shard}: not a readable tar shard ({exc})") from exc
        for key, parts in groups.items():
            img = next((parts[e] for e in _WDS_IMAGE if e in parts), None)
            txt = next((parts[e] for e in _WDS_TEXT if e in parts), None)
            require(img is not None and txt is not None,
                    f"{shard}: sample {key!r} needs an image (jpg/png/webp) and a caption (txt/caption)")
            where = f"{shard}:{key}"
            records.append(CaptionRecord(txt.decode("utf-8").strip(), _bytes_image(img, where), where))
    return records


def _read_hf_dataset(directory: Path, image_column: str, caption_column: str) -> list[CaptionRecord]:
    try:
        import datasets
    except ModuleNotFoundError as exc:
        raise RayflowError(f"{directory}: reading a `datasets` folder needs the optional dependency "
                           "(pip install 'rayflow[datasets]')") from exc
    try:
        ds = datasets.load_from_disk(str(directory))
    except Exception as exc:  # datasets raises several types for a bad folder
        raise RayflowError(f"{directory}: cannot load the datasets folder ({str(exc).splitlines()[0]})") from exc
    if isinstance(ds, datasets.DatasetDict):
        require("train" in ds, f"{directory}: a DatasetDict without a 'train' split")
        ds = ds["train"]
    for col in (image_column, caption_column):
        require(col in ds.column_names, f"{directory}: no column {col!r} (columns: {', '.join(ds.column_names)})")
    records = []
    for i in range(len(ds)):
        def load(i: int = i) -> Image.Image:
            img = ds[i][image_column]
            if isinstance(img, dict) and img.get("bytes") is not None:
                img = Image.open(io.BytesIO(img["bytes"]))
            require(isinstance(img, Image.Image), f"{directory}: row {i}: column {image_column!r} is not an image")
            return img.convert("RGB")

        records.append(CaptionRecord(str(ds[i][caption_column]), load, f"{directory}[{i}]"))
    return records


def _read_prompts(path: Path) -> list[CaptionRecord]:
    require(path.is_file(), f"{path}: no such prompts file")
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        text = line.strip()
        if text.startswith("{"):
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise RayflowError(f"{path}:{lineno}: not a JSON line ({exc.msg})") from exc
            require(isinstance(obj, dict) and isinstance(obj.get("text"), str),
                    f"{path}:{lineno}: expected an object with a string \"text\"")
            text = obj["text"]
        records.append(CaptionRecord(text, None, f"{path}:{lineno}"))
    return records


def load_captions(spec: str) -> CaptionData:
    """Read a ``captions:`` or ``prompts:`` spec (module doc); every record is validated, images are read lazily."""
    from rayflow.data import parse_spec

    name, opts = parse_spec(spec)
    require(name in ("captions", "prompts"), f"--data {spec!r}: a pipeline teacher needs captions:path=DIR or "
                                             "prompts:path=FILE")
    require("path" in opts, f"--data {spec!r}: give path=...")
    known = {"path", "image_column", "caption_column", "limit"}
    unknown = sorted(set(opts) - known)
    require(not unknown, f"--data {spec!r}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    path = Path(opts["path"]).expanduser()
    if name == "prompts":
        records = _read_prompts(path)
    elif path.is_file() and path.suffix == ".tar":
        records = _read_webdataset([path])
    else:
        require(path.is_dir(), f"{path}: no such caption folder")
        if (path / "metadata.jsonl").is_file():
            records = _read_metadata(path)
        elif (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            records = _read_hf_dataset(path, opts.get("image_column", "image"), opts.get("caption_column", "text"))
        elif sorted(path.glob("*.tar")):
            records = _read_webdataset(sorted(path.glob("*.tar")))
        else:
            raise RayflowError(f"{path}: no metadata.jsonl, datasets folder or *.tar shards here")
    if "limit" in opts:
        try:
            limit = int(opts["limit"])
        except ValueError as exc:
            raise RayflowError(f"--data {spec!r}: limit must be an integer") from exc
        require(limit >= 1, f"--data {spec!r}: limit must be >= 1")
        records = records[:limit]
    require(len(records) > 0, f"--data {spec!r}: no records")
    canonical = f"{name}:path={path.resolve()}" + (f",limit={opts['limit']}" if "limit" in opts else "")
    return CaptionData(records, canonical, has_images=name == "captions")


def transform_image(image: Image.Image, resolution: int, center_crop: bool, flip: bool,
                    generator: torch.Generator) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """diffusers' ``train_text_to_image`` transform: resize the short side to ``resolution`` (bilinear), crop
    ``resolution``² (centre, or a random crop drawn from ``generator``), optionally flip, map to ``[-1, 1]``.

    Returns ``(image [3, R, R], original (h, w), crop top-left (top, left))`` - the last two are SDXL's
    ``add_time_ids`` inputs.
    """
    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    resized = image.resize((nw, nh), Image.BILINEAR)
    if center_crop:
        top, left = int(round((nh - resolution) / 2.0)), int(round((nw - resolution) / 2.0))
    else:
        top = int(torch.randint(0, nh - resolution + 1, (1,), generator=generator))
        left = int(torch.randint(0, nw - resolution + 1, (1,), generator=generator))
    crop = np.asarray(resized.crop((left, top, left + resolution, top + resolution)), dtype=np.float32)
    x = torch.from_numpy(crop).permute(2, 0, 1) / 127.5 - 1.0
    if flip:
        x = x.flip(-1)
    return x, (h, w), (top, left)


__all__ = ["CaptionData", "CaptionRecord", "load_captions", "transform_image"]
