#!/bin/sh
# Fetch Postfix's smtp-source (and smtp-sink) without installing a mail system: download the
# Debian package, unpack it under $POSTFIX_ROOT, and print the path of the smtp-source binary.
# The binary needs the package's private libraries: run it with
#   LD_LIBRARY_PATH=$POSTFIX_ROOT/usr/lib/postfix
# Idempotent: a second run only prints the path.
set -eu

POSTFIX_ROOT=${POSTFIX_ROOT:-/opt/postfix-x}
BIN="$POSTFIX_ROOT/usr/sbin/smtp-source"
LIBS="$POSTFIX_ROOT/usr/lib/postfix"

if [ ! -x "$BIN" ]; then
    workdir=$(mktemp -d)
    trap 'rm -rf "$workdir"' EXIT
    if ! (cd "$workdir" && apt-get download postfix >&2); then
        apt-get update >&2
        (cd "$workdir" && apt-get download postfix >&2)
    fi
    mkdir -p "$POSTFIX_ROOT"
    dpkg -x "$workdir"/postfix_*.deb "$POSTFIX_ROOT"
fi

# Every shared library must resolve (the system ones: libdb, libicu, libnsl, ... usually do).
if LD_LIBRARY_PATH="$LIBS" ldd "$BIN" | grep -q "not found"; then
    echo "smtp-source: missing shared libraries:" >&2
    LD_LIBRARY_PATH="$LIBS" ldd "$BIN" | grep "not found" >&2
    exit 1
fi

echo "$BIN"
