"""WebDataset tar shards as training data: each sample is the members of a tar file that share a key.

The WebDataset convention: a member's key is its path up to the first dot of its file name
("part/000123.jpg" and "part/000123.txt" are sample "part/000123"); a sample has one image (.jpg, .jpeg,
.png, .webp, .bmp) and a caption in .txt, or in .json under "text" or "caption". Shards are indexed once
(headers only: tarfile skips over member data), then every image is read by random access at its byte
offset, so a process reads only the images of its own rows, whichever shard holds them.
"""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclasses.dataclass(frozen=True)
class Member:
    """One file inside a tar shard: where its bytes are."""

    shard: Path
    name: str
    offset: int  # of the data, in bytes from the start of the shard
    size: int

    def read(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.shard} is truncated: {self.name} needs {self.size} bytes at {self.offset}")
        return data

    def open(self) -> io.BytesIO:
        """The member's bytes as a file object (for PIL.Image.open)."""
        return io.BytesIO(self.read())

    def __str__(self) -> str:
        return f"{self.shard}:{self.name}"


def _key_and_suffix(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, dot, rest = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (dot + rest).lower()


def _caption(member: tarfile.TarInfo, archive: tarfile.TarFile, suffix: str) -> str | None:
    raw = archive.extractfile(member).read().decode("utf-8", errors="replace")
    if suffix == ".txt":
        return raw.strip()
    try:
        record = json.loads(raw)
    except json.JSONDecodeError:
        return None
    text = record.get("text", record.get("caption")) if isinstance(record, dict) else None
    return text.strip() if isinstance(text, str) else None


def scan_shard(shard: Path, problems: list[str]) -> list[tuple[Member, str]]:
    """(image member, caption) of every complete sample of one shard, in the shard's order; samples
    without an image or a caption are noted in `problems`."""
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(shard, "r:") as archive:
            for info in archive:
                if not info.isfile():
                    continue
                key, suffix = _key_and_suffix(info.name)
                entry = samples.setdefault(key, {})
                if suffix in IMAGE_SUFFIXES:
                    entry["image"] = Member(shard, info.name, info.offset_data, info.size)
                elif suffix in (".txt", ".json") and "caption" not in entry:
                    caption = _caption(info, archive, suffix)
                    if caption:
                        entry["caption"] = caption
    except (tarfile.TarError, OSError) as err:
        problems.append(f"cannot read shard {shard}: {err}")
        return []
    out = []
    for key, entry in samples.items():
        if "image" not in entry:
            problems.append(f"{shard}: sample {key} has no image ({', '.join(IMAGE_SUFFIXES)})")
        elif "caption" not in entry:
            problems.append(f'{shard}: sample {key} has no caption (.txt, or .json with "text")')
        else:
            out.append((entry["image"], entry["caption"]))
    return out


def shard_paths(root: Path) -> list[Path]:
    """The .tar shards of `root` (a .tar file, or a folder holding them, searched recursively), sorted."""
    if root.is_file():
        return [root] if root.suffix == ".tar" else []
    return sorted(p for p in root.rglob("*.tar") if p.is_file())
