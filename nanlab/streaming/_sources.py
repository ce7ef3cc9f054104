"""Random-access image sources: an image folder, an ``.npz`` file, an ArrayRecord file.

A source is a small picklable object (Grain sends it to every worker process) with

* ``len(source)``: the number of examples, in a fixed order (for a folder: classes in sorted
  order, files sorted by name inside each -- the order of `nanlab.data.load_dataset`);
* ``source.image(i)``: example i decoded and resized to ``image_size`` (uint8 (S, S, 3) for
  images; the stored dtype for an ``.npz``, see `NpzSource`), or `BadImage` with a one-line
  message naming the file;
* ``source.labels``: float32 (N, K) labels, held in memory (K floats per example);
* ``source.name_of(i)``: what to call example i in a message.

Files are opened lazily in each process, so pickling a source never copies pixels.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import struct
import tempfile
import weakref
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from nanlab.data import (DataError, IMAGE_SUFFIXES, _describe, _is_image_file, _resize_images,
                         check_finite_array, check_npz_arrays, labels_from_class_index, list_image_folder)

ARRAY_RECORD_SUFFIX = ".array_record"
# Record 0 of a nanlab ArrayRecord file: this magic, then a JSON header (format, class names, count,
# the class index of every example).
HEADER_MAGIC = b"NANLAB-IMAGES\x00"
FORMAT_VERSION = 1
# Records 1..N: a little-endian uint32 length, that many bytes of JSON {"label", "name"}, then the
# image file's bytes exactly as they were on disk (decoding is the same as for the folder).
_LENGTH = struct.Struct("<I")


class BadImage(Exception):
    """An example that cannot be decoded; the message is one line naming the file."""


def decode_image(data: bytes | Path, image_size: int) -> np.ndarray:
    """Decodes an encoded image (bytes or a path) to uint8 RGB (S, S, 3), bilinear resize.

    The same operations as `nanlab.data`'s in-memory loader (``convert("RGB")`` then
    ``resize(..., BILINEAR)``), whose float32 pixels are these uint8 values.
    """
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
        rgb = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8)


@dataclasses.dataclass(eq=False)
class FolderSource:
    """One subfolder per class; decodes with Pillow in whichever process asks."""

    root: Path
    files: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    image_size: int

    kind = "folder"

    @classmethod
    def open(cls, root: Path, image_size: int) -> "FolderSource":
        class_names, files, class_index = list_image_folder(root)
        return cls(root, files, labels_from_class_index(class_index, len(class_names)), class_names, image_size)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, 3)

    image_dtype = np.dtype(np.uint8)

    def name_of(self, index: int) -> str:
        return str(self.root / self.files[index])

    def image(self, index: int) -> np.ndarray:
        path = self.root / self.files[index]
        try:
            return decode_image(path, self.image_size)
        # Pillow's decoders raise many types (UnidentifiedImageError, OSError for truncation,
        # SyntaxError, ValueError, DecompressionBombError): any of them means "unreadable".
        except Exception as error:
            raise BadImage(f"unreadable image {path}: {_describe(error)}") from None

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": self.kind, "class_names": list(self.class_names), "files": list(self.files)}


# --------------------------------------------------------------------------------------------
# ArrayRecord
# --------------------------------------------------------------------------------------------


def encode_header(class_names: tuple[str, ...], class_index: np.ndarray) -> bytes:
    """Record 0: the class names and every record's class index (read once when opening, so the
    labels never need a pass over the images)."""
    header = {"format": "nanlab-images", "version": FORMAT_VERSION, "class_names": list(class_names),
              "count": int(len(class_index)), "class_index": [int(i) for i in class_index]}
    return HEADER_MAGIC + json.dumps(header).encode()


def encode_record(label: int, name: str, payload: bytes) -> bytes:
    meta = json.dumps({"label": label, "name": name}).encode()
    return _LENGTH.pack(len(meta)) + meta + payload


def decode_record(record: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = _LENGTH.unpack_from(record)
    meta = json.loads(record[_LENGTH.size:_LENGTH.size + length])
    return meta, record[_LENGTH.size + length:]


@dataclasses.dataclass(eq=False)
class ArrayRecordSource:
    """A folder packed by `nanlab.streaming.convert_folder`: record 0 is the header, record i+1
    holds example i (label, original name, the image file's bytes)."""

    path: Path
    labels: np.ndarray
    class_names: tuple[str, ...]
    image_size: int
    file_size: int

    kind = "array_record"

    @classmethod
    def open(cls, path: Path, image_size: int) -> "ArrayRecordSource":
        import grain

        try:
            records = grain.sources.ArrayRecordDataSource(str(path))
            num_records = len(records)
            first = records[0] if num_records else b""
        except Exception as error:  # the C++ reader raises RuntimeError/ValueError for a bad file
            raise DataError(f"unreadable ArrayRecord file {path}: {_describe(error)}") from None
        if not first.startswith(HEADER_MAGIC):
            raise DataError(f"{path} is not a nanlab image ArrayRecord (convert a folder with "
                            "python -m nanlab.data convert FOLDER OUT.array_record)")
        try:
            header = json.loads(first[len(HEADER_MAGIC):])
            version = header.get("version")
            class_names, count = tuple(str(n) for n in header["class_names"]), int(header["count"])
            class_index = np.asarray(header["class_index"], np.int64)
        except Exception as error:
            raise DataError(f"{path}: corrupt header record: {_describe(error)}") from None
        if version != FORMAT_VERSION:
            raise DataError(f"{path}: format version {version} is not {FORMAT_VERSION}")
        if count != num_records - 1 or class_index.shape != (count,):
            raise DataError(f"{path}: the header lists {class_index.size} images of {count}, "
                            f"the file holds {num_records - 1}")
        if len(class_names) < 2 or count == 0:
            raise DataError(f"{path}: {len(class_names)} class(es), {count} image(s); need >= 2 classes")
        if class_index.min() < 0 or class_index.max() >= len(class_names):
            raise DataError(f"{path}: a record's label is outside the {len(class_names)} classes")
        labels = labels_from_class_index(class_index, len(class_names))
        return cls(path, labels, class_names, image_size, path.stat().st_size)

    def __post_init__(self):
        self._records = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_records"] = None  # each process opens its own reader
        return state

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, 3)

    image_dtype = np.dtype(np.uint8)

    def _record(self, index: int) -> bytes:
        if self._records is None:
            import grain

            self._records = grain.sources.ArrayRecordDataSource(str(self.path))
        return self._records[index + 1]

    def name_of(self, index: int) -> str:
        try:
            return f"{self.path}[{index}] ({decode_record(self._record(index))[0]['name']})"
        except Exception:
            return f"{self.path}[{index}]"

    def image(self, index: int) -> np.ndarray:
        try:
            meta, payload = decode_record(self._record(index))
            return decode_image(payload, self.image_size)
        except Exception as error:
            raise BadImage(f"unreadable image {self.name_of(index)}: {_describe(error)}") from None

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": self.kind, "class_names": list(self.class_names), "count": len(self),
                "file_size": self.file_size}


# --------------------------------------------------------------------------------------------
# .npz
# --------------------------------------------------------------------------------------------


def _npy_header(raw) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy array starting at the file's position."""
    if np.lib.format.read_magic(raw) == (1, 0):
        return np.lib.format.read_array_header_1_0(raw)
    return np.lib.format.read_array_header_2_0(raw)


def _npy_member(archive: zipfile.ZipFile, path: Path, key: str) -> tuple[Path, int, tuple, np.dtype, Any]:
    """Locates ``key.npy`` inside an .npz for memory mapping.

    A stored (np.savez) member is mapped in place; a deflated one (np.savez_compressed) is first
    copied, decompressed, to a temporary .npy file, in chunks (the memory stays small).

    Returns:
      (file, data offset, shape, dtype, cleanup finalizer or None).
    """
    info = archive.getinfo(f"{key}.npy")
    cleanup = None
    if info.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as raw:
            raw.seek(info.header_offset)
            local = raw.read(30)
            if local[:4] != b"PK\x03\x04":
                raise DataError(f"{path}: corrupt zip member {key}.npy")
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            raw.seek(info.header_offset + 30 + name_length + extra_length)
            shape, fortran, dtype = _npy_header(raw)
            offset, file = raw.tell(), path
    else:
        handle, name = tempfile.mkstemp(suffix=".npy", prefix="nanlab-npz-")
        file = Path(name)
        with os.fdopen(handle, "wb") as out, archive.open(info) as member:
            shutil.copyfileobj(member, out, 1 << 20)
        cleanup = file
        with open(file, "rb") as raw:
            shape, fortran, dtype = _npy_header(raw)
            offset = raw.tell()
    if fortran:
        raise DataError(f"{path}: {key} is stored in Fortran order; save a C-ordered array")
    return file, offset, shape, dtype, cleanup


@dataclasses.dataclass(eq=False)
class NpzSource:
    """``x`` (N, H, W, C) or (N, H, W) memory-mapped from the .npz, ``y`` (N,) or (N, K) in memory.

    Pixels come out in the stored dtype when it is uint8 and already at ``image_size``; otherwise
    as float32 resized like `nanlab.data`'s loader (its values exactly). A non-finite pixel or
    label is bad input, found when the file is opened (`DataError`), unless it is opened with
    ``allow_nonfinite=True`` (``--allow-nonfinite-data``: reproducing such a failure on purpose).
    """

    path: Path
    x_file: Path
    x_offset: int
    x_shape: tuple[int, ...]
    x_dtype: np.dtype
    labels: np.ndarray
    image_size: int
    file_size: int

    kind = "npz"
    allow_nonfinite: bool = False

    @classmethod
    def open(cls, path: Path, image_size: int, allow_nonfinite: bool = False) -> "NpzSource":
        try:
            archive = zipfile.ZipFile(path)
        except Exception as error:
            raise DataError(f"unreadable .npz file {path}: {_describe(error)}") from None
        cleanup = None
        with archive:
            names = [name[:-4] for name in archive.namelist() if name.endswith(".npy")]
            missing = [key for key in ("x", "y") if key not in names]
            if missing:
                raise DataError(f"{path}: missing array(s) {', '.join(missing)}; found {names}")
            try:
                x_file, x_offset, x_shape, x_dtype, cleanup = _npy_member(archive, path, "x")
                with archive.open("y.npy") as member:
                    y = np.lib.format.read_array(member, allow_pickle=False)
            except DataError:
                raise
            except ValueError:
                raise DataError(f"{path}: x or y holds arrays of mixed shapes (an object array); save one "
                                "array x of shape (N, H, W, C) or (N, H, W)") from None
            except Exception as error:
                raise DataError(f"unreadable .npz file {path}: {_describe(error)}") from None
        source = None
        try:
            y = check_npz_arrays(path, x_shape, x_dtype, y, allow_nonfinite)
            source = cls(path, x_file, x_offset, tuple(x_shape), x_dtype, y, image_size, path.stat().st_size,
                         allow_nonfinite)
            if not allow_nonfinite:
                source.check_finite()
        finally:
            if cleanup is not None:
                if source is None:
                    cleanup.unlink(missing_ok=True)
                else:
                    # The temporary copy lives as long as the source in this (the main) process.
                    source._cleanup = weakref.finalize(source, cleanup.unlink, missing_ok=True)
        return source

    def __post_init__(self):
        self._x = None
        self._cleanup = None

    def check_finite(self, chunk: int = 256) -> None:
        """Refuse NaN/inf pixels before any run starts: one pass over the memory-mapped images, in
        chunks, so the file is never held in memory (integers are skipped: always finite)."""
        if not np.issubdtype(self.x_dtype, np.inexact):
            return
        x = np.memmap(self.x_file, self.x_dtype, "r", offset=self.x_offset, shape=self.x_shape)
        for start in range(0, self.x_shape[0], chunk):
            check_finite_array(self.path, "x", np.asarray(x[start:start + chunk]), first=start)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_x"] = None
        state["_cleanup"] = None  # only the process that made a temporary copy deletes it
        return state

    def __len__(self) -> int:
        return self.x_shape[0]

    @property
    def image_dtype(self) -> np.dtype:
        same_size = tuple(self.x_shape[1:3]) == (self.image_size, self.image_size)
        return np.dtype(np.uint8) if self.x_dtype == np.uint8 and same_size else np.dtype(np.float32)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        channels = self.x_shape[3] if len(self.x_shape) == 4 else 1
        return (self.image_size, self.image_size, channels)

    def name_of(self, index: int) -> str:
        return f"{self.path}: x[{index}]"

    def image(self, index: int) -> np.ndarray:
        if self._x is None:
            self._x = np.memmap(self.x_file, self.x_dtype, "r", offset=self.x_offset, shape=self.x_shape)
        try:
            pixels = np.asarray(self._x[index])
        except Exception as error:
            raise BadImage(f"unreadable {self.name_of(index)}: {_describe(error)}") from None
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        if self.image_dtype == np.uint8:
            return pixels
        pixels = pixels.astype(np.float32)
        if not self.allow_nonfinite and not np.isfinite(pixels).all():
            where = tuple(int(i) for i in np.argwhere(~np.isfinite(pixels))[0])
            raise BadImage(f"{self.name_of(index)} has a non-finite pixel at {list(where)}: "
                           f"{pixels[where]!r}")
        return _resize_images(pixels[None], self.image_size)[0]

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": self.kind, "x_shape": list(self.x_shape), "x_dtype": str(self.x_dtype),
                "num_labels": int(self.labels.shape[1]), "file_size": self.file_size}

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(f"label_{k}" for k in range(self.labels.shape[1]))


def open_source(spec: str | os.PathLike, image_size: int, allow_nonfinite: bool = False):
    """The source named by a ``--data`` value: a folder, an ``.npz`` or an ``.array_record`` file.

    ``allow_nonfinite`` lets NaN/inf pixels and labels of an .npz through (decoded images are
    always finite).

    Raises:
      DataError: a missing path, an unknown kind of file, or what the source's ``open`` checks.
    """
    path = Path(spec)
    if not path.exists():
        raise DataError(f"data path does not exist: {spec} (use builtin, builtin-multilabel, a folder, "
                        f"an .npz or an {ARRAY_RECORD_SUFFIX} file)")
    if path.is_dir():
        return FolderSource.open(path, image_size)
    if path.suffix.lower() == ".npz":
        return NpzSource.open(path, image_size, allow_nonfinite)
    if path.suffix.lower() == ARRAY_RECORD_SUFFIX:
        return ArrayRecordSource.open(path, image_size)
    raise DataError(f"data path {spec} is neither a folder, an .npz nor an {ARRAY_RECORD_SUFFIX} file")
