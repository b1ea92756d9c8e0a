#!/usr/bin/env bash
# The OpenSSL matrix: build tlsctl's abi3 wheel ONCE, in the oldest system
# (Debian bullseye: Python 3.9 + OpenSSL 1.1.1), then install that same file
# and run the whole test suite against it in three systems:
#
#   host      this machine (Debian 12 here: Python 3.11 + OpenSSL 3.0)
#   bullseye  Python 3.9  + OpenSSL 1.1.1  (chroot; the RHEL 8 stand-in)
#   trixie    Python 3.13 + OpenSSL 3.5    (chroot)
#
# and in a fourth, from source:
#
#   host-asan the host again, the module built with AddressSanitizer and
#             UBSan (SANITIZE_CFLAGS); any sanitizer report fails the run
#
# One more check builds the wheel a second time with the newest CPython of
# Debian sid (3.15: it names abi3 modules .abi3-<platform>.so, which 3.9 ..
# 3.14 do not load) and proves that wheel binds on the host's Python 3.11.
#
# and in a fifth, from source: PyPy (Debian's pypy3, the python mechanism).
#
# After the suite, each system runs the axes of tests/axes.txt that name it
# (the suite again with TLSCTL_MECHANISM=stash, ...; noxfile.py reads the
# same file).  Lint is not here: it is nox's lint session (nox -s ci runs
# it, then this script).
#
# Chroots are made with debootstrap from the Debian mirror this machine's apt
# uses (TLSCTL_MIRROR overrides) and reused when present (a chroot is only
# reused once fully set up: see the .tlsctl-ready marker).  pip inside the
# chroots cannot verify the registry's certificate here, so the test
# dependencies are downloaded on the host for each Python version and
# installed offline.  Any failure is fatal: nothing is skipped.
#
# Needs: root, Debian's archive (debootstrap, the peers, pypy3), about 3 GB
# in the chroot cache, and PyPI for the Python packages.  The tools it uses
# itself (uv, auditwheel, twine, build) go into a private virtual
# environment, never into the Python that runs it.
#
# Usage: ci/matrix.sh            (TLSCTL_CHROOTS overrides the cache folder)
set -euo pipefail

# The Debian systems (chroots) the one wheel is tested in, oldest first; the
# wheel is built in the first.  Their Python versions: PY[suite].
SUITES=(bullseye trixie)
BUILD_SUITE=${SUITES[0]}
declare -A PY

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${TLSCTL_CHROOTS:-/var/tmp/tlsctl-chroots}
OUT="$CACHE/out"
ARCH=$(uname -m)                    # x86_64, aarch64: wheel platform tags
BUILD_DEPS=(pip "setuptools>=77" "cffi>=1.14" wheel)
SANITIZE_CFLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1"
SUMMARY=()

log() { printf '\n=== matrix: %s (at %ds)\n' "$*" "$SECONDS"; }

host_mirror() {  # the Debian mirror of this machine's apt sources (deb822 or one-line)
    local uri
    uri=$(awk '$1 == "URIs:" && $2 !~ /security/ {print $2; exit}' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    if [ -z "$uri" ]; then
        uri=$(sed -nE 's/^deb +(\[[^]]*\] +)?(https?:[^ ]+).*/\2/p' \
            /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | grep -v security | head -n 1 || true)
    fi
    echo "$uri"
}
MIRROR=${TLSCTL_MIRROR:-$(host_mirror)}
if [ -z "$MIRROR" ]; then
    echo "matrix: no Debian mirror in this machine's apt sources; set TLSCTL_MIRROR" >&2
    exit 1
fi

mounted() { mountpoint -q "$1"; }

enter() {  # enter DIR CMD...: run CMD in the chroot with /proc and /dev
    local dir=$1; shift
    mounted "$dir/proc" || mount -t proc proc "$dir/proc"
    mounted "$dir/dev" || mount --bind /dev "$dir/dev"
    chroot "$dir" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 "$@"
}

unmount() {  # unmount DIR: what enter mounted in a chroot
    local m
    for m in dev proc; do
        if [ -d "$1/$m" ] && mounted "$1/$m"; then umount -l "$1/$m"; fi
    done
}

cleanup() {
    local suite
    for suite in "${SUITES[@]}" sid; do
        unmount "$CACHE/$suite"
    done
}
trap cleanup EXIT

# Real peers the tests drive (tests/test_http_server.py, test_openssl_cli.py,
# test_wire.py's write count): installed from Debian's archive in every
# system, also into cached chroots.
PEERS=(curl openssl strace)

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

# CPython's own test_ssl (tests/test_stdlib_suites.py): Debian ships the
# stdlib's test package apart, as libpython3.X-testsuite; and test_ssl needs
# "localhost" to resolve, which a minbase chroot's missing /etc/hosts breaks.
ensure_stdlib_tests() {  # ensure_stdlib_tests DIR
    local dir=$1 pkg
    pkg=$(enter "$dir" python3 -c 'import sys; print("libpython3.%d-testsuite" % sys.version_info[1])')
    if ! grep -q localhost "$dir/etc/hosts" 2>/dev/null; then
        printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n' \
            > "$dir/etc/hosts"
    fi
    enter "$dir" dpkg -s "$pkg" >/dev/null 2>&1 && return
    log "$(basename "$dir"): installing $pkg"
    enter "$dir" /bin/sh -ec "apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q $pkg >/dev/null"
}

make_chroot() {  # make_chroot SUITE
    local suite=$1 dir="$CACHE/$1"
    if [ -f "$dir/.tlsctl-ready" ]; then
        log "$suite: reusing $dir"
        ensure_peers "$dir"
        ensure_stdlib_tests "$dir"
        return
    fi
    log "$suite: debootstrap into $dir"
    unmount "$dir"  # a killed run may have left the host's /dev bound there
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
    ensure_stdlib_tests "$dir"
    touch "$dir/.tlsctl-ready"
}

make_sid() {  # the sid chroot: gcc + the newest CPython, to build a wheel
    local dir="$CACHE/sid"
    if [ -f "$dir/.tlsctl-ready" ]; then
        log "sid: reusing $dir ($(cat "$dir/.tlsctl-python"))"
        return
    fi
    log "sid: debootstrap into $dir"
    unmount "$dir"
    rm -rf "$dir"
    # libffi-dev: to build cffi from its sdist if no wheel exists yet for
    # this CPython (wheels_for ... build falls back to the sdist).
    debootstrap --variant=minbase --include=gcc,libc6-dev,binutils,libffi-dev \
        sid "$dir" "$MIRROR"
    # sid's Release file is often past its Valid-Until date.
    echo 'Acquire::Check-Valid-Until "false";' \
        > "$dir/etc/apt/apt.conf.d/99tlsctl-valid-until"
    # python3.15 if sid has it, else its newest python3.X (the build step
    # checks that this one still has a platform-qualified abi3 suffix).
    # shellcheck disable=SC2016  # expanded by the chroot's shell
    enter "$dir" /bin/sh -ec '
        apt-get update -q >/dev/null
        py=python3.15
        if ! apt-cache show $py-dev $py-venv >/dev/null 2>&1; then
            py=python3.$(apt-cache pkgnames python3. \
                | sed -n "s/^python3\.\([0-9][0-9]*\)-venv$/\1/p" | sort -n | tail -n 1)
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
            --no-install-recommends $py $py-dev $py-venv >/dev/null
        echo $py > /.tlsctl-python'
    touch "$dir/.tlsctl-ready"
}

wheels_for() {  # wheels_for PYVER [build]: what PYVER needs, for offline use
    # pip download evaluates environment markers against the HOST
    # interpreter, not --python-version, so resolve with uv for the target
    # version first (project deps, the [test] extra, build deps; only the
    # build deps with "build"), then download exactly that set.
    local pyver=$1 kind=${2:-}
    local dest="$CACHE/wheels-$pyver${kind:+-$kind}" lock="$CACHE/lock-$pyver${kind:+-$kind}.txt"
    local project=(--extra test "$ROOT/pyproject.toml")
    [ "$kind" = build ] && project=()
    mkdir -p "$dest"
    log "wheels for Python $pyver${kind:+ ($kind)} -> $dest"
    printf '%s\n' "${BUILD_DEPS[@]}" > "$CACHE/build-deps.txt"
    "$TPY" -m uv pip compile -q --no-header --no-annotate \
        --python-version "$pyver" --python-platform "$ARCH-manylinux_2_31" \
        "${project[@]}" "$CACHE/build-deps.txt" -o "$lock"
    local platforms=() v
    for v in $(seq 5 31); do platforms+=(--platform "manylinux_2_${v}_$ARCH"); done
    platforms+=(--platform "manylinux2014_$ARCH" --platform "manylinux2010_$ARCH"
                --platform "manylinux1_$ARCH")
    "$TPY" -m pip download -q --no-deps --only-binary=:all: \
        --python-version "$pyver" "${platforms[@]}" -d "$dest" -r "$lock" && return
    [ "$kind" = build ] || return 1
    # A CPython newer than some build dependency's wheels (cffi, for one):
    # take that package's sdist; the sid chroot has gcc and libffi-dev.
    local pkg
    while read -r pkg; do
        "$TPY" -m pip download -q --no-deps --only-binary=:all: \
            --python-version "$pyver" "${platforms[@]}" -d "$dest" "$pkg" \
        || "$TPY" -m pip download -q --no-deps --no-binary=:all: -d "$dest" "$pkg"
    done < "$lock"
}

copy_source() {  # copy_source DEST: the checkout without VCS, venvs or build output
    rm -rf "$1" && mkdir -p "$1"
    tar -C "$ROOT" --exclude=.git --exclude=build --exclude='*.so' \
        --exclude='*.egg-info' --exclude=__pycache__ --exclude=./.nox \
        --exclude=./.venv -cf - . | tar -C "$1" -xf -
}

run_suite() {  # run_suite NAME PYTHON-RUNNER...: install the wheel, test, demo
    local name=$1; shift
    local log_file="$CACHE/$name.log" reports="$CACHE/$name.sanitizer" failed=
    log "$name: tests against the installed wheel"
    "$@" > "$log_file" 2>&1 || failed="the suite failed"
    # host-asan (see asan_env): every ASan report is a file here, whichever
    # process wrote it and whatever its exit status; UBSan reports go to
    # stderr, so into the log.
    if [ -d "$reports" ] && [ -n "$(ls -A "$reports")" ]; then
        failed="sanitizer reports in $reports"
    elif [ -d "$reports" ] && grep -q ': runtime error: ' "$log_file"; then
        failed="UBSan reports in the log"
    fi
    if [ -n "$failed" ]; then
        tail -n 60 "$log_file"
        if [ -d "$reports" ]; then head -n 60 "$reports"/* 2>/dev/null || true; fi
        echo "matrix: $name FAILED: $failed (full log: $log_file)" >&2
        exit 1
    fi
    grep -E '^(python|tlsctl|sanitizers):' "$log_file" || true
    grep -E '^tlsctl\.__file__' "$log_file"
    sed -n '/^tlsctl demo:/,/^patched:/p' "$log_file"
    # One summary per pytest run: the suite's, then each axis's (after its
    # "axis: NAME" line; see axes_for).
    local label line
    while IFS=$'\t' read -r label line; do
        [ "$label" = - ] && label=  # the suite itself (a tab field cannot be empty)
        echo "$name${label:+ $label}: $line"
        SUMMARY+=("$name${label:+ $label}: $line")
    done < <(awk 'BEGIN {label = "-"} /^axis: / {label = $2; next}
        /^=+ .*(passed|failed).* =+$/ {if (!(label in last)) order[n++] = label; last[label] = $0}
        END {for (i = 0; i < n; i++) print order[i] "\t" last[order[i]]}' "$log_file")
}

# The axes of tests/axes.txt (the list noxfile.py reads too): the suite
# again with another mechanism, in the systems each axis names.  Prints the
# commands for SYSTEM, each pytest run after an "axis: NAME" line.  The
# stdlib suites run under defer only there (the host's "all" already runs
# them with the stash forced, in its main run).
axes_for() {  # axes_for SYSTEM
    local line words name systems env args word
    while IFS= read -r line; do
        read -ra words <<<"${line%%#*}"
        [ ${#words[@]} -eq 0 ] && continue
        name=${words[0]} systems=${words[1]:-} env=() args=()
        for word in "${words[@]:2}"; do
            if [ ${#args[@]} -eq 0 ] && [[ $word =~ ^[A-Z_][A-Z0-9_]*= ]]; then
                env+=("$word")
            else
                args+=("$word")
            fi
        done
        if [ ${#env[@]} -eq 0 ]; then
            echo "matrix: tests/axes.txt: axis $name sets no variable" >&2
            exit 1
        fi
        case ",$systems," in *",$1,"*) ;; *) continue ;; esac
        printf 'echo "axis: %s (%s)"\n' "$name" "${env[*]}"
        printf 'env TLSCTL_STDLIB_SUITES=defer %s python -m pytest -p no:cacheprovider %s\n' \
            "${env[*]}" "${args[*]}"
    done < "$ROOT/tests/axes.txt"
}

# The commands each system runs, given a venv path, a wheel dir and a source
# copy (and, for host-asan, commands setting up its environment).  The suite
# runs from the source copy's tests/ while tlsctl itself is imported from the
# installed wheel (src/ is not on sys.path), which the first command proves.
# SYSTEM names the system, for its axes (axes_for).
suite_script() {  # suite_script VENV SRC WHEEL FINDLINKS [SETUP] [PYTHON] [LAST]
    cat <<EOF
set -e
rm -rf $1 && ${6:-python3} -m venv $1
. $1/bin/activate
python -m pip install -q ${4:+--no-index --find-links $4} --upgrade pip
python -m pip install -q ${4:+--no-index --find-links $4} "$3[test]"
cd $2
export TLSCTL_OPENSSL_INCLUDE=/opt/openssl-headers/usr/include:/opt/openssl-headers/usr/include/$(gcc -print-multiarch 2>/dev/null || echo "$ARCH-linux-gnu")
export TLSCTL_STDLIB_SUITES=${STDLIB_SUITES:-defer}
${5:-}
python -c 'import tlsctl, sys; print("tlsctl.__file__", tlsctl.__file__); sys.exit("/site-packages/" not in tlsctl.__file__)'
python -m pytest -p no:cacheprovider
$(axes_for "${SYSTEM:-}")
${7:-python -m tlsctl demo --connections 200}
EOF
}

# host-asan's environment (ci/README.md explains each piece).  CPython is
# not instrumented, so the ASan runtime is preloaded into every process of
# the run; Python children (bench, CLI tests) need it to load the module.
# Leak detection is off: over an uninstrumented CPython it reports the
# interpreter's own allocations, noise rather than tlsctl bugs.  libstdc++ is
# preloaded too: ASan intercepts __cxa_throw only if libstdc++ is present when
# it starts, and matplotlib's C++ modules (test_bench) are dlopen()ed later
# (their first exception is an ASan CHECK failure otherwise).  curl, an
# uninstrumented peer, runs WITHOUT the preload (NO_PRELOAD puts a wrapper
# first in PATH): with libasan preloaded it deadlocks in setlocale() at
# start-up (GCC 12's libasan, Debian 12).  openssl runs with it.
# ASan reports are files (log_path); GCC's libubsan ignores log_path next to
# a preloaded libasan, so UBSan reports go to stderr: --capture=sys leaves
# the pytest process's stderr alone, into the log, and abort_on_error makes
# a UBSan report abort like an ASan one.
asan_env() {  # asan_env REPORTS NO_PRELOAD
    local preload
    preload="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
    cat <<EOF
export LD_PRELOAD="$preload" PYTHONMALLOC=malloc PATH="$2:\$PATH"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:log_path=$1/asan
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:abort_on_error=1
export PYTEST_ADDOPTS=--capture=sys
so=\$(python -c 'import tlsctl._binding as b; print(b.__file__)')
if ! nm -D --undefined-only "\$so" | grep -q __asan_report_ \\
        || ! nm -D --undefined-only "\$so" | grep -q __ubsan_handle_; then
    echo "matrix: \$so is not built with ASan and UBSan" >&2
    exit 1
fi
echo "sanitizers: \$so calls ASan and UBSan; LD_PRELOAD=\$LD_PRELOAD"
EOF
}

axes_for - >/dev/null  # a malformed tests/axes.txt fails here, not in a system
mkdir -p "$CACHE" "$OUT"
# The matrix's own tools, in a private virtual environment (a system Python
# such as Debian 12's refuses pip install; and the caller's stays untouched).
TOOLS="$CACHE/tools"
if [ ! -x "$TOOLS/bin/python" ]; then
    python3 -m venv "$TOOLS"
fi
TPY="$TOOLS/bin/python"
"$TPY" -m pip install -q --upgrade pip uv auditwheel twine build
for suite in "${SUITES[@]}"; do
    make_chroot "$suite"
done
make_sid
# Exact versions: pip reads "3.9" as 3.9.0, which some packages exclude.
for suite in "${SUITES[@]}"; do
    PY[$suite]=$(enter "$CACHE/$suite" python3 -c 'import platform; print(platform.python_version())')
    wheels_for "${PY[$suite]}"
done
SID_PY=$(cat "$CACHE/sid/.tlsctl-python")
PY_SID=$(enter "$CACHE/sid" "$SID_PY" -c 'import platform; print(platform.python_version())')
wheels_for "$PY_SID" build

# ---- build the one wheel, in the oldest system ------------------------------
log "$BUILD_SUITE: building the abi3 wheel"
copy_source "$CACHE/$BUILD_SUITE/src"
rm -rf "$CACHE/$BUILD_SUITE/wheels"
cp -r "$CACHE/wheels-${PY[$BUILD_SUITE]}" "$CACHE/$BUILD_SUITE/wheels"
rm -rf "$CACHE/$BUILD_SUITE/out" && mkdir -p "$CACHE/$BUILD_SUITE/out"
enter "$CACHE/$BUILD_SUITE" /bin/sh -ec '
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
cp "$CACHE/$BUILD_SUITE"/out/tlsctl-*.whl "$OUT/"
WHEEL=$(ls "$OUT"/tlsctl-*.whl)
log "wheel: $(basename "$WHEEL")"
case "$(basename "$WHEEL")" in
    *-cp39-abi3-*) ;;
    *) echo "matrix: expected a cp39-abi3 wheel" >&2; exit 1 ;;
esac

# ---- auditwheel: no OpenSSL bundled or required ----------------------------
log "auditwheel show"
audit=$("$TPY" -m auditwheel show "$WHEEL" 2>&1)
echo "$audit"
if grep -Eq 'libssl|libcrypto' <<<"$audit"; then
    echo "matrix: the wheel bundles or requires libssl/libcrypto" >&2
    exit 1
fi
PLATFORM=$(grep -oE 'manylinux_[0-9]+_[0-9]+_[a-z0-9_]+' <<<"$audit" | head -n 1)
[ -n "$PLATFORM" ] || { echo "matrix: no platform tag from auditwheel" >&2; exit 1; }
SUMMARY+=("wheel: $(basename "$WHEEL"), auditwheel platform tag $PLATFORM, no libssl/libcrypto")

# ---- the sdist, and twine check of both --------------------------------------
log "sdist and twine check"
SDIST_SRC=$(mktemp -d /tmp/tlsctl-sdist.XXXXXX)
copy_source "$SDIST_SRC"
rm -f "$OUT"/tlsctl-*.tar.gz
"$TPY" -m build -q --sdist -o "$OUT" "$SDIST_SRC" >/dev/null
rm -rf "$SDIST_SRC"
SDIST=$(ls "$OUT"/tlsctl-*.tar.gz)
SDIST_FILES=$(tar -tzf "$SDIST")
for member in src/_tlsctl_build.py src/_tlsctl_c/tlsctl.h src/_tlsctl_c/bind.c \
        src/_tlsctl_c/proxy.c LICENSE src/tlsctl/site-hook/sitecustomize.py; do
    grep -q "/$member\$" <<<"$SDIST_FILES" || {
        echo "matrix: the sdist lacks $member" >&2
        exit 1
    }
done
"$TPY" -m twine check --strict "$WHEEL" "$SDIST"
SUMMARY+=("sdist: $(basename "$SDIST") holds the C sources; twine check --strict passes for both")

# ---- the wheel built by the newest CPython, loaded by an older one --------
# The wheel's tag (cp39-abi3) promises the module to every CPython >= 3.9,
# whichever one built it.  3.15 lists .abi3-<platform>.so first, which 3.9 ..
# 3.14 cannot load; setup.py names the module .abi3.so.  Build with sid's
# newest CPython, check the name inside the wheel, then bind on the host's
# Python 3.11, which loads only .abi3.so.  (Not on bullseye: a module built
# against sid's glibc needs GLIBC_2.34 - dlopen, dlsym, dladdr moved into
# libc then - and bullseye has 2.31; auditwheel tags it manylinux_2_34.)
log "sid: building the wheel with $SID_PY ($PY_SID)"
sid_start=$SECONDS
copy_source "$CACHE/sid/src"
rm -rf "$CACHE/sid/wheels" && cp -r "$CACHE/wheels-$PY_SID-build" "$CACHE/sid/wheels"
rm -rf "$CACHE/sid/out" && mkdir -p "$CACHE/sid/out"
# shellcheck disable=SC2016  # expanded by the chroot's shell
enter "$CACHE/sid" /bin/sh -ec '
    py=$1
    $py -c "import importlib.machinery as m, sys
sys.exit(not any(s.startswith(\".abi3-\") for s in m.EXTENSION_SUFFIXES))" || {
        echo "matrix: $py has no .abi3-<platform> suffix: nothing to check" >&2
        exit 1
    }
    rm -rf /opt/build-venv && $py -m venv /opt/build-venv
    . /opt/build-venv/bin/activate
    pip install -q --no-index --find-links /wheels --upgrade pip
    pip install -q --no-index --find-links /wheels "setuptools>=77" "cffi>=1.14" wheel
    pip wheel -q --no-deps --no-build-isolation -w /out /src
    pip install -q --no-index --find-links /wheels /out/tlsctl-*.whl
    python -c "import sys, tlsctl; sys.exit(not tlsctl.info().bound)"' sh "$SID_PY"
SID_WHEEL=$(ls "$CACHE"/sid/out/tlsctl-*.whl)
SID_NAME=$(basename "$SID_WHEEL")
SID_SO=$(python3 -c 'import sys, zipfile
print(*[n for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.endswith(".so")])' "$SID_WHEEL")
SID_TAG=$("$TPY" -m auditwheel show "$SID_WHEEL" 2>&1 \
    | grep -oE 'manylinux_[0-9]+_[0-9]+_[a-z0-9_]+' | head -n 1 || true)
log "sid: $SID_NAME holds $SID_SO, auditwheel: ${SID_TAG:-no manylinux tag} (built in $((SECONDS - sid_start))s)"
case "$SID_NAME" in
    *-cp39-abi3-*) ;;
    *) echo "matrix: $SID_PY made $SID_NAME, not a cp39-abi3 wheel" >&2; exit 1 ;;
esac
if [ "$SID_SO" != tlsctl/_binding.abi3.so ]; then
    echo "matrix: $SID_PY named the module $SID_SO, not tlsctl/_binding.abi3.so" >&2
    exit 1
fi
PY_HOST=$(python3 -c 'import platform; print(platform.python_version())')
log "host: the wheel $SID_PY built, on Python $PY_HOST"
SID_VENV=$(mktemp -d /tmp/tlsctl-sid-wheel.XXXXXX)
# shellcheck disable=SC2016  # expanded by that shell
if ! /bin/sh -ec '
    python3 -c "import importlib.machinery as m, sys
sys.exit(any(s.startswith(\".abi3-\") for s in m.EXTENSION_SUFFIXES))" || {
        echo "matrix: this Python also loads .abi3-<platform>.so: nothing to prove" >&2
        exit 1
    }
    python3 -m venv "$1/venv" && . "$1/venv/bin/activate"
    python -m pip install -q "$2[demo]"
    cd "$1"
    python -c "import sys, tlsctl, tlsctl._binding as b
print(\"bound:\", tlsctl.info().bound, b.__file__)
sys.exit(not tlsctl.info().bound)"
    python -m tlsctl doctor' sh "$SID_VENV" "$SID_WHEEL" > "$CACHE/sid-wheel.log" 2>&1; then
    cat "$CACHE/sid-wheel.log"
    echo "matrix: the wheel $SID_PY built does not bind on Python $PY_HOST" >&2
    exit 1
fi
rm -rf "$SID_VENV"
cat "$CACHE/sid-wheel.log"
SUMMARY+=("sid: $SID_NAME built by Python $PY_SID holds $SID_SO (${SID_TAG:-no manylinux tag}); bound on Python $PY_HOST, doctor OK ($((SECONDS - sid_start))s)")

# ---- the same wheel, three systems -----------------------------------------
NAME=$(basename "$WHEEL")
for suite in "${SUITES[@]}"; do
    pyver=${PY[$suite]}
    copy_source "$CACHE/$suite/src"
    rm -rf "$CACHE/$suite/wheels" && cp -r "$CACHE/wheels-$pyver" "$CACHE/$suite/wheels"
    rm -rf "$CACHE/$suite/out" && mkdir -p "$CACHE/$suite/out" && cp "$WHEEL" "$CACHE/$suite/out/"
    run_suite "$suite" enter "$CACHE/$suite" /bin/sh -c \
        "$(SYSTEM=$suite suite_script /opt/test-venv /src "/out/$NAME" /wheels)"
done
ensure_peers
HOST_SRC=$(mktemp -d /tmp/tlsctl-host-src.XXXXXX)
copy_source "$HOST_SRC"
# The host also runs CPython's and trio's test_ssl under suppress, immediate
# and the forced stash (tests/test_stdlib_suites.py); the chroots run defer.
STDLIB_SUITES=all run_suite host /bin/sh -c \
    "$(STDLIB_SUITES=all SYSTEM=host suite_script "$HOST_SRC/.venv" "$HOST_SRC" "$WHEEL" "")"
rm -rf "$HOST_SRC"

# ---- pypy: Debian's PyPy, where tlsctl cannot bind (the python mechanism) ----
# tlsctl installs there as pure Python from the source tree; memory-BIO
# servers are deferred, sockets stock (their tests skip with the reason).
if ! command -v pypy3 >/dev/null || ! pypy3 -c 'import venv, ensurepip' 2>/dev/null; then
    log "host: installing pypy3"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q pypy3 pypy3-venv >/dev/null
fi
PYPY_SRC=$(mktemp -d /tmp/tlsctl-pypy-src.XXXXXX)
copy_source "$PYPY_SRC"
run_suite pypy /bin/sh -c "$(SYSTEM=pypy suite_script "$PYPY_SRC/.venv" "$PYPY_SRC" "$PYPY_SRC" "" \
    'python -c "import tlsctl; i = tlsctl.info(); print(\"tlsctl: mechanism\", i.mechanism, \"bound\", i.bound)"' pypy3 'python -m tlsctl doctor')"
rm -rf "$PYPY_SRC"

# ---- host-asan: the whole suite against an ASan + UBSan build --------------
# Its own wheel, built from source on the host: CFLAGS reaches cffi's
# setuptools build (compile and link).  Any sanitizer report fails the run.
log "host-asan: building the module with $SANITIZE_CFLAGS"
ASAN_SRC=$(mktemp -d /tmp/tlsctl-asan-src.XXXXXX)
copy_source "$ASAN_SRC"
# (from the sdist: this also proves the sdist builds the compiled module)
CFLAGS="$SANITIZE_CFLAGS" "$TPY" -m pip wheel -q --no-deps --no-cache-dir \
    -w "$ASAN_SRC/dist" "$SDIST"
mkdir -p "$ASAN_SRC/no-preload"
printf '#!/bin/sh\nunset LD_PRELOAD\nexec %s "$@"\n' "$(command -v curl)" \
    > "$ASAN_SRC/no-preload/curl"
chmod +x "$ASAN_SRC/no-preload/curl"
rm -rf "$CACHE/host-asan.sanitizer" && mkdir -p "$CACHE/host-asan.sanitizer"
run_suite host-asan /bin/sh -c "$(SYSTEM=host-asan suite_script "$ASAN_SRC/.venv" "$ASAN_SRC" \
    "$(ls "$ASAN_SRC"/dist/tlsctl-*.whl)" "" \
    "$(asan_env "$CACHE/host-asan.sanitizer" "$ASAN_SRC/no-preload")")"
rm -rf "$ASAN_SRC"

log "summary"
printf '%s\n' "${SUMMARY[@]}"
# One closing line in the plain form CI reads: totals over the five systems.
count() { grep -oE "[0-9]+ $1" <<<"${SUMMARY[*]}" | awk '{s += $1} END {print s + 0}'; }
echo "matrix: $(count passed) passed, $(count failed) failed, $(count skipped) skipped"
