#!/usr/bin/env bash
# Developer helper: build fastspawn._C from a chosen subset of csrc/ into python/fastspawn
# (e.g. while another part of csrc/lib/ is mid-change), with the flags of csrc/flags.mk.
# Usage: scripts/devbuild.sh csrc/lib/error.c csrc/lib/supervise.c csrc/python/*.c ...
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=$(cat "$root/.fs-python")
flags() { sed -n "s/^$1 *:= *//p" "$root/csrc/flags.mk"; }
inc=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
suffix=$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
# shellcheck disable=SC2046 # the flags are words
gcc -shared -fPIC $(flags FS_CFLAGS) $(flags FS_DEV_CFLAGS) -I"$root/csrc/include" \
    -I"$root/csrc/lib" -I"$root/csrc/python" -I"$inc" "$@" $(flags FS_LDLIBS) \
    -o "$root/python/fastspawn/_C$suffix"
