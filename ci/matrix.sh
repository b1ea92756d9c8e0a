#!/usr/bin/env bash
# The OpenSSL matrix: build tlsctl's abi3 wheel ONCE, in the oldest system
# (Debian bullseye: Python 3.9 + OpenSSL 1.1.1), then install that same file
# and run the whole test suite against it in three systems:
#
#   host      this machine (Debian 12 here: Python 3.11 + OpenSSL 3.0)
#   bullseye  Python 3.9  + OpenSSL 1.1.1  (chroot; the RHEL 8 stand-in)
#   trixie    Python 3.13 + OpenSSL 3.5    (chroot)
#
# Chroots are made with debootstrap and reused when present (a chroot is
# only reused once fully set up: see the .tlsctl-ready marker).  pip inside
# the chroots cannot verify the registry's certificate here, so the test
# dependencies are downloaded on the host for each Python version and
# installed offline.  Needs root.  Any failure is fatal: nothing is skipped.
#
# Usage: ci/matrix.sh            (TLSCTL_CHROOTS overrides the cache folder)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${TLSCTL_CHROOTS:-/var/tmp/tlsctl-chroots}
MIRROR=${TLSCTL_MIRROR:-http://deb.debian.org/debian}
OUT="$CACHE/out"
BUILD_DEPS=(pip "setuptools>=77" "cffi>=1.14" wheel)
SUMMARY=()

log() { printf '\n=== matrix: %s\n' "$*"; }

mounted() { mountpoint -q "$1"; }

enter() {  # enter DIR CMD...: run CMD in the chroot with /proc and /dev
    local dir=$1; shift
    mounted "$dir/proc" || mount -t proc proc "$dir/proc"
    mounted "$dir/dev" || mount --bind /dev "$dir/dev"
    chroot "$dir" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 "$@"
}

cleanup() {
    local dir
    for dir in "$CACHE"/bullseye "$CACHE"/trixie; do
        for m in dev proc; do
            if [ -d "$dir/$m" ] && mounted "$dir/$m"; then umount -l "$dir/$m"; fi
        done
    done
}
trap cleanup EXIT

# Real peers the tests drive (tests/test_http_server.py, test_openssl_cli.py):
# installed from Debian's archive in every system, also into cached chroots.
PEERS=(curl openssl)

ensure_peers() {  # ensure_peers [DIR]: install PEERS in a chroot or the host
    local dir=${1:-} missing=() p
    for p in "${PEERS[@]}"; do
        if [ -n "$dir" ]; then
            enter "$dir" /bin/sh -c "command -v $p" >/dev/null || missing+=("$p")
        else
            command -v "$p" >/dev/null || missing+=("$p")
        fi
    done
    [ ${#missing[@]} -eq 0 ] && return
    log "${dir:-host}: installing ${missing[*]}"
    if [ -n "$dir" ]; then
        enter "$dir" /bin/sh -ec "apt-get update -q >/dev/null
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q ${missing[*]} >/dev/null"
    else
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
    fi
}

make_chroot() {  # make_chroot SUITE
    local suite=$1 dir="$CACHE/$1"
    if [ -f "$dir/.tlsctl-ready" ]; then
        log "$suite: reusing $dir"
        ensure_peers "$dir"
        return
    fi
    log "$suite: debootstrap into $dir"
    rm -rf "$dir"
    command -v debootstrap >/dev/null || {
        apt-get update -q && apt-get install -y -q debootstrap
    }
    debootstrap --variant=minbase \
        --include=python3,python3-dev,python3-venv,gcc,libc6-dev,binutils,openssl,curl \
        "$suite" "$dir" "$MIRROR"
    # The OpenSSL headers, unpacked aside (NOT installed): tlsctl must build
    # without them, and tests/test_build.py compares its constants with them.
    enter "$dir" /bin/sh -ec '
        apt-get update -q >/dev/null
        cd /tmp && apt-get download -q libssl-dev >/dev/null
        dpkg -x /tmp/libssl-dev_*.deb /opt/openssl-headers && rm /tmp/libssl-dev_*.deb'
    ensure_peers "$dir"
    touch "$dir/.tlsctl-ready"
}

wheels_for() {  # wheels_for PYVER: everything PYVER needs, for offline use
    # pip download evaluates environment markers against the HOST
    # interpreter, not --python-version, so resolve with uv for the target
    # version first (project deps, the [test] extra, build deps), then
    # download exactly that set.
    local pyver=$1 dest="$CACHE/wheels-$1" lock="$CACHE/lock-$1.txt"
    mkdir -p "$dest"
    log "wheels for Python $pyver -> $dest"
    printf '%s\n' "${BUILD_DEPS[@]}" > "$CACHE/build-deps.txt"
    python3 -m uv pip compile -q --no-header --no-annotate \
        --python-version "$pyver" --python-platform x86_64-manylinux_2_31 \
        --extra test "$ROOT/pyproject.toml" "$CACHE/build-deps.txt" -o "$lock"
    local platforms=() v
    for v in $(seq 5 31); do platforms+=(--platform "manylinux_2_${v}_x86_64"); done
    python3 -m pip download -q --no-deps --only-binary=:all: \
        --python-version "$pyver" "${platforms[@]}" \
        --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 \
        --platform manylinux1_x86_64 -d "$dest" -r "$lock"
}

copy_source() {  # copy_source DEST: the checkout without VCS or build output
    rm -rf "$1" && mkdir -p "$1"
    tar -C "$ROOT" --exclude=.git --exclude=build --exclude='*.so' \
        --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$1" -xf -
}

run_suite() {  # run_suite NAME PYTHON-RUNNER...: install the wheel, test, demo
    local name=$1; shift
    local log_file="$CACHE/$name.log"
    log "$name: tests against the installed wheel"
    if ! "$@" > "$log_file" 2>&1; then
        tail -n 60 "$log_file"
        echo "matrix: $name FAILED (full log: $log_file)" >&2
        exit 1
    fi
    grep -E '^(python|tlsctl):' "$log_file" || true
    grep -E '^tlsctl\.__file__' "$log_file"
    sed -n '/^tlsctl demo:/,/^patched:/p' "$log_file"
    local line
    line=$(grep -E '^=+ .*(passed|failed).* =+$' "$log_file" | tail -n 1)
    echo "$line"
    SUMMARY+=("$name: $line")
}

# The commands each system runs, given a venv path, a wheel dir and a source
# copy.  The suite runs from the source copy's tests/ while tlsctl itself is
# imported from the installed wheel (src/ is not on sys.path), which the
# first command proves.
suite_script() {  # suite_script VENV SRC WHEEL FINDLINKS
    cat <<EOF
set -e
rm -rf $1 && python3 -m venv $1
. $1/bin/activate
python -m pip install -q ${4:+--no-index --find-links $4} --upgrade pip
python -m pip install -q ${4:+--no-index --find-links $4} "$3[test]"
cd $2
export TLSCTL_OPENSSL_INCLUDE=/opt/openssl-headers/usr/include:/opt/openssl-headers/usr/include/x86_64-linux-gnu
python -c 'import tlsctl, sys; print("tlsctl.__file__", tlsctl.__file__); sys.exit("/site-packages/" not in tlsctl.__file__)'
python -m pytest -p no:cacheprovider
python -m tlsctl demo --connections 200
EOF
}

mkdir -p "$CACHE" "$OUT"
python3 -m pip install -q uv auditwheel
make_chroot bullseye
make_chroot trixie
# Exact versions: pip reads "3.9" as 3.9.0, which some packages exclude.
PY_BULLSEYE=$(enter "$CACHE/bullseye" python3 -c 'import platform; print(platform.python_version())')
PY_TRIXIE=$(enter "$CACHE/trixie" python3 -c 'import platform; print(platform.python_version())')
wheels_for "$PY_BULLSEYE"
wheels_for "$PY_TRIXIE"

# ---- build the one wheel, in bullseye --------------------------------------
log "bullseye: building the abi3 wheel"
copy_source "$CACHE/bullseye/src"
rm -rf "$CACHE/bullseye/wheels" && cp -r "$CACHE/wheels-$PY_BULLSEYE" "$CACHE/bullseye/wheels"
rm -rf "$CACHE/bullseye/out" && mkdir -p "$CACHE/bullseye/out"
enter "$CACHE/bullseye" /bin/sh -ec '
    if [ -e /usr/include/openssl/ssl.h ]; then
        echo "matrix: OpenSSL headers are installed in the build system" >&2
        exit 1
    fi
    rm -rf /opt/build-venv && python3 -m venv /opt/build-venv
    . /opt/build-venv/bin/activate
    pip install -q --no-index --find-links /wheels --upgrade pip
    pip install -q --no-index --find-links /wheels "setuptools>=77" "cffi>=1.14" wheel
    pip wheel -q --no-deps --no-build-isolation -w /out /src'
rm -f "$OUT"/tlsctl-*.whl
cp "$CACHE"/bullseye/out/tlsctl-*.whl "$OUT/"
WHEEL=$(ls "$OUT"/tlsctl-*.whl)
log "wheel: $(basename "$WHEEL")"
case "$(basename "$WHEEL")" in
    *-cp39-abi3-*) ;;
    *) echo "matrix: expected a cp39-abi3 wheel" >&2; exit 1 ;;
esac

# ---- auditwheel: no OpenSSL bundled or required ----------------------------
log "auditwheel show"
audit=$(python3 -m auditwheel show "$WHEEL" 2>&1)
echo "$audit"
if grep -Eq 'libssl|libcrypto' <<<"$audit"; then
    echo "matrix: the wheel bundles or requires libssl/libcrypto" >&2
    exit 1
fi
PLATFORM=$(grep -oE 'manylinux_[0-9]+_[0-9]+_[a-z0-9_]+' <<<"$audit" | head -n 1)
[ -n "$PLATFORM" ] || { echo "matrix: no platform tag from auditwheel" >&2; exit 1; }
SUMMARY+=("wheel: $(basename "$WHEEL"), auditwheel platform tag $PLATFORM, no libssl/libcrypto")

# ---- the same wheel, three systems -----------------------------------------
NAME=$(basename "$WHEEL")
for suite in bullseye trixie; do
    pyver=$PY_BULLSEYE; [ "$suite" = trixie ] && pyver=$PY_TRIXIE
    copy_source "$CACHE/$suite/src"
    rm -rf "$CACHE/$suite/wheels" && cp -r "$CACHE/wheels-$pyver" "$CACHE/$suite/wheels"
    rm -rf "$CACHE/$suite/out" && mkdir -p "$CACHE/$suite/out" && cp "$WHEEL" "$CACHE/$suite/out/"
    run_suite "$suite" enter "$CACHE/$suite" /bin/sh -c \
        "$(suite_script /opt/test-venv /src "/out/$NAME" /wheels)"
done
ensure_peers
HOST_SRC=$(mktemp -d /tmp/tlsctl-host-src.XXXXXX)
copy_source "$HOST_SRC"
run_suite host /bin/sh -c "$(suite_script "$HOST_SRC/.venv" "$HOST_SRC" "$WHEEL" "")"
rm -rf "$HOST_SRC"

log "summary"
printf '%s\n' "${SUMMARY[@]}"
# One closing line in the plain form CI reads: totals over the three systems.
count() { grep -oE "[0-9]+ $1" <<<"${SUMMARY[*]}" | awk '{s += $1} END {print s + 0}'; }
echo "matrix: $(count passed) passed, $(count failed) failed, $(count skipped) skipped"
