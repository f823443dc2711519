"""Safe outputs, as docs/architecture.md promises them ("What qcore promises", **Outputs**):
atomic writes, a guard that refuses destructive targets before any work
(:func:`check_output_dir`), cleanup of what a killed write left (:func:`clean_leftovers`)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from qcore.errors import ConfigError, OutputError

log = logging.getLogger(__name__)

#: what a model folder may hold (weights, configs, tokenizer files); anything else in a
#: folder marks it as the user's, which ``--overwrite`` never replaces
MODEL_FILE_SUFFIXES = {".safetensors", ".json", ".jinja", ".model", ".tiktoken", ".gguf"}
MODEL_FILE_NAMES = {"merges.txt", "vocab.txt", "README.md"}

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:-.*)?$")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        if pid != os.getpid():
            os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    return True


def clean_leftovers(target: str | os.PathLike) -> list[str]:
    """Remove what a killed write to ``target`` left behind; return what was done. A
    ``.NAME.old-PID`` of a dead process while ``NAME`` is missing is the complete previous
    output (the kill fell between the two renames): it is renamed back instead."""
    target = Path(target).absolute()
    parent = target.parent
    if not parent.is_dir():
        return []
    done = []
    for entry in sorted(parent.iterdir()):
        m = _LEFTOVER.match(entry.name)
        if not m or m["name"] != target.name or _pid_alive(int(m["pid"])):
            continue
        if m["kind"] == "old" and not target.exists():
            os.replace(entry, target)
            done.append(f"restored {target} from {entry.name} (a replacement was killed "
                         "between its two renames)")
        else:
            size = folder_bytes(entry)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            done.append(f"removed {entry} ({size / 2**20:.1f} MB) left by killed process "
                        f"{m['pid']}")
    for line in done:
        log.warning("%s", line)
    return done


def folder_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def chmod_as_new_file(path: str | os.PathLike) -> None:
    """Give a written file the permissions of the umask (safetensors writes 0600)."""
    os.chmod(path, 0o666 & ~_umask())


def replace_directory(source: Path, target: Path) -> None:
    """Move the finished folder ``source`` to ``target`` (a sibling): one rename, or two
    when an older ``target`` is replaced (it is deleted afterwards)."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, target)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)


def parse_size(size: str | int, option: str = "`max_shard_size`") -> int:
    """Bytes of ``500MB``, ``2GB``, ``1GiB`` or a plain number of bytes."""
    if isinstance(size, int):
        value = size
    else:
        m = _SIZE.match(size)
        if not m:
            raise ConfigError(f"{option} {size!r}: expected a size such as 500MB, 2GB or 1GiB")
        unit = (m[2] or "B").upper()  # B, KB, KIB, ... TIB
        value = int(float(m[1]) * (1024 if "I" in unit else 1000) ** "BKMGT".index(unit[0]))
    if value <= 0:
        raise ConfigError(f"{option} {size!r}: must be positive")
    return value


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` in one rename,
    on any exception it is removed and ``path`` is left untouched."""
    target = Path(path).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary sibling, then rename it over ``path`` (a kill leaves
    the old file or the new one, never half of one)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        chmod_as_new_file(tmp)  # mkstemp makes 0600
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(value: Any) -> Any:
    """``value`` with every NaN/infinity replaced by None, so it is valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps_json(data: Any, **kwargs: Any) -> str:
    """JSON text that never holds bare NaN/Infinity (they become null)."""
    return json.dumps(json_safe(data), allow_nan=False, default=str, **kwargs)


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, dumps_json(data, indent=2, sort_keys=True) + "\n")


def _is_model_file(entry: Path) -> bool:
    return entry.is_file() and (entry.suffix in MODEL_FILE_SUFFIXES
                                or entry.name in MODEL_FILE_NAMES)


def _contains(folder: Path, path: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_dir(path: str | os.PathLike, *, overwrite: bool = False,
                     inputs: Iterable[str | os.PathLike] = (), expected_bytes: int = 0,
                     option: str = "`save`") -> Path:
    """Refuse, before any work, an output folder that would destroy something or cannot be
    written. Returns the absolute target. ``inputs`` are files/folders the run reads."""
    target = Path(os.path.expanduser(str(path))).resolve()
    if _contains(target, Path.cwd().resolve()):
        raise OutputError(f"{option} {path}: refusing to replace the current directory "
                          "(or a folder containing it); name a new folder")
    if target in (Path("/"), Path.home().resolve()):
        raise OutputError(f"{option} {path}: refusing to replace {target}")
    for item in inputs:
        src = Path(os.path.expanduser(str(item))).resolve()
        if src.exists() and _contains(target, src):
            raise OutputError(f"{option} {path}: the run reads {item} from inside it; "
                              "name a folder that holds none of the inputs")
    if target.exists():
        if not target.is_dir():
            raise OutputError(f"{option} {path}: exists and is a file, not a folder")
        if any(not _LEFTOVER.match(e.name) for e in target.iterdir()):
            if not overwrite:
                raise OutputError(f"{option} {path}: folder exists and is not empty; pass "
                                  "`overwrite` to replace a saved model there")
            entries = list(target.iterdir())  # a saved model: weights, configs, tokenizer only
            if not (any(e.suffix in (".safetensors", ".gguf") for e in entries)
                    and all(_is_model_file(e) for e in entries if not _LEFTOVER.match(e.name))):
                odd = sorted(e.name for e in entries if not _is_model_file(e))
                raise OutputError(f"{option} {path}: `overwrite` only replaces a saved model "
                                  f"folder; this one holds other things "
                                  f"({', '.join(odd[:5]) or 'no weights'})")
    clean_leftovers(target)
    base = target.parent  # the nearest existing parent
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise OutputError(f"{option} {path}: cannot create it, {base} is a file")
    try:
        with tempfile.TemporaryFile(dir=base, prefix=f".{target.name}.probe-"):
            pass
    except OSError as exc:
        raise OutputError(f"{option} {path}: cannot write in {base} "
                          f"({exc.strerror or exc})") from exc
    free = shutil.disk_usage(base).free
    if expected_bytes > free:
        raise OutputError(f"{option} {path}: about {expected_bytes / 2**20:.0f} MB needed, "
                          f"{free / 2**20:.0f} MB free on the disk of {base}")
    return target
