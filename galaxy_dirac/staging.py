"""The job's view from the worker node: path rewriting, the job bundle (input sandbox) and the staging manifest.

No shared file system: every Galaxy path the job script uses (job working directory, input and output datasets and
their extra files, tool directory) is rewritten to a path inside the job's directory on the node. The node directory
is only known when the job runs (``<pilot workdir>/job-<DIRAC id>``), so Galaxy-side we write a placeholder
(:data:`PLACEHOLDER`) and the launcher replaces it with ``$PWD`` before running the Galaxy job script.

Layout on the node (relative to the job directory)::

    galaxy_dirac_launch.sh        the DIRAC Executable
    galaxy_dirac_manifest.json    what the job wrapper pulls/pushes (transport ``galaxy``)
    work/                         Galaxy's job working directory (job script, tool script, configs, outputs/…)
    inputs/<name>                 input datasets; inputs/<name>_files/… their extra files
    outputs/<name>                output datasets
    tool/                         the tool directory (when small)
    galaxy_dirac_work.tar         after the run: every file created or changed under work/ (tool_stdout/stderr,
                                  exit code, job metrics, from_work_dir and discovered outputs, extra files, …)

Transports: ``galaxy`` — inputs are pulled from and outputs pushed to Galaxy's job files API by the job wrapper;
``sandbox`` — inputs travel in the input sandbox, outputs in the output sandbox, fetched by the runner at Done.
This module does not import Galaxy; the runner fills a :class:`JobSpec` from the job wrapper.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import urllib.parse
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from galaxy_dirac.archive import create_archive, safe_extract

PLACEHOLDER = "@@GALAXY_DIRAC_JOB_DIR@@"
LAUNCHER = "galaxy_dirac_launch.sh"
MANIFEST = "galaxy_dirac_manifest.json"
WORK_TAR = "galaxy_dirac_work.tar"
STDOUT = "galaxy_dirac.out"
STDERR = "galaxy_dirac.err"
BUNDLE_DIR = "__galaxy_dirac_bundle"
BUNDLE_ARCHIVE = "galaxy_dirac_bundle.tar.bz2"
RESULTS_DIR = "__galaxy_dirac_results"
STATE_FILE = "galaxy_dirac_state.json"
TRANSPORTS = ("galaxy", "sandbox")

#: Text files larger than this are bundled verbatim (not rewritten); tool directories larger than the cap are not sent.
MAX_REWRITE_BYTES = 4 << 20
MAX_TOOL_DIR_BYTES = 16 << 20


@dataclass
class JobSpec:
    """What the bundle needs to know about one Galaxy job (all paths absolute, Galaxy side)."""

    galaxy_job_id: int
    working_directory: str
    job_script: str  # absolute path of the Galaxy job script (inside working_directory)
    inputs: List[str] = field(default_factory=list)  # input dataset files
    input_extra_dirs: List[str] = field(default_factory=list)  # their extra_files_path directories
    outputs: List[str] = field(default_factory=list)  # output dataset files (real paths)
    tool_dir: Optional[str] = None
    transport: str = "galaxy"
    galaxy_url: Optional[str] = None  # Galaxy as seen from the worker nodes (transport galaxy)
    encoded_job_id: Optional[str] = None
    job_key: Optional[str] = None


class PathMapper:
    """Galaxy path → path relative to the node's job directory; longest prefix wins."""

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.files: Dict[str, str] = {}  # exact file paths
        self.dirs: Dict[str, str] = {}  # directory prefixes
        self.dirs[os.path.abspath(spec.working_directory)] = "work"
        names: Dict[str, int] = {}
        for path in spec.inputs:
            self.files[os.path.abspath(path)] = "inputs/" + self._unique(os.path.basename(path), names)
        for path in spec.input_extra_dirs:
            self.dirs[os.path.abspath(path)] = "inputs/" + self._unique(os.path.basename(path.rstrip("/")), names)
        out_names: Dict[str, int] = {}
        for path in spec.outputs:
            self.files[os.path.abspath(path)] = "outputs/" + self._unique(os.path.basename(path), out_names)
        if spec.tool_dir and os.path.isdir(spec.tool_dir) and _tree_size(spec.tool_dir) <= MAX_TOOL_DIR_BYTES:
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


def _replace_path(text: str, path: str, replacement: str) -> str:
    out: List[str] = []
    start = 0
    while True:
        found = text.find(path, start)
        if found < 0:
            out.append(text[start:])
            return "".join(out)
        end = found + len(path)
        after = text[end : end + 1]
        if after and (after.isalnum() or after in "_-."):
            out.append(text[start:end])
        else:
            out.append(text[start:found])
            out.append(replacement)
        start = end


def _tree_size(root: str) -> int:
    total = 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(folder, name))
            if total > MAX_TOOL_DIR_BYTES:
                return total
    return total


def launcher_script(job_script_rel: str) -> str:
    """The DIRAC Executable: rewrite the placeholder, run the Galaxy job script, pack what it produced.

    It exits 0 whenever the Galaxy job script ran to the point of writing its exit code, so a tool failure is judged
    by Galaxy (exit code, stderr, stdio rules) and a DIRAC ``Failed`` means an infrastructure problem.
    """
    return f"""#!/bin/sh
# galaxy-dirac launcher: generated, do not edit.
J="$(pwd -P)"
E=$(printf '%s' "$J" | sed -e 's/[#&\\\\]/\\\\&/g')
mkdir -p outputs work inputs
if [ -f galaxy_dirac_rewrite.list ]; then
    while IFS= read -r f; do
        [ -f "$f" ] && sed -i "s#{PLACEHOLDER}#$E#g" "$f"
    done < galaxy_dirac_rewrite.list
fi
chmod +x "work/{job_script_rel}"
touch .galaxy_dirac_start
sleep 0.01 2>/dev/null || true
/bin/sh "work/{job_script_rel}" > "work/{_stream(job_script_rel, "o")}" 2> "work/{_stream(job_script_rel, "e")}"
rc=$?
echo "galaxy job script exited with $rc"
(cd work && find . -newer ../.galaxy_dirac_start \\( -type f -o -type l \\) -print > ../galaxy_dirac_work.list \
    && tar -cf "../{WORK_TAR}" -T ../galaxy_dirac_work.list) || exit 3
if ls work/galaxy_*.ec > /dev/null 2>&1; then
    exit 0
fi
tail -c 4000 "work/{_stream(job_script_rel, "e")}" >&2
exit $(( rc == 0 ? 4 : rc ))
"""


def _stream(job_script_rel: str, kind: str) -> str:
    base = os.path.basename(job_script_rel)
    stem = base[:-3] if base.endswith(".sh") else base
    return f"{stem}.{kind}"


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
    manifest: Dict[str, object]
    mapper: PathMapper


def build_bundle(spec: JobSpec) -> Bundle:
    """Write the bundle directory and pack it as ``<working dir>/galaxy_dirac_bundle.tar.bz2``."""
    if spec.transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {spec.transport!r}; expected one of {', '.join(TRANSPORTS)}")
    if spec.transport == "galaxy" and not (spec.galaxy_url and spec.encoded_job_id and spec.job_key):
        raise ValueError("transport 'galaxy' needs galaxy_url, encoded job id and job key")
    mapper = PathMapper(spec)
    work = os.path.abspath(spec.working_directory)
    root = os.path.join(work, BUNDLE_DIR)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    rewrite: List[str] = []

    # Galaxy's working directory, rewritten.
    skip = {BUNDLE_DIR, BUNDLE_ARCHIVE, RESULTS_DIR, STATE_FILE}
    _copy_tree(work, os.path.join(root, "work"), mapper, rewrite, "work", skip)
    tool_rel = mapper.dirs.get(os.path.abspath(spec.tool_dir)) if spec.tool_dir else None
    if tool_rel:
        _copy_tree(str(spec.tool_dir), os.path.join(root, tool_rel), mapper, rewrite, tool_rel, set())

    manifest: Dict[str, object] = {"inputs": [], "outputs": []}
    inputs: List[Dict[str, object]] = []
    outputs: List[Dict[str, object]] = []
    input_files: List[Tuple[str, str]] = []
    for path in spec.inputs:
        input_files.append((path, str(mapper.relative(path))))
    for folder in spec.input_extra_dirs:
        for dirpath, _dirs, files in os.walk(folder):
            for name in files:
                full = os.path.join(dirpath, name)
                input_files.append((full, str(mapper.relative(full))))
    for path, rel in input_files:
        if spec.transport == "sandbox":
            dest = os.path.join(root, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            if os.path.exists(path):
                shutil.copyfile(path, dest)
        else:
            entry: Dict[str, object] = {"url": files_api_url(spec, path), "path": rel}
            if os.path.exists(path):
                entry["size"] = os.path.getsize(path)
            inputs.append(entry)
    # Galaxy creates empty output files before a job runs and job scripts rely on it (from_work_dir copies test
    # ``-f <output>``), so the bundle carries them empty too.
    for path in spec.outputs:
        dest = os.path.join(root, str(mapper.relative(path)))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        open(dest, "wb").close()
    output_sandbox = [STDOUT, STDERR]
    if spec.transport == "galaxy":
        for path in spec.outputs:
            outputs.append(_push(spec, str(mapper.relative(path)), path, optional=True))
        outputs.append(_push(spec, WORK_TAR, os.path.join(work, RESULTS_DIR + ".tar"), optional=False))
    else:
        output_sandbox += ["outputs", WORK_TAR]
    manifest["inputs"] = inputs
    manifest["outputs"] = outputs
    with open(os.path.join(root, MANIFEST), "w", encoding="utf-8") as stream:
        json.dump(manifest, stream, indent=1)
    job_script_rel = os.path.relpath(spec.job_script, work)
    with open(os.path.join(root, LAUNCHER), "w", encoding="utf-8") as stream:
        stream.write(launcher_script(job_script_rel))
    os.chmod(os.path.join(root, LAUNCHER), 0o755)
    with open(os.path.join(root, "galaxy_dirac_rewrite.list"), "w", encoding="utf-8") as stream:
        stream.write("".join(f"{rel}\n" for rel in rewrite))
    archive = os.path.join(work, BUNDLE_ARCHIVE)
    create_archive(archive, root, "tar.bz2")
    shutil.rmtree(root, ignore_errors=True)
    return Bundle(archive, output_sandbox, manifest, mapper)


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


def _copy_tree(src: str, dest: str, mapper: PathMapper, rewrite: List[str], rel_root: str, skip: set) -> None:
    for dirpath, dirs, files in os.walk(src):
        rel_dir = os.path.relpath(dirpath, src)
        if rel_dir == ".":
            dirs[:] = [d for d in dirs if d not in skip]
            files = [f for f in files if f not in skip]
            rel_dir = ""
        target_dir = os.path.join(dest, rel_dir)
        os.makedirs(target_dir, exist_ok=True)
        for name in files:
            source = os.path.join(dirpath, name)
            if os.path.islink(source) or not os.path.isfile(source):
                continue
            target = os.path.join(target_dir, name)
            rel = "/".join(p for p in (rel_root, rel_dir, name) if p)
            if os.path.getsize(source) <= MAX_REWRITE_BYTES:
                with open(source, "rb") as stream:
                    data = stream.read()
                if b"\0" not in data:
                    text = data.decode("utf-8", errors="surrogateescape")
                    new = mapper.rewrite(text)
                    if new != text:
                        with open(target, "wb") as out:
                            out.write(new.encode("utf-8", errors="surrogateescape"))
                        shutil.copymode(source, target)
                        rewrite.append(rel)
                        continue
            shutil.copy2(source, target)


def restore_work(spec: JobSpec, tar_path: str) -> List[str]:
    """Extract the node's ``galaxy_dirac_work.tar`` into Galaxy's working directory; returns what it wrote."""
    return safe_extract(tar_path, spec.working_directory)


def install_sandbox_outputs(spec: JobSpec, extracted_root: str) -> List[str]:
    """Transport sandbox: copy ``outputs/<name>`` to the Galaxy output paths and restore the work tar."""
    mapper = PathMapper(spec)
    placed: List[str] = []
    for path in spec.outputs:
        rel = mapper.relative(path)
        source = os.path.join(extracted_root, str(rel))
        if os.path.isfile(source):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            shutil.copyfile(source, path)
            placed.append(path)
    tar = os.path.join(extracted_root, WORK_TAR)
    if os.path.isfile(tar):
        restore_work(spec, tar)
    return placed


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
    return JobSpec(**data)  # type: ignore[arg-type]


def output_sandbox_patterns(transport: str) -> Sequence[str]:
    return [STDOUT, STDERR] + (["outputs", WORK_TAR] if transport == "sandbox" else [])
