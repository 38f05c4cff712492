"""The job's view from the worker node: path rewriting, the job bundle (input sandbox) and its payload config.

No shared file system: every Galaxy path the job script uses (job working directory, input and output datasets and
their extra files, tool directory) is rewritten to a path inside the job's directory on the node. The node directory
is only known when the job runs, so Galaxy-side we write a placeholder (:data:`PLACEHOLDER`) and the payload
(:mod:`galaxy_dirac.payload`, shipped in the bundle) replaces it before running the Galaxy job script.

Layout on the node (relative to the job directory)::

    galaxy_dirac_launch.sh        the DIRAC Executable: runs galaxy_dirac_payload.pyz
    galaxy_dirac_payload.pyz      the payload (stdlib zipapp); galaxy_dirac_payload.json says what to do
    work/                         Galaxy's job working directory (job script, tool script, configs, outputs/…)
    inputs/<name>                 input datasets, each once however often the job names it; <name>_files/… extras
    outputs/<name>                output datasets; dataset_<uuid>_files/… their extra files (composite, html)
    tool/                         the tool directory, or the files of it the job refers to
    reference/<name>/             reference data (data tables' .loc paths) the job names, from Galaxy's tool data
    galaxy_dirac_work.tar         after the run: every file created or changed under work/ (tool_stdout/stderr,
                                  exit code, job metrics, from_work_dir and discovered outputs, extra files, …)
    galaxy_dirac_extra.tar        transport galaxy: the outputs' extra files, pushed as one archive
    galaxy_dirac_results.tar      transport sandbox: outputs/… and galaxy_dirac_work.tar, relative names

A transport is a small strategy object (:data:`TRANSPORTS`): ``galaxy`` has the payload pull inputs from and push
outputs to Galaxy's job files API; ``sandbox`` ships inputs in the input sandbox and outputs in the output sandbox.
This module does not import Galaxy; the runner fills a :class:`JobSpec` from the job wrapper.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from galaxy_dirac.archive import DEFAULT_MAX_TOTAL_BYTES, UnsafeArchiveError, create_archive, safe_extract
from galaxy_dirac.payload import (
    ATTEMPT,
    ATTEMPT_LINE,
    ATTEMPTS_DIR,
    CONFIG,
    EXTRA_TAR,
    LAUNCHER,
    PLACEHOLDER,
    RESULTS,
    STDERR,
    STDOUT,
    WORK_TAR,
    ZIPAPP,
)
from galaxy_dirac.pilot.build import payload_sources, zipapp_bytes

__all__ = [
    "CONFIG",
    "LAUNCHER",
    "PLACEHOLDER",
    "RESULTS",
    "STDERR",
    "STDOUT",
    "TRANSPORTS",
    "WORK_TAR",
    "Bundle",
    "JobSpec",
    "BundleError",
    "InputMissing",
    "LimitError",
    "PathMapper",
    "ResultsMissing",
    "build_bundle",
    "install_results",
    "launcher_script",
    "load_state",
    "save_state",
]

BUNDLE_DIR = "__galaxy_dirac_bundle"
BUNDLE_ARCHIVE = "galaxy_dirac_bundle.tar.bz2"
RESULTS_DIR = "__galaxy_dirac_results"
STATE_FILE = "galaxy_dirac_state.json"

#: Text files larger than this are bundled verbatim (not rewritten); a tool directory larger than the cap never travels
#: whole, even when the job names the directory itself: only the files the job names do.
MAX_REWRITE_BYTES = 4 << 20
MAX_TOOL_DIR_BYTES = 16 << 20
#: A tool directory this small (bytes, files) travels whole; a bigger one only with the files the job refers to.
SMALL_TOOL_DIR = (1 << 20, 64)


class BundleError(ValueError):
    """The job cannot be sent as it is; the message, shown to the Galaxy user, says why and what to do."""


class LimitError(BundleError):
    """The job cannot fit the target's limits (sandbox size); the message names the limit and what to do."""


class InputMissing(BundleError):
    """An input dataset has no file on the Galaxy host (purged, or deferred and not materialised)."""


class ResultsMissing(RuntimeError):
    """A Done DIRAC job whose results are not where its transport puts them: Galaxy must not call it ok."""


@dataclass
class JobSpec:
    """What the bundle needs to know about one Galaxy job (all paths absolute, Galaxy side)."""

    galaxy_job_id: int
    working_directory: str
    job_script: str  # absolute path of the Galaxy job script (inside working_directory)
    inputs: List[str] = field(default_factory=list)  # input dataset files
    input_extra_dirs: List[str] = field(default_factory=list)  # their extra_files_path directories
    outputs: List[str] = field(default_factory=list)  # output dataset files (where the job script writes them)
    output_extra_dirs: List[str] = field(default_factory=list)  # their extra files directories (may not exist yet)
    #: Directories of reference data (Galaxy's tool data) whose files the job names travel with it; empty when the
    #: nodes have them at the same paths (CVMFS).
    reference_dirs: List[str] = field(default_factory=list)
    tool_dir: Optional[str] = None
    transport: str = "galaxy"
    galaxy_url: Optional[str] = None  # Galaxy as seen from the worker nodes (transport galaxy)
    encoded_job_id: Optional[str] = None
    job_key: Optional[str] = None
    exit_code_file: Optional[str] = None  # absolute path of the job script's exit code file
    processors: Optional[int] = None  # what the destination asked for; the slot's own figure wins on the node
    memory_mb: Optional[int] = None
    max_input_bytes: Optional[int] = None  # the target's input and output sandbox limits
    max_output_bytes: Optional[int] = None
    #: What a job's results may expand to on the Galaxy host (from Galaxy's own output_size job limit).
    max_result_bytes: Optional[int] = None


def _unique_paths(paths: Iterable[str]) -> List[str]:
    """Absolute paths, each once, in first-seen order: Galaxy names a dataset once per use (repeats, multiple)."""
    return list(dict.fromkeys(os.path.abspath(p) for p in paths))


class PathMapper:
    """Galaxy path → path relative to the node's job directory; longest prefix wins, each Galaxy path one name."""

    def __init__(self, spec: JobSpec, reference_dirs: Optional[Sequence[str]] = None) -> None:
        """``reference_dirs``: the folders of reference data the job uses (default: all of the spec's)."""
        self.spec = spec
        self.files: Dict[str, str] = {}  # exact file paths
        self.dirs: Dict[str, str] = {}  # directory prefixes
        self.dirs[os.path.abspath(spec.working_directory)] = "work"
        names: Dict[str, int] = {}
        for path in _unique_paths(spec.inputs):
            self.files[path] = "inputs/" + self._unique(os.path.basename(path), names)
        for path in _unique_paths(spec.input_extra_dirs):
            self.dirs[path] = "inputs/" + self._unique(os.path.basename(path.rstrip("/")), names)
        out_names: Dict[str, int] = {}
        for path in _unique_paths(spec.outputs):
            self.files[path] = "outputs/" + self._unique(os.path.basename(path), out_names)
        for path in _unique_paths(spec.output_extra_dirs):
            self.dirs[path] = "outputs/" + self._unique(os.path.basename(path.rstrip("/")), out_names)
        ref_names: Dict[str, int] = {}
        for path in _unique_paths(spec.reference_dirs if reference_dirs is None else reference_dirs):
            self.dirs[path] = "reference/" + self._unique(os.path.basename(path.rstrip("/")) or "root", ref_names)
        if spec.tool_dir and os.path.isdir(spec.tool_dir):  # what of it travels: tool_files
            self.dirs[os.path.abspath(spec.tool_dir)] = "tool"

    @staticmethod
    def _unique(name: str, seen: Dict[str, int]) -> str:
        count = seen.get(name, 0)
        seen[name] = count + 1
        return name if not count else f"{count}_{name}"

    def relative(self, path: str) -> Optional[str]:
        """Node-relative path of a Galaxy path, or None when it is not mapped."""
        path = os.path.abspath(path)
        if path in self.files:
            return self.files[path]
        for prefix in sorted(self.dirs, key=len, reverse=True):
            if path == prefix:
                return self.dirs[prefix]
            if path.startswith(prefix + "/"):
                return self.dirs[prefix] + path[len(prefix) :]
        return None

    def rewrite(self, text: str) -> str:
        """Replace every mapped Galaxy path in ``text`` by ``PLACEHOLDER/<relative>``; exact files first, then dirs."""
        pairs = [(p, r) for p, r in self.files.items()] + [(p, r) for p, r in self.dirs.items()]
        # Longest first so /a/b/c is replaced before /a/b; a boundary check keeps /a/bc from matching /a/b.
        for path, rel in sorted(pairs, key=lambda item: len(item[0]), reverse=True):
            text = _replace_path(text, path, f"{PLACEHOLDER}/{rel}")
        return text


def _boundary(text: str, end: int) -> bool:
    after = text[end : end + 1]
    return not (after and (after.isalnum() or after in "_-."))


def _replace_path(text: str, path: str, replacement: str) -> str:
    out: List[str] = []
    start = 0
    while True:
        found = text.find(path, start)
        if found < 0:
            out.append(text[start:])
            return "".join(out)
        end = found + len(path)
        if _boundary(text, end):
            out.append(text[start:found])
            out.append(replacement)
        else:
            out.append(text[start:end])
        start = end


def _mentions(texts: Sequence[str], path: str, *, itself: bool = False) -> bool:
    """Whether a text names ``path`` (at a path boundary); with ``itself``, only where nothing below it follows."""
    for text in texts:
        start = 0
        while True:
            found = text.find(path, start)
            if found < 0:
                break
            end = found + len(path)
            if _boundary(text, end) and not (itself and text[end : end + 1] == "/"):
                return True
            start = end
    return False


def tool_files(tool_dir: str, texts: Sequence[str]) -> Optional[List[str]]:
    """Which files of the tool directory the job needs (relative), or None for all of it.

    Tools often share one directory with hundreds of others; a job needs only what its command and config files
    name (``$__tool_directory__/script.py``, or a subdirectory). A small directory, or one the job names itself (a
    ``cd`` into it, a ``PATH`` entry), travels whole.
    """
    base = os.path.abspath(tool_dir)
    count, size, entries = 0, 0, []
    for folder, dirs, files in os.walk(base):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            count += 1
            size += os.path.getsize(path)
            entries.append(path)
    if size <= SMALL_TOOL_DIR[0] and count <= SMALL_TOOL_DIR[1]:
        return None
    if size <= MAX_TOOL_DIR_BYTES and _mentions(texts, base, itself=True):
        return None
    wanted: List[str] = []
    for path in entries:
        rel = os.path.relpath(path, base)
        parts = rel.split("/")
        folders = [os.path.join(base, *parts[:n]) for n in range(1, len(parts))]
        if _mentions(texts, path) or any(_mentions(texts, folder, itself=True) for folder in folders):
            wanted.append(rel)
    return wanted


#: An absolute path in a command or config file: a ``/`` not inside a longer path, up to where a path ends.
_PATH_TOKEN = re.compile(r"(?<![\w./-])/[^\s'\"`;|&<>(){}\[\],=$]+")


def referenced_files(folders: Sequence[str], texts: Sequence[str]) -> Dict[str, List[str]]:
    """Per folder of reference data, its files the texts name: a file and its indexes, a directory, or a prefix.

    Data tables give tools reference data by absolute path (``${ref.fields.path}``): a FASTA whose indexes lie beside
    it, or an index *prefix* such as ``hg19/bowtie2/hg19`` whose files are ``hg19.1.bt2``, ``hg19.rev.1.bt2`` … A
    named path whose ``..`` leaves its folder is not in it, and a folder itself never travels whole. Each path is
    looked up by its parents, so thousands of folders (every data table's) cost no more than a few.
    """
    known = {os.path.abspath(f) for f in folders} - {"/"}
    found: Dict[str, Dict[str, None]] = {}
    for text in texts:
        for token in _PATH_TOKEN.findall(text):
            path = os.path.normpath(token.rstrip(".:"))
            parent = os.path.dirname(path)
            while parent not in known and parent != "/":
                parent = os.path.dirname(parent)
            if parent in known:
                found.setdefault(parent, {}).update(dict.fromkeys(_expand_reference(path)))
    return {folder: list(files) for folder, files in found.items() if files}


def _expand_reference(path: str) -> List[str]:
    if os.path.isdir(path):
        return [
            os.path.join(folder, name)
            for folder, _dirs, files in sorted(os.walk(path))
            for name in sorted(files)
            if os.path.isfile(os.path.join(folder, name))
        ]
    parent, stem = os.path.split(path)
    if not stem or not os.path.isdir(parent):
        return []
    # A named file brings its indexes (bwa's ``g.fa`` → ``g.fa.bwt``, samtools' ``g.fa.fai``).
    prefix = stem + "." if os.path.isfile(path) else stem
    return [path] * os.path.isfile(path) + [
        os.path.join(parent, name)
        for name in sorted(os.listdir(parent))
        if name.startswith(prefix) and os.path.isfile(os.path.join(parent, name))
    ]


def launcher_script() -> str:
    """The DIRAC Executable: run the payload zipapp with whichever Python the node has (DIRAC's own, or python3)."""
    return f"""#!/bin/sh
# galaxy-dirac launcher: generated, do not edit. Runs the Galaxy job payload; see galaxy_dirac.payload.
for python in "${{GALAXY_DIRAC_PYTHON:-}}" python3 python; do
    if [ -n "$python" ] && command -v "$python" > /dev/null 2>&1; then
        exec "$python" {ZIPAPP} "$@"
    fi
done
echo "galaxy-dirac: Galaxy job payload error: no python3 on this worker node" >&2
exit 85
"""


def files_api_url(spec: JobSpec, path: Optional[str] = None) -> str:
    base = f"{str(spec.galaxy_url).rstrip('/')}/api/jobs/{spec.encoded_job_id}/files"
    query = {"job_key": spec.job_key}
    if path is not None:
        query["path"] = path
    return f"{base}?{urllib.parse.urlencode(query)}"


@dataclass
class Bundle:
    archive: str  # the input sandbox archive (tar.bz2)
    output_sandbox: List[str]
    config: Dict[str, object]
    mapper: PathMapper
    size: int = 0


class Transport:
    """How data moves between Galaxy and the node; one instance per kind in :data:`TRANSPORTS`."""

    name = ""

    def check(self, spec: JobSpec) -> None:
        """Refuse a spec this transport cannot serve."""

    def add_input(self, spec: JobSpec, root: str, config: Dict[str, list], galaxy_path: str, rel: str) -> None:
        raise NotImplementedError

    def add_outputs(self, spec: JobSpec, mapper: PathMapper, config: Dict[str, object]) -> None:
        raise NotImplementedError

    def output_sandbox(self) -> List[str]:
        """The JDL's OutputSandbox: files only, never directories (a JobWrapper would tar them with its own paths)."""
        return [STDOUT, STDERR]

    def install(self, spec: JobSpec, sandboxes: Callable[[], List[io.BytesIO]]) -> List[str]:
        """Put the results Galaxy-side once the DIRAC job is Done; returns the output datasets placed."""
        raise NotImplementedError


class GalaxyTransport(Transport):
    """The payload pulls inputs from and pushes outputs to Galaxy's job files API, as Pulsar does.

    Each run pushes into a folder of its own in the working directory (:data:`ATTEMPTS_DIR`); once the DIRAC job is
    Done, the run its output sandbox names is moved into place, so a rescheduled job's earlier run that is still
    going on a lost node can never overwrite or mix into the results.
    """

    name = "galaxy"

    def check(self, spec: JobSpec) -> None:
        if not (spec.galaxy_url and spec.encoded_job_id and spec.job_key):
            raise ValueError("transport 'galaxy' needs galaxy_url, encoded job id and job key")

    def add_input(self, spec: JobSpec, root: str, config: Dict[str, list], galaxy_path: str, rel: str) -> None:
        entry = {"url": files_api_url(spec, galaxy_path), "path": rel, "size": os.path.getsize(galaxy_path)}
        config["inputs"].append(entry)

    def add_outputs(self, spec: JobSpec, mapper: PathMapper, config: Dict[str, object]) -> None:
        run = os.path.join(spec.working_directory, ATTEMPTS_DIR, ATTEMPT)
        rels = [str(mapper.relative(p)) for p in _unique_paths(spec.outputs)]
        outputs = [_push(spec, rel, os.path.join(run, rel), optional=True) for rel in rels]
        if spec.output_extra_dirs:
            outputs.append(_push(spec, EXTRA_TAR, os.path.join(run, EXTRA_TAR), optional=True))
        outputs.append(_push(spec, WORK_TAR, os.path.join(run, WORK_TAR), optional=False))
        config["outputs"] = outputs

    def install(self, spec: JobSpec, sandboxes: Callable[[], List[io.BytesIO]]) -> List[str]:
        """Move the current run's pushed results into place; no run named, or nothing pushed, is a failure."""
        attempts = os.path.join(spec.working_directory, ATTEMPTS_DIR)
        attempt = attempt_of(sandbox_member(sandboxes(), STDOUT))
        run = os.path.join(attempts, attempt) if attempt else ""
        legacy = os.path.join(spec.working_directory, RESULTS_DIR + ".tar")
        if not attempt and os.path.isfile(legacy):  # submitted before runs had folders of their own (0.x upgrade)
            restore_work(spec, legacy)
            os.unlink(legacy)
            return [p for p in _unique_paths(spec.outputs) if os.path.exists(p)]
        if not (attempt and os.path.isfile(os.path.join(run, WORK_TAR))):
            raise ResultsMissing(
                "the job's results never reached Galaxy (no pushed work archive): the worker node could not reach "
                "Galaxy's job files API, or the job ran on a node without the payload"
            )
        if os.path.isfile(os.path.join(run, EXTRA_TAR)):  # its members: outputs/dataset_<uuid>_files/…
            safe_extract(os.path.join(run, EXTRA_TAR), run, max_total_bytes=_extraction_cap(spec))
        placed = install_unpacked(spec, run)
        shutil.rmtree(attempts, ignore_errors=True)  # this run's leftovers and any earlier run's
        return placed


def attempt_of(stdout: bytes) -> Optional[str]:
    """The run id the payload wrote on its stdout (the last one: a node may have restarted it)."""
    found = re.findall(rb"^" + re.escape(ATTEMPT_LINE.encode()) + rb"([0-9a-f]{16})\s*$", stdout, re.M)
    return found[-1].decode() if found else None


def sandbox_member(blobs: Iterable[io.BytesIO], name: str, limit: int = 1 << 20) -> bytes:
    """The last ``limit`` bytes of file ``name`` in the output sandbox archives (any path prefix), or b""."""
    for blob in blobs:
        try:
            with tarfile.open(fileobj=blob, mode="r:*") as tf:
                members = [m for m in tf.getmembers() if m.isfile() and os.path.basename(m.name) == name]
                for member in sorted(members, key=lambda m: len(m.name)):
                    handle = tf.extractfile(member)
                    if handle is not None:
                        handle.seek(max(0, member.size - limit))
                        return handle.read()
        except (tarfile.TarError, OSError):
            continue
    return b""


class SandboxTransport(Transport):
    """Inputs in the input sandbox, outputs in one results archive the OutputSandbox lists."""

    name = "sandbox"

    def add_input(self, spec: JobSpec, root: str, config: Dict[str, list], galaxy_path: str, rel: str) -> None:
        dest = os.path.join(root, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(galaxy_path, dest)

    def add_outputs(self, spec: JobSpec, mapper: PathMapper, config: Dict[str, object]) -> None:
        config["output_files"] = [str(mapper.relative(p)) for p in _unique_paths(spec.outputs)]
        if spec.max_output_bytes:
            config["max_output_bytes"] = int(spec.max_output_bytes)

    def output_sandbox(self) -> List[str]:
        return [STDOUT, STDERR, RESULTS]

    def install(self, spec: JobSpec, sandboxes: Callable[[], List[io.BytesIO]]) -> List[str]:
        work = spec.working_directory
        unpacked = os.path.join(work, RESULTS_DIR)
        shutil.rmtree(unpacked, ignore_errors=True)
        os.makedirs(unpacked)
        try:
            limit = _extraction_cap(spec)
            for n, blob in enumerate(sandboxes()):
                archive = os.path.join(work, f"{RESULTS_DIR}-{n}")
                with open(archive, "wb") as stream:
                    stream.write(blob.getvalue())
                safe_extract(archive, os.path.join(unpacked, str(n)), max_total_bytes=limit)
                os.unlink(archive)
            # Whoever tarred the output sandbox (our pilot, a DIRAC JobWrapper) may have kept its own path prefix.
            found = sorted(_find(unpacked, RESULTS), key=len)
            if not found:
                raise ResultsMissing(f"the output sandbox holds no {RESULTS}: the payload did not finish on the node")
            results = os.path.join(unpacked, "results")
            safe_extract(found[0], results, max_total_bytes=limit)
            return install_unpacked(spec, results)
        finally:
            shutil.rmtree(unpacked, ignore_errors=True)


TRANSPORTS: Dict[str, Transport] = {t.name: t for t in (GalaxyTransport(), SandboxTransport())}


def _find(root: str, name: str) -> List[str]:
    return [os.path.join(folder, name) for folder, _dirs, files in os.walk(root) if name in files]


def _extraction_cap(spec: JobSpec) -> int:
    """Extracted bytes allowed for one job's results: the smallest of its output sandbox limit (with room for
    compression) and what Galaxy's limits let it produce, else 10 GiB: a node must not fill Galaxy's disk."""
    caps = [4 * int(spec.max_output_bytes)] if spec.max_output_bytes else []
    caps += [int(spec.max_result_bytes)] if spec.max_result_bytes else []
    return min(caps) if caps else DEFAULT_MAX_TOTAL_BYTES


def transport(name: str) -> Transport:
    try:
        return TRANSPORTS[name]
    except KeyError:
        raise ValueError(f"unknown transport {name!r}; expected one of {', '.join(TRANSPORTS)}") from None


def build_bundle(spec: JobSpec) -> Bundle:
    """Write the bundle directory and pack it as ``<working dir>/galaxy_dirac_bundle.tar.bz2``."""
    strategy = transport(spec.transport)
    strategy.check(spec)
    work = os.path.abspath(spec.working_directory)
    skip = {BUNDLE_DIR, BUNDLE_ARCHIVE, RESULTS_DIR, STATE_FILE, ATTEMPTS_DIR}
    texts = _texts(work, skip)  # what the job script, tool script and config files name
    references = referenced_files(spec.reference_dirs, list(texts.values()))
    mapper = PathMapper(spec, reference_dirs=list(references))
    root = os.path.join(work, BUNDLE_DIR)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    rewrite: List[str] = []

    # Galaxy's working directory, rewritten.
    _copy_tree(work, os.path.join(root, "work"), mapper, rewrite, "work", skip, texts=texts)
    tool_rel = mapper.dirs.get(os.path.abspath(spec.tool_dir)) if spec.tool_dir else None
    if tool_rel:
        only = tool_files(str(spec.tool_dir), list(texts.values()))
        _copy_tree(str(spec.tool_dir), os.path.join(root, tool_rel), mapper, rewrite, tool_rel, set(), only=only)

    config: Dict[str, list] = {"inputs": [], "outputs": []}
    input_files: List[Tuple[str, str]] = [(path, mapper.files[path]) for path in _unique_paths(spec.inputs)]
    missing = [path for path, _rel in input_files if not os.path.isfile(path)]
    if missing:
        shutil.rmtree(root, ignore_errors=True)
        raise InputMissing(
            f"{len(missing)} input dataset(s) have no data on the Galaxy server (purged, or deferred and not "
            f"materialised): {', '.join(os.path.basename(p) for p in missing[:5])}"
        )
    for folder in _unique_paths(spec.input_extra_dirs):
        for dirpath, _dirs, files in os.walk(folder):
            for name in sorted(files):
                full = os.path.join(dirpath, name)
                input_files.append((full, str(mapper.relative(full))))
    for files in references.values():
        input_files.extend((full, str(mapper.relative(full))) for full in files)
    for path, rel in dict(input_files).items():  # a reference folder may hold an input dataset too
        strategy.add_input(spec, root, config, path, rel)
    # Galaxy creates empty output files before a job runs and job scripts rely on it (from_work_dir copies test
    # ``-f <output>``), so the bundle carries them empty too.
    for path in _unique_paths(spec.outputs):
        dest = os.path.join(root, str(mapper.relative(path)))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        open(dest, "wb").close()
    payload: Dict[str, object] = dict(config)
    strategy.add_outputs(spec, mapper, payload)
    payload["output_dirs"] = [str(mapper.relative(p)) for p in _unique_paths(spec.output_extra_dirs)]
    payload.update(
        {
            "transport": strategy.name,
            "job_script": "work/" + os.path.relpath(spec.job_script, work),
            "rewrite": rewrite,
        }
    )
    if spec.exit_code_file:
        payload["exit_code_file"] = str(mapper.relative(spec.exit_code_file))
    if spec.processors:
        payload["processors"] = int(spec.processors)
    if spec.memory_mb:
        payload["memory_mb"] = int(spec.memory_mb)
    with open(os.path.join(root, CONFIG), "w", encoding="utf-8") as stream:
        json.dump(payload, stream, indent=1)
    with open(os.path.join(root, LAUNCHER), "w", encoding="utf-8") as stream:
        stream.write(launcher_script())
    os.chmod(os.path.join(root, LAUNCHER), 0o755)
    with open(os.path.join(root, ZIPAPP), "wb") as stream:
        stream.write(_payload_zipapp())
    archive = os.path.join(work, BUNDLE_ARCHIVE)
    _sha, size = create_archive(archive, root, "tar.bz2")
    shutil.rmtree(root, ignore_errors=True)
    if spec.max_input_bytes and size > spec.max_input_bytes:
        os.unlink(archive)
        raise LimitError(
            f"the job's input sandbox would be {size / 1e6:.1f} MB, over this destination's input sandbox limit of "
            f"{spec.max_input_bytes / 1e6:.1f} MB (input_sandbox_limit); send the inputs through Galaxy's job files "
            "API instead with transport: galaxy"
        )
    return Bundle(archive, strategy.output_sandbox(), payload, mapper, size)


_ZIPAPP_CACHE: Dict[str, bytes] = {}


def _payload_zipapp() -> bytes:
    """The payload zipapp, built once per process (deterministic, ~40 kB)."""
    if "payload" not in _ZIPAPP_CACHE:
        _ZIPAPP_CACHE["payload"] = zipapp_bytes(sources=payload_sources())
    return _ZIPAPP_CACHE["payload"]


def _push(spec: JobSpec, rel: str, galaxy_path: str, optional: bool) -> Dict[str, object]:
    return {
        # Parameters only in the form: Galaxy merges query and form, and a doubled job_key no longer matches.
        "url": f"{str(spec.galaxy_url).rstrip('/')}/api/jobs/{spec.encoded_job_id}/files",
        "path": rel,
        "method": "POST",
        "field": "file",
        "fields": {"path": galaxy_path, "job_key": spec.job_key},
        "optional": optional,
    }


def _copy_tree(
    src: str,
    dest: str,
    mapper: PathMapper,
    rewrite: List[str],
    rel_root: str,
    skip: set,
    *,
    only: Optional[List[str]] = None,
    texts: Optional[Dict[str, str]] = None,
) -> None:
    """Copy ``src`` to ``dest`` rewriting Galaxy paths in text files; ``only`` limits it to those relative files.

    ``texts`` are the text files of ``src`` already read (:func:`_texts`), so the job directory is read once."""
    wanted = set(only) if only is not None else None
    for dirpath, dirs, files in os.walk(src):
        rel_dir = os.path.relpath(dirpath, src)
        if rel_dir == ".":
            dirs[:] = [d for d in dirs if d not in skip]
            files = [f for f in files if f not in skip]
            rel_dir = ""
        target_dir = os.path.join(dest, rel_dir)
        if wanted is None:
            os.makedirs(target_dir, exist_ok=True)
        for name in files:
            source = os.path.join(dirpath, name)
            if os.path.islink(source) or not os.path.isfile(source):
                continue
            rel_file = "/".join(p for p in (rel_dir, name) if p)
            if wanted is not None and rel_file not in wanted:
                continue
            os.makedirs(target_dir, exist_ok=True)
            target = os.path.join(target_dir, name)
            rel = "/".join(p for p in (rel_root, rel_file) if p)
            text = texts.get(source) if texts is not None else _read_text(source)
            if text is not None:
                new = mapper.rewrite(text)
                if new != text:
                    with open(target, "wb") as out:
                        out.write(new.encode("utf-8", errors="surrogateescape"))
                    shutil.copymode(source, target)
                    rewrite.append(rel)
                    continue
            shutil.copy2(source, target)


def _read_text(path: str) -> Optional[str]:
    """A file's text if the bundle rewrites it (a regular file, not too big, no NUL byte), else None."""
    if os.path.islink(path) or not os.path.isfile(path) or os.path.getsize(path) > MAX_REWRITE_BYTES:
        return None
    with open(path, "rb") as stream:
        data = stream.read()
    return None if b"\0" in data else data.decode("utf-8", errors="surrogateescape")


def _texts(root: str, skip: set) -> Dict[str, str]:
    """Path → text of the files under ``root`` (the job's working directory) that the bundle rewrites."""
    texts = {}
    for dirpath, dirs, files in os.walk(root):
        if dirpath == root:
            dirs[:] = [d for d in dirs if d not in skip]
            files = [f for f in files if f not in skip]
        for name in files:
            path = os.path.join(dirpath, name)
            text = _read_text(path)
            if text is not None:
                texts[path] = text
    return texts


def restore_work(spec: JobSpec, tar_path: str) -> List[str]:
    """Extract the node's ``galaxy_dirac_work.tar`` into Galaxy's working directory; returns what it wrote."""
    return safe_extract(tar_path, spec.working_directory, max_total_bytes=_extraction_cap(spec))


def install_unpacked(spec: JobSpec, root: str) -> List[str]:
    """Move results laid out as on the node (``outputs/<name>``, ``outputs/dataset_<uuid>_files/…``,
    :data:`WORK_TAR`) from ``root`` to their Galaxy paths; returns the output datasets placed."""
    mapper = PathMapper(spec)
    placed: List[str] = []
    for path in _unique_paths(spec.outputs):
        source = os.path.join(root, str(mapper.relative(path)))
        if os.path.isfile(source):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            shutil.move(source, path)
            placed.append(path)
    for path in _unique_paths(spec.output_extra_dirs):
        source = os.path.join(root, str(mapper.relative(path)))
        if os.path.isdir(source):
            shutil.copytree(source, path, dirs_exist_ok=True)
    tar = os.path.join(root, WORK_TAR)
    if os.path.isfile(tar):
        restore_work(spec, tar)
    return placed


def install_results(spec: JobSpec, sandboxes: Callable[[], List[io.BytesIO]]) -> List[str]:
    """Put a Done job's results in place Galaxy-side, whichever transport carried them."""
    try:
        return transport(spec.transport).install(spec, sandboxes)
    except UnsafeArchiveError as exc:
        hint = ""
        if "exceeds the limit" in str(exc):
            hint = (
                f" (at most {_extraction_cap(spec) / 1e6:.1f} MB may come back: the destination's "
                "output_sandbox_limit and Galaxy's output_size job limit set it)"
            )
        raise ResultsMissing(f"the job's results were refused: {exc}{hint}") from None


def save_state(working_directory: str, data: Dict[str, object]) -> None:
    """Persist what finishing needs (DIRAC id, spec) in the job directory, atomically."""
    path = os.path.join(working_directory, STATE_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as stream:
        json.dump(data, stream)
    os.replace(tmp, path)


def load_state(working_directory: str) -> Optional[Dict[str, object]]:
    try:
        with open(os.path.join(working_directory, STATE_FILE), encoding="utf-8") as stream:
            return json.load(stream)
    except (OSError, ValueError):
        return None


def spec_to_dict(spec: JobSpec) -> Dict[str, object]:
    return dict(spec.__dict__)


def spec_from_dict(data: Dict[str, object]) -> JobSpec:
    known = set(JobSpec.__dataclass_fields__)
    return JobSpec(**{k: v for k, v in data.items() if k in known})  # type: ignore[arg-type]
