#!/bin/sh
# Used by compat_tool_directory.xml through $__tool_directory__.
printf 'lines\t%s\n' "$(wc -l < "$1" | tr -d ' ')"
