"""Stage 2, extract: a tar archive unpacked only after every member was checked to stay
inside the destination (no absolute paths, '..', links or special files)."""

from __future__ import annotations

import tarfile
import zlib
from pathlib import Path, PurePosixPath

from mlp.data.cifar import DataError


def _unsafe(member: tarfile.TarInfo) -> str | None:
    """Why extracting `member` could write outside the destination or make a special file."""
    name = PurePosixPath(member.name)
    if name.is_absolute():
        return "absolute path"
    if ".." in name.parts:
        return "path with '..'"
    if member.issym() or member.islnk():
        return "link"
    if not (member.isfile() or member.isdir()):
        return "device, fifo or other special file"
    return None


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract the tar (optionally compressed) `archive` into `dest`.

    Every member is checked before anything is written: an absolute path, '..', a link or a
    device / fifo raises DataError naming the member, and then nothing has been extracted.
    Extraction also uses tarfile's "data" filter. A corrupt or truncated archive raises
    DataError.
    """
    archive, dest = Path(archive), Path(dest)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                reason = _unsafe(member)
                if reason is not None:
                    raise DataError(
                        f"{archive}: refusing to extract member {member.name!r} ({reason}); "
                        "nothing was extracted. This is not a genuine CIFAR-10 archive: use the "
                        "official one."
                    )
            dest.mkdir(parents=True, exist_ok=True)
            # The "data" filter exists from Python 3.11.4 on (Debian 12 ships 3.11.2); the
            # members were already checked one by one above, so it is a second line of defense.
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(dest, members=members, **extra)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(
            f"{archive}: cannot extract ({type(e).__name__}: {e}). If the archive is corrupt or "
            "truncated, delete it and fetch it again."
        ) from e

