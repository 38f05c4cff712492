"""Used by compat_tool_directory.xml (through a macro token): upper-cases its input."""

import sys

with open(sys.argv[1]) as source, open(sys.argv[2], "w") as target:
    for line in source:
        target.write(line.rstrip("\n").upper() + " (helper)\n")
