#!/bin/sh
# make install: the sglr binary, its man page (written from its --help) and
# the sglang_router Python package (standard library only), under
# $DESTDIR$PREFIX:
#
#   bin/sglr
#   share/man/man1/sglr.1
#   <python3's site directory under PREFIX>/sglang_router/
#
# usage: packaging/install.sh BUILD_DIR
# environment: PREFIX (/usr/local), DESTDIR (empty), PYTHON (python3),
#              PYTHONDIR (default: the site directory PYTHON reads under PREFIX)
set -eu

build=${1:?usage: packaging/install.sh BUILD_DIR}
src=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${PREFIX:-/usr/local}
PREFIX=${PREFIX%/}
DESTDIR=${DESTDIR:-}
PYTHON=${PYTHON:-python3}

bindir=$PREFIX/bin
mandir=$PREFIX/share/man/man1

# Where `python3 -m sglang_router...` finds the package without PYTHONPATH:
# the site directory of this Python under PREFIX (Debian's python3 reads
# /usr/local/lib/python3.X/dist-packages for PREFIX=/usr/local). A Python
# with none there (a virtualenv, pyenv) gets PREFIX/lib/python3.X/site-packages,
# to be put on PYTHONPATH.
if [ -z "${PYTHONDIR:-}" ]; then
  PYTHONDIR=$("$PYTHON" - "$PREFIX" <<'PY'
import site, sys, sysconfig
prefix = sys.argv[1]
for d in site.getsitepackages():
    if d.startswith(prefix + "/lib/"):
        print(d)
        break
else:
    print(sysconfig.get_path("purelib", "posix_prefix", {"base": prefix, "platbase": prefix}))
PY
)
  on_path=$("$PYTHON" -c 'import site, sys; print(int(sys.argv[1] in site.getsitepackages()))' "$PYTHONDIR")
else
  on_path=1
fi
pkgdir=$PYTHONDIR/sglang_router

version=$("$build/sglr" --version | awk '{ print $2 }')
man=$build/sglr.1
"$build/sglr" lua "$src/packaging/manpage.lua" "$build/sglr" > "$man.tmp"
mv "$man.tmp" "$man"

install -d "$DESTDIR$bindir" "$DESTDIR$mandir" "$DESTDIR$pkgdir"
install -m 755 "$build/sglr" "$DESTDIR$bindir/sglr"
install -m 644 "$man" "$DESTDIR$mandir/sglr.1"
for f in "$src"/python/sglang_router/*.py; do
  install -m 644 "$f" "$DESTDIR$pkgdir/"
done
# where the package finds the binary: relative to itself first, so a tree
# staged under DESTDIR (or moved as a whole) works as well as the real one
rel=$("$PYTHON" -c 'import os, sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "$bindir/sglr" "$pkgdir")
cat > "$DESTDIR$pkgdir/_install.py" <<PY
# Written by make install.
VERSION = "$version"
BIN = "$bindir/sglr"
BIN_FROM_PACKAGE = "$rel"
PY
chmod 644 "$DESTDIR$pkgdir/_install.py"

echo "installed $DESTDIR$bindir/sglr"
echo "installed $DESTDIR$mandir/sglr.1"
echo "installed $DESTDIR$pkgdir (python3 -m sglang_router.launch_router, launch_server; Router)"
if [ "$on_path" != 1 ]; then
  echo "note: $PYTHON does not read $PYTHONDIR; use PYTHONPATH=$PYTHONDIR (or PYTHON=/usr/bin/python3 make install)"
fi
