"""Packs an image folder into one ArrayRecord file, once, for fast streaming.

Each record keeps the image file's bytes as they are (no re-encoding), so decoding a record and
decoding the file give the same pixels at every image size: a folder and its conversion give the
same batches. Records are written one per chunk (``group_size:1``) for random access, without
compression (JPEG and PNG are compressed already).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from nanlab.data import DataError, _describe, list_image_folder
from nanlab.streaming._sources import (
    ARRAY_RECORD_SUFFIX,
    BadImage,
    FolderSource,
    encode_header,
    encode_record,
)

WRITER_OPTIONS = "group_size:1,uncompressed"
CHECK_SIZE = 8  # a tiny decode that still runs each file's whole decoder


def convert_folder(folder: str | os.PathLike, out: str | os.PathLike, *, on_bad_image: str = "error") -> dict:
    """Writes `folder` (one subfolder per class) to the ArrayRecord file `out`.

    Every image is decoded once on the way (a corrupt file fails here, not hours into training).
    The output appears only when complete: it is written under a temporary name and renamed.

    Args:
      folder: an image folder, as for ``--data``.
      out: the output path, ending in ``.array_record``.
      on_bad_image: ``"error"`` (DataError naming the file, nothing written) or ``"skip"``
        (left out, named in the result).

    Returns:
      {"images": count written, "classes": class names, "skipped": [names of skipped files]}.

    Raises:
      DataError: a bad folder layout, an unreadable image (under "error"), an existing or
        unwritable output.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    folder, out = Path(folder), Path(out)
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be error or skip, got {on_bad_image!r}")
    if out.suffix != ARRAY_RECORD_SUFFIX:
        raise DataError(f"output {out} must end in {ARRAY_RECORD_SUFFIX}")
    if out.exists():
        raise DataError(f"output {out} exists; remove it or choose another name")
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder (one subfolder per class)")
    class_names, files, class_index = list_image_folder(folder)
    probe = FolderSource(folder, files, class_index[:, None], class_names, CHECK_SIZE)
    keep, skipped = [], []
    for i, name in enumerate(files):
        try:
            probe.image(i)
            keep.append(i)
        except BadImage as error:
            if on_bad_image == "error":
                raise DataError(str(error)) from None
            skipped.append(str(folder / name))
    if len({int(class_index[i]) for i in keep}) < 2:
        raise DataError(f"{folder}: fewer than 2 classes have readable images")
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    except OSError as error:
        raise DataError(f"cannot write {out}: {_describe(error)}") from None
    os.close(handle)
    try:
        writer = ArrayRecordWriter(temporary, WRITER_OPTIONS)
        writer.write(encode_header(class_names, class_index[keep]))
        for i in keep:
            writer.write(encode_record(int(class_index[i]), files[i], (folder / files[i]).read_bytes()))
        writer.close()
        os.replace(temporary, out)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise DataError(f"cannot write {out}: {_describe(error)}") from None
        raise
    return {"images": len(keep), "classes": list(class_names), "skipped": skipped}
