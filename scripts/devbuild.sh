#!/usr/bin/env bash
# Developer helper: build fastspawn._C from a chosen subset of csrc/ into
# python/fastspawn (e.g. while another part of csrc/ is mid-change).
# Usage: scripts/devbuild.sh csrc/error.c csrc/supervise.c ...
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=$(cat "$root/.fs-python")
inc=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
suffix=$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
gcc -shared -fPIC -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -O2 -fvisibility=hidden \
    -Wno-missing-field-initializers -I"$root/csrc" -I"$inc" "$@" -lpthread -ldl \
    -o "$root/python/fastspawn/_C$suffix"
