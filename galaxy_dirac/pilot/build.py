"""Build the pilot as one self-contained file (a zipapp) for worker nodes.

Worker nodes get the pilot inside a pilot wrapper script or cloud-init user data, so it must be a single file that
``python3 pilot.pyz --url ...`` runs with nothing installed. The zipapp holds the pilot package and the stdlib-only
archive module, with fixed timestamps, permissions and order so that the same sources always give the same bytes (the
SiteDirector can then cache and compare it by checksum).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import zipfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

_EPOCH = (1980, 1, 1, 0, 0, 0)
_MAIN = b"""\"\"\"Run the galaxy-dirac pilot.\"\"\"
import sys

from galaxy_dirac.pilot.pilot import main

sys.exit(main())
"""
_PAYLOAD_MAIN = b"""\"\"\"Run the Galaxy job in the current directory.\"\"\"
import sys

from galaxy_dirac.payload.job import main

sys.exit(main())
"""
#: Modules of the pilot package that are only needed to build it.
_BUILD_ONLY = {"build.py"}
#: Stdlib modules of the package that both zipapps ship: the contracts and the archive code they share.
_SHARED = ("__init__.py", "archive.py", "states.py", "times.py", "payload/__init__.py")


def _sources(main: bytes, modules: Sequence[str]) -> List[Tuple[str, bytes]]:
    root = Path(__file__).resolve().parent.parent
    files: List[Tuple[str, bytes]] = [("__main__.py", main), ("galaxy_dirac/__init__.py", b"")]
    for name in modules:
        if name != "__init__.py":
            files.append((f"galaxy_dirac/{name}", (root / name).read_bytes()))
    return sorted(files)


def pilot_sources() -> List[Tuple[str, bytes]]:
    """(name in the zipapp, content) of every file the pilot needs, sorted."""
    package = Path(__file__).resolve().parent
    modules = list(_SHARED) + [f"pilot/{p.name}" for p in sorted(package.glob("*.py")) if p.name not in _BUILD_ONLY]
    return _sources(_MAIN, modules)


def payload_sources() -> List[Tuple[str, bytes]]:
    """What the Galaxy job payload needs: the payload package and the pilot's transfer code, nothing else."""
    payload = Path(__file__).resolve().parent.parent / "payload"
    modules = list(_SHARED) + [f"payload/{p.name}" for p in sorted(payload.glob("*.py")) if p.name != "__init__.py"]
    modules += ["pilot/__init__.py", "pilot/http.py", "pilot/staging.py"]
    return _sources(_PAYLOAD_MAIN, modules)


def zipapp_bytes(interpreter: str = "/usr/bin/env python3", sources: Optional[List[Tuple[str, bytes]]] = None) -> bytes:
    """The zipapp's bytes (the pilot's unless ``sources`` says otherwise): a ``#!`` line, then a deterministic zip."""
    buffer = io.BytesIO()
    buffer.write(f"#!{interpreter}\n".encode())
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in sources if sources is not None else pilot_sources():
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3
            info.external_attr = 0o100644 << 16
            archive.writestr(info, content, compresslevel=9)
    return buffer.getvalue()


def build_zipapp(dest: Union[str, os.PathLike], interpreter: str = "/usr/bin/env python3") -> Path:
    """Write the pilot zipapp to ``dest`` (atomically, mode 0755) and return its path."""
    path = Path(dest)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(zipapp_bytes(interpreter))
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m galaxy_dirac.pilot.build DEST``: write the zipapp."""
    parser = argparse.ArgumentParser(prog="python -m galaxy_dirac.pilot.build", description=__doc__.split("\n")[0])
    parser.add_argument("dest", help="where to write the zipapp, e.g. pilot.pyz")
    parser.add_argument("--python", default="/usr/bin/env python3", help="interpreter for the #! line")
    options = parser.parse_args(argv)
    print(build_zipapp(options.dest, options.python))
    return 0


if __name__ == "__main__":
    sys.exit(main())
