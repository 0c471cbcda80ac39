"""Staged, atomic publishing of a job's output partitions: a failed or concurrent run never damages good output.

A job never writes into its final output directories. For each output partition ``<dir>`` (``.../date=D`` of a
table, a dead-letter partition, a run-summary partition) it writes into a hidden sibling staging directory
``<parent>/.staging-<name>-<run id>`` (hidden, so Parquet/Spark/BigQuery readers of ``<parent>`` ignore it), and
only once the whole job has succeeded and its row accounting balances does ``DayOutputs.publish`` move each staged
directory into place:

- local filesystems: one ``renameat2(RENAME_EXCHANGE)`` swaps the new directory with the old one, so a reader sees
  either the complete old partition or the complete new one, never a mixture and never nothing (where the kernel
  lacks the call, two renames leave the partition absent for a moment: readers see "not ready", not partial data);
  publishers of the same partition take an exclusive lock, so two concurrent runs of one day publish one after the
  other and the last complete run wins;
- object stores (gs://, no directory rename): the old ``_SUCCESS`` is deleted first, files are moved in, stale files
  are deleted, and ``_SUCCESS`` is moved last, so a reader that waits for ``_SUCCESS`` never sees a partial set.

Every published partition holds ``_MANIFEST.json`` (the job, and each file's name and size). A job only ever
replaces a directory that holds such a manifest, or that holds nothing but files this project's jobs name (output
of versions before manifests): a mistyped ``--output_root`` pointing at someone else's files fails before anything
is written. Pre-flight checks therefore cost nothing to get wrong: until ``publish`` nothing final is touched.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fnmatch
import json
import os
import re
import shutil
import socket
import time
import uuid
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

from apache_beam.io.filesystems import FileSystems

MANIFEST_FILE = "_MANIFEST.json"
MANIFEST_FORMAT = "tokenminds.partition_manifest/1"
SUCCESS_MARKER = "_SUCCESS"
STAGING_PREFIX = ".staging-"

# File names this project's jobs write into output partitions; a directory holding only these (and no manifest) is
# the output of an earlier version and may be replaced.
OWN_FILE_PATTERNS = ("part-*", SUCCESS_MARKER, MANIFEST_FILE, "summary.json", "stats.json", "feature_spec.json",
                     "vocabulary.json", "sid_ngram_vocab.json", "sid_spm.model", "sid_spm.json", ".temp-beam*",
                     "*/part-*", "*/" + SUCCESS_MARKER, "*/feature_spec.json", "*/vocabulary.json", "*/.temp-beam*")

_PARTITION_DIR_RE = re.compile(r"/date=\d{4}-\d{2}-\d{2}(/[A-Za-z0-9_]+)?/?$")


class NotOurOutputError(FileExistsError):
    """An output directory holds files no job of this project wrote: it is never replaced or deleted."""


def is_local(path: str) -> bool:
    return "://" not in path


def new_run_id() -> str:
    """Unique per run; carries host and pid so a later run can tell a killed run's staging from a live one."""
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:20] or "host"
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _split(directory: str):
    directory = directory.rstrip("/")
    parent, _, name = directory.rpartition("/")
    return parent, name


def staging_dir(final_dir: str, run_id: str) -> str:
    parent, name = _split(final_dir)
    return f"{parent}/{STAGING_PREFIX}{name}-{run_id}"


def _check_partition_path(directory: str) -> None:
    """Publishing replaces a whole directory, so it is confined to ``.../date=YYYY-MM-DD`` partitions (optionally one
    named sub-directory below, e.g. an eval protocol), reached without ``..`` segments."""
    if ".." in directory.replace("\\", "/").split("/") or not _PARTITION_DIR_RE.search(directory):
        raise ValueError(f"refusing to publish to {directory!r}: only a job's date=YYYY-MM-DD output partition is "
                         "replaced")


# ---------------------------------------------------------------------------------------------------------------
# Listing and manifests (FileSystems: local paths and gs:// alike).
# ---------------------------------------------------------------------------------------------------------------
def list_files(directory: str) -> Dict[str, int]:
    """Relative path -> size of every file below ``directory`` ({} when it does not exist)."""
    directory = directory.rstrip("/")
    if is_local(directory):
        found = {}
        if not os.path.isdir(directory):
            return found
        for base, _, names in os.walk(directory):
            for name in names:
                path = os.path.join(base, name)
                found[os.path.relpath(path, directory)] = os.path.getsize(path)
        return found
    matches = FileSystems.match([directory + "/**"])[0].metadata_list
    return {m.path[len(directory) + 1:]: m.size_in_bytes for m in matches}


def manifest(job: str, files: Dict[str, int]) -> Dict:
    """The partition's manifest: deterministic (no run id, no time), so an identical rerun gives identical bytes."""
    return {"format": MANIFEST_FORMAT, "job": job,
            "files": [{"name": name, "size": size} for name, size in sorted(files.items())
                      if name not in (MANIFEST_FILE,)]}


def is_own_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in OWN_FILE_PATTERNS)


def check_replaceable(directory: str) -> None:
    """Raises NotOurOutputError unless ``directory`` is absent, empty, published by a job of ours (manifest), or
    holds only file names our jobs write."""
    files = list_files(directory)
    if not files or MANIFEST_FILE in files:
        return
    foreign = sorted(name for name in files if not is_own_file(name))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise NotOurOutputError(f"{directory} holds files no TokenMinds job wrote ({shown}); refusing to replace "
                                "it: check --output_root, or move those files away")


# ---------------------------------------------------------------------------------------------------------------
# The swap.
# ---------------------------------------------------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


_RENAMEAT2 = _renameat2()


def exchange_dirs(a: str, b: str) -> bool:
    """Atomically swaps two existing local paths; False where the platform or filesystem cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2({a}, {b}) failed: {os.strerror(err)}")


@contextlib.contextmanager
def partition_lock(final_dir: str) -> Iterator[None]:
    """An exclusive lock per partition among the processes of this machine (local filesystems); object stores have
    no cheap lock, so there the last complete run's files win."""
    if not is_local(final_dir):
        yield
        return
    import fcntl
    import hashlib
    import tempfile

    # Lock files live in the machine's temp dir, not beside the data: readers of the table never see them.
    lock_dir = os.path.join(tempfile.gettempdir(), "tokenminds-publish-locks")
    os.makedirs(lock_dir, exist_ok=True)
    key = hashlib.sha256(os.path.realpath(final_dir).encode("utf-8", "surrogatepass")).hexdigest()[:32]
    with open(os.path.join(lock_dir, key + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _publish_local(staged: str, final: str) -> None:
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    if os.path.isdir(final):
        if exchange_dirs(staged, final):
            shutil.rmtree(staged)  # now holds the old partition
            return
        trash = staged + ".old"
        os.rename(final, trash)
        os.rename(staged, final)
        shutil.rmtree(trash)
    else:
        os.rename(staged, final)


def _publish_object_store(staged: str, final: str) -> None:
    new_files = list_files(staged)
    old_files = list_files(final)
    if SUCCESS_MARKER in old_files:
        FileSystems.delete([f"{final}/{SUCCESS_MARKER}"])
    moves = sorted(name for name in new_files if name != SUCCESS_MARKER)
    if moves:
        FileSystems.rename([f"{staged}/{n}" for n in moves], [f"{final}/{n}" for n in moves])
    stale = sorted(set(old_files) - set(new_files))
    if stale:
        FileSystems.delete([f"{final}/{n}" for n in stale])
    if SUCCESS_MARKER in new_files:
        FileSystems.rename([f"{staged}/{SUCCESS_MARKER}"], [f"{final}/{SUCCESS_MARKER}"])
    remaining = list_files(staged)
    if remaining:
        FileSystems.delete([f"{staged}/{n}" for n in remaining])


def delete_tree(directory: str) -> None:
    if is_local(directory):
        shutil.rmtree(directory, ignore_errors=True)
        return
    files = list_files(directory)
    if files:
        FileSystems.delete([f"{directory.rstrip('/')}/{n}" for n in files])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_abandoned_staging(final_dir: str) -> List[str]:
    """Deletes staging directories of ``final_dir`` left by runs of this host that were killed (their process is
    gone); live runs' staging and other hosts' are left alone. Local filesystems only. Returns what was removed."""
    if not is_local(final_dir):
        return []
    parent, name = _split(final_dir)
    if not os.path.isdir(parent):
        return []
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:20] or "host"
    removed = []
    pattern = re.compile(re.escape(STAGING_PREFIX + name) + r"-\d{8}T\d{6}-(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-"
                         r"[0-9a-f]{8}(\.old)?$")
    for entry in os.listdir(parent):
        found = pattern.match(entry)
        if found and found.group("host") == host and not _pid_alive(int(found.group("pid"))):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
            removed.append(entry)
    return removed


# ---------------------------------------------------------------------------------------------------------------
# One job-day's outputs.
# ---------------------------------------------------------------------------------------------------------------
class DayOutputs:
    """The output partitions one job writes for one day (or a set of days), staged and published together.

    ``staged(final_dir)`` is where the pipeline writes instead of ``final_dir``; ``publish()`` moves every staged
    directory into place (dead letters and summaries first, then the partitions whose ``_SUCCESS`` readers wait
    for); ``discard()`` removes the staging after a failure. ``check_replaceable()`` runs before the job is built.
    """

    def __init__(self, job: str, final_dirs: Sequence[str], run_id: Optional[str] = None):
        self.job = job
        self.run_id = run_id or new_run_id()
        self.final_dirs: List[str] = []
        for directory in final_dirs:
            directory = directory.rstrip("/")
            _check_partition_path(directory)
            if directory not in self.final_dirs:
                self.final_dirs.append(directory)

    def staged(self, final_path: str) -> str:
        """The staging path of ``final_path``: one of the final directories, or a path inside one."""
        final_path = final_path.rstrip("/")
        for directory in self.final_dirs:
            if final_path == directory or final_path.startswith(directory + "/"):
                return staging_dir(directory, self.run_id) + final_path[len(directory):]
        raise ValueError(f"{final_path} is not inside an output partition of this {self.job} run")

    def check_replaceable(self) -> None:
        for directory in self.final_dirs:
            check_replaceable(directory)
            remove_abandoned_staging(directory)

    def publish(self) -> None:
        staged = {d: staging_dir(d, self.run_id) for d in self.final_dirs}
        # Partitions readers wait on (with _SUCCESS) go last, after their dead letters and summaries.
        order = sorted(self.final_dirs, key=lambda d: SUCCESS_MARKER in list_files(staged[d]))
        for directory in order:
            files = list_files(staged[directory])
            if is_local(directory):
                os.makedirs(staged[directory], exist_ok=True)  # a partition with no rows is still published
            with FileSystems.create(f"{staged[directory]}/{MANIFEST_FILE}") as handle:
                handle.write((json.dumps(manifest(self.job, files), indent=2, sort_keys=True) + "\n").encode())
            with partition_lock(directory):
                check_replaceable(directory)  # again, under the lock: nothing foreign appeared meanwhile
                if is_local(directory):
                    _publish_local(staged[directory], directory)
                else:
                    _publish_object_store(staged[directory], directory)

    def discard(self) -> None:
        for directory in self.final_dirs:
            delete_tree(staging_dir(directory, self.run_id))


def publish_days(outputs_by_day: Iterable[DayOutputs]) -> None:
    for day_outputs in outputs_by_day:
        day_outputs.publish()
