"""The embedding file format: one ``.npz`` per result part, readable with numpy alone.

Two arrays, no pickles (``numpy.load(path, allow_pickle=False)`` reads it):

- ``ids``: the image ids, a fixed-width unicode array (``<U{n}``), in request order;
- ``embeddings``: ``float16 [len(ids), dim]``, L2-normalised (cosine similarity = dot product).

Row ``i`` of ``embeddings`` is the vector of ``ids[i]``. Only images that were embedded are in the file
(an image with an error entry is not). ``write_embeddings`` returns the bytes (the handler stores them);
``read_embeddings`` parses bytes back, refusing anything but these two well-formed arrays.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence

import numpy as np

__all__ = ["EMBEDDINGS_CONTENT_TYPE", "EMBEDDINGS_SUFFIX", "EmbeddingFileError", "declared_array_bytes", "read_embeddings",
           "write_embeddings"]

EMBEDDINGS_SUFFIX = ".npz"
EMBEDDINGS_CONTENT_TYPE = "application/octet-stream"
MAX_MEMBER_BYTES = 1 << 31
"""A member that declares more uncompressed bytes than this is refused before it is read."""


class EmbeddingFileError(ValueError):
    """Bytes that are not an embedding file of this format."""


def write_embeddings(ids: Sequence[str], vectors: np.ndarray) -> bytes:
    """The ``.npz`` bytes of ``ids`` and their vectors (stored as float16)."""
    array = np.asarray(vectors)
    if array.ndim != 2 or array.shape[0] != len(ids):
        raise ValueError(f"vectors must be [len(ids), dim]; got {array.shape} for {len(ids)} ids")
    buffer = io.BytesIO()
    np.savez(buffer, ids=np.asarray(list(ids), dtype=np.str_) if ids else np.zeros(0, dtype="<U1"),
             embeddings=array.astype(np.float16))
    return buffer.getvalue()


def declared_array_bytes(data: bytes) -> int:
    """The bytes the file's two arrays take once read, from their ``.npy`` headers alone (shape x item size; a
    few hundred bytes of each member are decompressed, never the arrays): what a compressed file costs in memory
    before :func:`read_embeddings` allocates it. EmbeddingFileError for anything but this format's two members."""
    total = 0
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = {info.filename: info for info in archive.infolist()}
            if set(members) != {"ids.npy", "embeddings.npy"}:
                raise EmbeddingFileError(f"expected ids.npy and embeddings.npy, found {sorted(members)[:5]}")
            for name in ("ids.npy", "embeddings.npy"):
                with archive.open(members[name]) as member:
                    version = np.lib.format.read_magic(member)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(member)
                if dtype.hasobject:
                    raise EmbeddingFileError(f"{name} holds Python objects")
                total += int(np.prod(shape, dtype=object)) * dtype.itemsize
    except EmbeddingFileError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, KeyError, EOFError) as exc:
        raise EmbeddingFileError(f"not an embedding file: {exc}") from exc
    return total


def read_embeddings(data: bytes) -> tuple[list[str], np.ndarray]:
    """(ids, float16 ``[N, dim]`` vectors) from :func:`write_embeddings` bytes; EmbeddingFileError otherwise."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = {info.filename: info for info in archive.infolist()}
            if set(members) != {"ids.npy", "embeddings.npy"}:
                raise EmbeddingFileError(f"expected ids.npy and embeddings.npy, found {sorted(members)[:5]}")
            if any(info.file_size > MAX_MEMBER_BYTES for info in members.values()):
                raise EmbeddingFileError("a member is larger than an embedding file may be")
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                ids = npz["ids"]
                vectors = npz["embeddings"]
    except EmbeddingFileError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, KeyError, EOFError) as exc:
        raise EmbeddingFileError(f"not an embedding file: {exc}") from exc
    if ids.ndim != 1 or ids.dtype.kind != "U":
        raise EmbeddingFileError(f"ids must be a 1-d unicode array, got {ids.dtype} {ids.shape}")
    if vectors.ndim != 2 or vectors.shape[0] != ids.shape[0] or vectors.dtype != np.float16:
        raise EmbeddingFileError(f"embeddings must be float16 [{ids.shape[0]}, dim], got {vectors.dtype} {vectors.shape}")
    return [str(i) for i in ids.tolist()], vectors
