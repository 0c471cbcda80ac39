"""Artifact manifests and safe artifact writing. No Beam: local paths and anything etils ``epath`` reads (gs://).

An artifact (the SID model, the query tokenizer, the feature transform, a user model) is a directory. Its writer
ends with ``_MANIFEST.json``, which lists every other file under the directory::

    {"format": "tokenminds.artifact_manifest", "format_version": 1,
     "kind": "sid_model" | "query_tokenizer" | "feature_transform" | "user_model",
     "content_version": "<kind>-<16 hex>",   sha256 over the sorted (path, size, sha256) list: same files, same value
     "files": [{"path": "params/d/...", "size": 1234, "sha256": "<64 hex>"}, ...],   sorted by path, "/"-separated
     "extra": {"version": "<the artifact's own version, as its descriptor file records it>", ...}}

Loaders call :func:`verify_artifact` on the driver before any data is read: it re-lists the directory, compares
sizes (cheap) and then streams every file through sha256, and raises :class:`ArtifactIntegrityError` (a
``ValueError``, so job entry points report it as one ``error:`` line with exit status 2) naming the directory and
the first missing, extra, truncated or changed file. Loaders also check that their descriptor's recorded version is
the one in ``extra``, so an artifact whose content changed can never keep reporting an old version. Within one
process a local directory verified before, whose files' sizes and ctimes are unchanged, is not hashed again.

Writers never write into the final directory. :func:`staged_artifact_dir` checks that the final directory is theirs
to replace (absent, empty, holding a manifest of the same kind and nothing it does not list, or, for artifacts
written before manifests existed, the artifact's own legacy marker file) and raises ``FileExistsError`` naming it
otherwise, before anything is written; it then creates a sibling staging directory. :func:`publish_artifact` writes
the manifest there last and replaces the final directory: locally by renames (old -> trash, staged -> final, trash
deleted), so readers see the old artifact or the new one, never a mixture; on object stores by deleting the old
files and copying the new ones (the manifest first, so a reader sees an incomplete copy as damaged, and
``_SUCCESS`` last). Any failure before the swap removes the staging directory and leaves the old artifact as it was;
what a killed writer left beside a local artifact is cleaned up by the next writer of it on the same machine.
:func:`artifact_writer` is both as a context manager.

Artifacts written before manifests existed are refused by loaders. ``python -m tokenminds_model.manifest adopt
--kind=KIND DIR`` checks such a directory the thorough way (its loader recomputes its content version from the
arrays, model bytes or transform outputs and compares it with the recorded one) and only then writes its manifest.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
import re
import shutil
import socket
import sys
import uuid
from typing import Any, Collection, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Type, Union

from etils import epath

MANIFEST_FILENAME = "_MANIFEST.json"
MANIFEST_FORMAT = "tokenminds.artifact_manifest"
MANIFEST_FORMAT_VERSION = 1
SUCCESS_MARKER = "_SUCCESS"
CHUNK_BYTES = 1 << 20
CONTENT_VERSION_HEX_CHARS = 16

# kind -> (what it is called in messages, how to get a good one again)
KINDS: Dict[str, Tuple[str, str]] = {
    "sid_model": ("SID model", "retrain it (pipelines.train_sid_model)"),
    "query_tokenizer": ("query tokenizer", "retrain it (pipelines.train_query_tokenizer)"),
    "feature_transform": ("feature transform", "refit it (pipelines.fit_feature_transform)"),
    "user_model": ("user model", "retrain it (tokenminds_model.train)"),
}
# kind -> "module:function" that checks a legacy (manifest-less) artifact deeply and returns its recorded version.
ADOPTERS: Dict[str, str] = {
    "sid_model": "tokenminds_model.checkpoints:check_legacy_sid_model",
    "query_tokenizer": "tokenminds_model.query_tokenizer:check_legacy_query_tokenizer",
    "feature_transform": "transforms.features:check_legacy_feature_transform",
    "user_model": "tokenminds_model.model_checkpoints:check_legacy_user_model",
}

PathLike = Union[str, os.PathLike]


class ArtifactIntegrityError(ValueError):
    """An artifact whose files do not match its manifest (or that has none). One line, naming the directory and
    the first bad file (``.file``, relative to the directory; None when the problem is not one file)."""

    def __init__(self, message: str, *, directory: str = "", kind: str = "", file: Optional[str] = None):
        super().__init__(message)
        self.directory, self.kind, self.file = directory, kind, file


class NotOurArtifactError(FileExistsError, ValueError):
    """An output directory that holds something other than the artifact a writer would replace. Both a
    FileExistsError and (as writers raised before) a ValueError."""


def describe(kind: str) -> str:
    return KINDS.get(kind, (kind.replace("_", " "), ""))[0]


def _remedy(kind: str) -> str:
    return KINDS.get(kind, ("", "rewrite it"))[1]


# ---------------------------------------------------------------------------------------------------------------
# Paths: local ones through os (renames, stat), anything else through epath.
# ---------------------------------------------------------------------------------------------------------------
def _text(directory: PathLike) -> str:
    return os.fspath(directory).rstrip("/") or "/"


def _is_local(directory: PathLike) -> bool:
    return "://" not in _text(directory)


def as_epath(directory: PathLike) -> epath.Path:
    """``directory`` as an epath.Path: absolute when local, URLs (gs://...) as they are."""
    text = _text(directory)
    return epath.Path(text if not _is_local(text) else os.path.abspath(text))


_path = as_epath


def _list_files(directory: PathLike) -> Dict[str, Any]:
    """Every file under ``directory`` except the top-level manifest: relative "/" path -> stat-like (local) or
    epath.Path (remote)."""
    files: Dict[str, Any] = {}
    if _is_local(directory):
        root = os.path.abspath(_text(directory))
        for parent, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in filenames:
                full = os.path.join(parent, name)
                relative = os.path.relpath(full, root).replace(os.sep, "/")
                if relative != MANIFEST_FILENAME:
                    files[relative] = os.stat(full)
        return files
    root = _path(directory)
    for parent, _, filenames in root.walk():
        for name in filenames:
            full = epath.Path(parent) / name
            relative = os.fspath(full)[len(os.fspath(root)):].lstrip("/")
            if relative != MANIFEST_FILENAME:
                files[relative] = full
    return files


def _size(directory: PathLike, relative: str, entry: Any) -> int:
    return entry.st_size if isinstance(entry, os.stat_result) else int(_path(directory).joinpath(relative)
                                                                         .stat().length)


def _open(directory: PathLike, relative: str):
    if _is_local(directory):
        return open(os.path.join(os.path.abspath(_text(directory)), *relative.split("/")), "rb")
    return _path(directory).joinpath(relative).open("rb")


def _hash_file(directory: PathLike, relative: str) -> Tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with _open(directory, relative) as handle:
        while True:
            chunk = handle.read(CHUNK_BYTES)
            if not chunk:
                break
            size += len(chunk)
            digest.update(chunk)
    return size, digest.hexdigest()


def content_version(kind: str, files: Sequence[Mapping[str, Any]]) -> str:
    """The content version of a file list: sha256 over its sorted (path, size, sha256) lines."""
    digest = hashlib.sha256(f"{kind}\n".encode())
    for entry in sorted(files, key=lambda e: e["path"]):
        digest.update(f"{entry['path']}\t{entry['size']}\t{entry['sha256']}\n".encode())
    return f"{kind}-{digest.hexdigest()[:CONTENT_VERSION_HEX_CHARS]}"


# ---------------------------------------------------------------------------------------------------------------
# Writing and reading manifests.
# ---------------------------------------------------------------------------------------------------------------
def compute_manifest(directory: PathLike, kind: str, extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    files = []
    for relative in sorted(_list_files(directory)):
        size, sha256 = _hash_file(directory, relative)
        files.append({"path": relative, "size": size, "sha256": sha256})
    return {"format": MANIFEST_FORMAT, "format_version": MANIFEST_FORMAT_VERSION, "kind": kind,
            "content_version": content_version(kind, files), "files": files, "extra": dict(extra or {})}


def write_manifest(directory: PathLike, kind: str, extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Hash every file under ``directory`` and write ``_MANIFEST.json`` there (replacing one); returns it.

    Call it last, on a directory nothing else is writing to (a staging directory: see :func:`publish_artifact`).
    """
    if kind not in KINDS and not kind.replace("_", "").isalnum():
        raise ValueError(f"bad artifact kind {kind!r}")
    manifest = compute_manifest(directory, kind, extra)
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    if _is_local(directory):
        target = os.path.join(os.path.abspath(_text(directory)), MANIFEST_FILENAME)
        with open(target + ".tmp", "w") as handle:
            handle.write(text)
        os.replace(target + ".tmp", target)
    else:
        _path(directory).joinpath(MANIFEST_FILENAME).write_text(text)
    return manifest


def _integrity_error(directory: PathLike, kind: str, problem: str, file: Optional[str] = None,
                     error: Type[ArtifactIntegrityError] = ArtifactIntegrityError) -> ArtifactIntegrityError:
    return error(f"{describe(kind)} {_text(directory)}: {problem}: the artifact is damaged; {_remedy(kind)}",
                 directory=_text(directory), kind=kind, file=file)


def read_manifest(directory: PathLike, kind: Optional[str] = None, *,
                  error: Type[ArtifactIntegrityError] = ArtifactIntegrityError) -> Dict[str, Any]:
    """``<directory>/_MANIFEST.json``, checked for format (and ``kind`` when given); nothing is hashed."""
    what = describe(kind) if kind else "artifact"
    path = _path(directory)
    if not path.exists():
        raise FileNotFoundError(f"{what} directory does not exist: {_text(directory)}")
    if not path.is_dir():
        raise NotADirectoryError(f"{what} path is not a directory: {_text(directory)}")
    manifest_path = path / MANIFEST_FILENAME
    if not manifest_path.exists():
        raise error(f"{what} {_text(directory)} has no {MANIFEST_FILENAME}: an incomplete write, or an artifact "
                    f"written before manifests existed; {_remedy(kind or '')}, or check and adopt it with "
                    f"`python -m tokenminds_model.manifest adopt --kind={kind or 'KIND'} {_text(directory)}`",
                    directory=_text(directory), kind=kind or "", file=MANIFEST_FILENAME)
    try:
        manifest = json.loads(manifest_path.read_text())
        entries = manifest["files"]
        ok = (manifest.get("format") == MANIFEST_FORMAT and isinstance(entries, list)
              and all(isinstance(e["path"], str) and isinstance(e["size"], int) and isinstance(e["sha256"], str)
                      for e in entries) and isinstance(manifest.get("extra", {}), dict))
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        ok = False
    if not ok:
        raise _integrity_error(directory, kind or "", f"{MANIFEST_FILENAME} is corrupt", MANIFEST_FILENAME, error)
    if manifest.get("format_version") != MANIFEST_FORMAT_VERSION:
        raise error(f"{what} {_text(directory)}: {MANIFEST_FILENAME} has format_version "
                    f"{manifest.get('format_version')!r}; this code reads version {MANIFEST_FORMAT_VERSION}",
                    directory=_text(directory), kind=kind or "", file=MANIFEST_FILENAME)
    if kind is not None and manifest.get("kind") != kind:
        raise error(f"{_text(directory)}: its {MANIFEST_FILENAME} describes a {describe(str(manifest.get('kind')))}, "
                    f"not a {describe(kind)}", directory=_text(directory), kind=kind, file=MANIFEST_FILENAME)
    if content_version(manifest["kind"], entries) != manifest.get("content_version"):
        raise _integrity_error(directory, manifest["kind"], f"{MANIFEST_FILENAME} is corrupt (its content_version "
                               "does not match its file list)", MANIFEST_FILENAME, error)
    return manifest


# Local directories verified in this process: (path, kind) -> (signature of every file's stat, manifest).
_VERIFIED: Dict[Tuple[str, str], Tuple[Any, Dict[str, Any]]] = {}


def _signature(files: Mapping[str, Any], manifest_stat: os.stat_result) -> Any:
    stats = sorted((name, s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino) for name, s in files.items())
    return tuple(stats), (manifest_stat.st_size, manifest_stat.st_mtime_ns, manifest_stat.st_ctime_ns,
                          manifest_stat.st_ino)


def verify_artifact(directory: PathLike, kind: str, *, version: Optional[str] = None, descriptor: str = "",
                    error: Type[ArtifactIntegrityError] = ArtifactIntegrityError) -> Dict[str, Any]:
    """Check every file under ``directory`` against its manifest; returns the manifest.

    Raises ``FileNotFoundError`` if the directory is absent, else ``error`` (an :class:`ArtifactIntegrityError`)
    with one line naming the directory and the first problem: no or a corrupt manifest, another kind, a
    ``version`` (the one ``descriptor`` records) other than the manifest's ``extra.version``, then (sorted by path)
    the first missing, extra or resized file, then the first file whose sha256 differs.
    """
    manifest = read_manifest(directory, kind, error=error)
    recorded = manifest["extra"].get("version")
    if version is not None and recorded != version:
        raise _integrity_error(directory, kind, f"{descriptor or 'its descriptor'}'s recorded version {version!r} "
                               f"does not match the version in {MANIFEST_FILENAME} ({recorded!r})",
                               descriptor or None, error)
    actual = _list_files(directory)
    cache_key = signature = None
    if _is_local(directory):
        cache_key = (os.path.abspath(_text(directory)), kind)
        signature = _signature(actual, os.stat(os.path.join(cache_key[0], MANIFEST_FILENAME)))
        cached = _VERIFIED.get(cache_key)
        if cached is not None and cached[0] == signature and cached[1] == manifest:
            return manifest
    expected = {entry["path"]: entry for entry in manifest["files"]}
    for relative in sorted(set(expected) | set(actual)):
        if relative not in actual:
            raise _integrity_error(directory, kind, _missing(directory, relative, expected), relative, error)
        if relative not in expected:
            raise _integrity_error(directory, kind, f"file {relative} is not in the manifest", relative, error)
        size = _size(directory, relative, actual[relative])
        if size != expected[relative]["size"]:
            raise _integrity_error(directory, kind, f"file {relative} is {size} bytes, manifest says "
                                   f"{expected[relative]['size']} (sha256 does not match)", relative, error)
    for relative in sorted(expected):
        size, sha256 = _hash_file(directory, relative)
        if sha256 != expected[relative]["sha256"] or size != expected[relative]["size"]:
            raise _integrity_error(directory, kind, f"file {relative} is {size} bytes as the manifest says, but its "
                                   "sha256 does not match", relative, error)
    if cache_key is not None:
        _VERIFIED[cache_key] = (signature, manifest)
    return manifest


def _missing(directory: PathLike, relative: str, expected: Mapping[str, Any]) -> str:
    """'file a/b is missing', or 'no a/ directory' when a whole directory the manifest lists files in is gone."""
    parts = relative.split("/")
    for depth in range(1, len(parts)):
        folder = "/".join(parts[:depth])
        if not _path(directory).joinpath(folder).exists():
            listed = sum(1 for name in expected if name.startswith(folder + "/"))
            return f"no {folder}/ directory (the manifest lists {listed} file{'' if listed == 1 else 's'} in it)"
    return f"file {relative} is missing (manifest says {expected[relative]['size']} bytes)"


# ---------------------------------------------------------------------------------------------------------------
# Staging and publishing.
# ---------------------------------------------------------------------------------------------------------------
def check_replaceable(final_dir: PathLike, kind: str, *, legacy_markers: Collection[str] = (),
                      legacy_entries: Optional[Collection[str]] = None) -> None:
    """Raise :class:`NotOurArtifactError` (a FileExistsError) naming ``final_dir`` unless a writer of ``kind`` may
    replace it: it is absent or empty; or it holds a manifest of ``kind`` and only files that manifest lists; or
    (written before manifests) every top-level entry is in ``legacy_entries``, or, without ``legacy_entries``, it
    holds one of ``legacy_markers``."""
    text, what = _text(final_dir), describe(kind)
    path = _path(final_dir)
    if not path.exists():
        return
    if not path.is_dir():
        raise NotOurArtifactError(f"refusing to replace {text}: it exists and is not a directory")
    entries = sorted(entry.name for entry in path.iterdir())
    if not entries:
        return
    if MANIFEST_FILENAME in entries:
        try:
            manifest = json.loads((path / MANIFEST_FILENAME).read_text())
            found_format = manifest.get("format")
            found_kind, listed = manifest.get("kind"), {entry["path"] for entry in manifest["files"]}
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            found_format, found_kind, listed = None, None, set()
        if found_format != MANIFEST_FORMAT or found_kind is None:
            raise NotOurArtifactError(f"refusing to replace {text}: its {MANIFEST_FILENAME} is not an artifact "
                                      f"manifest (format {found_format!r}); not a {what} this job replaces")
        if found_kind != kind:
            raise NotOurArtifactError(f"refusing to replace {text}: it holds a {describe(str(found_kind))}, "
                                      f"not a {what}")
        unlisted = sorted(set(_list_files(final_dir)) - listed)
        if unlisted:
            raise NotOurArtifactError(f"refusing to replace {text}: besides a {what} it holds files its "
                                      f"{MANIFEST_FILENAME} does not list ({', '.join(unlisted[:5])})")
        return
    if legacy_entries is not None:
        foreign = [name for name in entries if name not in legacy_entries]
        if not foreign:
            return
        raise NotOurArtifactError(f"refusing to replace {text}: it is not empty and not a {what} (holds "
                                  f"{foreign[:5]}); not an artifact this job replaces")
    if any(name in entries for name in legacy_markers):
        return
    markers = " nor ".join(legacy_markers)
    raise NotOurArtifactError(f"refusing to replace {text}: it holds files ({', '.join(entries[:5])}) but no "
                              f"{MANIFEST_FILENAME}{' nor ' + markers if markers else ''}: not a {what} this job "
                              "replaces")


def _sibling_name(name: str) -> str:
    # '=' dropped so that a sibling of .../date=D never looks like a date partition to a glob or a regex.
    return "." + name.replace("=", "-")


def _sibling(final_dir: PathLike, tag: str) -> str:
    """``<parent>/.<name>.<tag>-<host>.<pid>.<random>``: hidden, and telling which process made it (see
    :func:`_clean_stale_siblings`)."""
    text = _text(final_dir)
    parent, name = text.rsplit("/", 1) if "/" in text else ("", text)
    if not name or name in (".", ".."):
        raise ValueError(f"bad artifact directory {text!r}")
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "host"
    sibling = f"{_sibling_name(name)}.{tag}-{host}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    return f"{parent}/{sibling}" if parent else sibling


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but not ours to signal
        return True
    return True


def _clean_stale_siblings(final: str) -> None:
    """Local only: remove staging (and swap) directories of ``final`` left by killed processes of this machine. A
    swap killed between its two renames left the old artifact as ``.old-...`` and no ``final``: it is put back."""
    parent, name = os.path.split(final)
    if not os.path.isdir(parent):
        return
    pattern = re.compile(rf"^{re.escape(_sibling_name(name))}\.(staging|old)-(.+)\.(\d+)\.[0-9a-f]{{8}}$")
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "host"
    for entry in sorted(os.listdir(parent)):
        found = pattern.match(entry)
        if not found or found.group(2) != host or _alive(int(found.group(3))):
            continue
        full = os.path.join(parent, entry)
        if found.group(1) == "old" and not os.path.lexists(final):
            os.rename(full, final)
        else:
            shutil.rmtree(full, ignore_errors=True)


def staged_artifact_dir(final_dir: PathLike, kind: str, *, legacy_markers: Collection[str] = (),
                        legacy_entries: Optional[Collection[str]] = None) -> str:
    """Check that ``final_dir`` may be replaced (:func:`check_replaceable`), then create and return an empty
    sibling staging directory to write the new artifact into."""
    if ".." in _text(final_dir).split("/"):
        raise ValueError(f"refusing to write {_text(final_dir)!r}: no '..' segments in artifact paths")
    if _is_local(final_dir):
        _clean_stale_siblings(os.path.abspath(_text(final_dir)))
    check_replaceable(final_dir, kind, legacy_markers=legacy_markers, legacy_entries=legacy_entries)
    staged = _sibling(final_dir, "staging")
    if _is_local(staged):
        staged = os.path.abspath(staged)
        os.makedirs(staged)
    else:
        _path(staged).mkdir(parents=True, exist_ok=False)
    return staged


def discard_staged(staged_dir: PathLike) -> None:
    """Remove a staging directory (best effort: a failure here must not hide the one that got us here)."""
    try:
        if _is_local(staged_dir):
            shutil.rmtree(_text(staged_dir), ignore_errors=True)
        elif _path(staged_dir).exists():
            _path(staged_dir).rmtree()
    except Exception:  # noqa: BLE001 - cleanup only
        pass


def publish_artifact(staged_dir: PathLike, final_dir: PathLike, kind: str, *,
                     extra: Optional[Mapping[str, Any]] = None, legacy_markers: Collection[str] = (),
                     legacy_entries: Optional[Collection[str]] = None) -> Dict[str, Any]:
    """Write the manifest into ``staged_dir``, then make it ``final_dir``; returns the manifest.

    ``final_dir`` is checked again (it may have changed while the artifact was being written). On any failure
    before the swap the staging directory is removed and ``final_dir`` is left as it was.
    """
    try:
        manifest = write_manifest(staged_dir, kind, extra)
        check_replaceable(final_dir, kind, legacy_markers=legacy_markers, legacy_entries=legacy_entries)
        if _is_local(final_dir) and _is_local(staged_dir):
            _swap_local(os.path.abspath(_text(staged_dir)), os.path.abspath(_text(final_dir)))
        else:
            _replace_by_copy(staged_dir, final_dir)
    except BaseException:
        discard_staged(staged_dir)
        raise
    return manifest


def _swap_local(staged: str, final: str) -> None:
    if not os.path.lexists(final):
        os.makedirs(os.path.dirname(final) or ".", exist_ok=True)
        os.rename(staged, final)
        return
    trash = os.path.join(os.path.dirname(final), os.path.basename(_sibling(final, "old")))
    os.rename(final, trash)
    try:
        os.rename(staged, final)
    except BaseException:
        os.rename(trash, final)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def _replace_by_copy(staged_dir: PathLike, final_dir: PathLike) -> None:
    """Object stores have no directory rename: delete the old files (_SUCCESS first, the manifest last, so what is
    left stays recognisably ours), copy the new ones (the manifest first, _SUCCESS last), drop the staging copy."""
    final, staged = _path(final_dir), _path(staged_dir)

    def order(names: List[str], first: str, last: str) -> List[str]:
        return sorted(names, key=lambda n: (n != first, n == last, n))

    if final.exists():
        old = list(_list_files(final_dir)) + ([MANIFEST_FILENAME] if (final / MANIFEST_FILENAME).exists() else [])
        for relative in order(old, SUCCESS_MARKER, MANIFEST_FILENAME):
            final.joinpath(relative).unlink()
    new = list(_list_files(staged_dir)) + [MANIFEST_FILENAME]
    for relative in order(new, MANIFEST_FILENAME, SUCCESS_MARKER):
        target = final.joinpath(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        staged.joinpath(relative).copy(target, overwrite=True)
    staged.rmtree()


@dataclasses.dataclass
class StagedArtifact:
    """What :func:`artifact_writer` yields: write under ``path``; put the artifact's version in ``extra``."""

    path: str
    final_dir: str
    kind: str
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)
    manifest: Optional[Dict[str, Any]] = None


@contextlib.contextmanager
def artifact_writer(final_dir: PathLike, kind: str, *, legacy_markers: Collection[str] = (),
                    legacy_entries: Optional[Collection[str]] = None) -> Iterator[StagedArtifact]:
    """``with artifact_writer(dir, kind) as staged: write under staged.path; staged.extra["version"] = ...``:
    staged, then published with its manifest when the block completes; discarded (old artifact kept) if it
    raises."""
    staged = StagedArtifact(staged_artifact_dir(final_dir, kind, legacy_markers=legacy_markers,
                                                legacy_entries=legacy_entries), _text(final_dir), kind)
    try:
        yield staged
    except BaseException:
        discard_staged(staged.path)
        raise
    staged.manifest = publish_artifact(staged.path, final_dir, kind, extra=staged.extra,
                                       legacy_markers=legacy_markers, legacy_entries=legacy_entries)


# ---------------------------------------------------------------------------------------------------------------
# Adopting artifacts written before manifests existed.
# ---------------------------------------------------------------------------------------------------------------
def adopt_legacy_artifact(directory: PathLike, kind: str) -> Dict[str, Any]:
    """Write the manifest of a manifest-less artifact after its loader checked it thoroughly (recomputing its
    content version: arrays, model bytes, transform outputs and assets) against the version it records."""
    if kind not in ADOPTERS:
        raise ValueError(f"unknown artifact kind {kind!r}; expected one of {sorted(ADOPTERS)}")
    path = _path(directory)
    if (path / MANIFEST_FILENAME).exists():
        raise FileExistsError(f"{_text(directory)} already has a {MANIFEST_FILENAME}; verify it instead")
    module_name, function_name = ADOPTERS[kind].split(":")
    version = getattr(importlib.import_module(module_name), function_name)(_text(directory))
    return write_manifest(directory, kind, {"version": version})


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenminds_model.manifest",
                                     description="Verify an artifact against its manifest, or adopt one written "
                                                 "before manifests existed.")
    parser.add_argument("command", choices=("verify", "adopt"))
    parser.add_argument("directory")
    parser.add_argument("--kind", required=True, choices=sorted(KINDS))
    args = parser.parse_args(argv)
    try:
        if args.command == "verify":
            manifest = verify_artifact(args.directory, args.kind)
        else:
            manifest = adopt_legacy_artifact(args.directory, args.kind)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{describe(args.kind)} {args.directory}: {len(manifest['files'])} files, content "
          f"{manifest['content_version']}, version {manifest['extra'].get('version')}"
          f"{' (manifest written)' if args.command == 'adopt' else ' (verified)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
