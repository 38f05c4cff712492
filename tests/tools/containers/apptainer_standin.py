"""A stand-in for ``apptainer`` (not packaged for this Debian), named as such wherever it is used.

It accepts what Galaxy's ``build_singularity_run_command`` writes (``apptainer -s exec [--pwd D] [--cleanenv] … -B
src:dst[:mode] … IMAGE COMMAND``) and checks what a real Apptainer needs on the node: the image file and every bind
source exist, binds keep their paths (the tool sees the node's paths), the working directory and the command's path
arguments are inside a bind; ``GALAXY_DIRAC_STANDIN_ABSENT`` names a directory that counts as missing (Galaxy's own
tree, which a real node does not have but a test node on Galaxy's machine does).
Then it runs COMMAND on the host (no isolation) with ``SINGULARITYENV_*`` as the environment under ``--cleanenv``,
plus ``GALAXY_DIRAC_STANDIN_IMAGE`` naming the image, so a test can tell the job went through it. Failures print
``FATAL:`` on stderr and exit 255, as Apptainer does.
"""

from __future__ import annotations

import os
import sys
from typing import List


def fatal(message: str) -> None:
    print(f"FATAL:   {message}", file=sys.stderr, flush=True)
    sys.exit(255)


def main(argv: List[str]) -> None:
    if argv[:1] == ["--version"]:
        print("apptainer version 1.3.0-galaxy-dirac-standin")
        return
    args = list(argv)
    if args[:1] == ["-s"]:
        args.pop(0)
    if args[:1] != ["exec"]:
        fatal(f"stand-in only knows 'exec', got {argv!r}")
    args.pop(0)
    pwd, cleanenv, binds = None, False, []
    while args and args[0].startswith("-"):
        flag = args.pop(0)
        if flag in ("--pwd", "-B", "--bind", "--home", "--no-mount"):
            value = args.pop(0)
            if flag == "--pwd":
                pwd = value
            elif flag in ("-B", "--bind"):
                binds.append(value)
        elif flag == "--cleanenv":
            cleanenv = True
    if len(args) < 2:
        fatal("no image or command")
    image, command = args[0], args[1:]
    if not os.path.isfile(image):
        fatal(f"could not open image {image}: failed to retrieve path for {image}: lstat {image}: no such file")
    absent = os.environ.get("GALAXY_DIRAC_STANDIN_ABSENT")
    targets = []
    for bind in binds:
        parts = bind.split(":")
        source, target = parts[0], parts[1] if len(parts) > 1 and parts[1] not in ("ro", "rw") else parts[0]
        missing = absent and (os.path.realpath(source) + "/").startswith(os.path.realpath(absent) + "/")
        if missing or not os.path.exists(source):
            fatal(f"container creation failed: mount {source}->{target} error: while mounting {source}: no such file")
        if os.path.realpath(source) != os.path.realpath(target) and target != "/tmp":
            fatal(f"stand-in binds only at the same path: {bind}")
        targets.append(os.path.realpath(target))

    def inside(path: str) -> bool:
        real = os.path.realpath(path)
        return any(real == t or real.startswith(t.rstrip("/") + "/") for t in targets)

    if pwd and not inside(pwd):
        fatal(f"--pwd {pwd} is not inside any bind mount ({binds})")
    for word in " ".join(command).split():
        path = word.strip("'\"")
        if path.startswith("/") and not path.startswith(("/bin/", "/usr/")) and not inside(path):
            fatal(f"{path} is not inside any bind mount ({binds})")
    env = {k[len("SINGULARITYENV_"):]: v for k, v in os.environ.items() if k.startswith("SINGULARITYENV_")}
    if not cleanenv:
        env = {**os.environ, **env}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env["GALAXY_DIRAC_STANDIN_IMAGE"] = image
    if pwd:
        os.chdir(pwd)
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    main(sys.argv[1:])
