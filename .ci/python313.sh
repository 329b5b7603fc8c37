#!/usr/bin/env bash
# Second CI leg: the test suite on Python >= 3.12 with the newest jax / flax / optax / orbax-checkpoint
# releases (pip's newest jax on the machines' Python 3.11 is 0.10.2; jax >= 0.11 needs Python >= 3.12).
# No CPU PyTorch wheel exists for these Pythons here, so the tests marked `oracle` (PyTorch / transformers)
# are deselected with pytest's --no-oracle option; the first leg (.ci/run) runs them.
#
# usage: .ci/python313.sh [--find | --build] [pytest arguments...]
#   (default)  find or build the interpreter, make a fresh venv, install the project with the newest
#              releases and pytest, print the versions, run `pytest -q --no-oracle [pytest arguments]`
#   --find     only print the interpreter's path (building CPython 3.13 when no Python >= 3.12 is found)
#   --build    build CPython 3.13 under $PY313_PREFIX even when another Python >= 3.12 is on the machine
#              (nothing to do when a previous build is there), print its path; later runs find it first
#
# Interpreter search, first usable wins: $PY313_PREFIX/bin/python3.13 (a previous build), python3.13 and
# python3.12 on PATH, pyenv's 3.13.x and 3.12.x. "Usable" = version >= 3.12 with ssl, sqlite3, lzma, bz2,
# zlib, ctypes and venv importable.
# The build takes Debian 13's source package of CPython 3.13 through a private apt sources list (nothing on
# the system changes: lists, cache and source live in a temporary folder), configures it with
# --prefix=$PY313_PREFIX, runs make -j$(nproc) and installs through a staging folder, so an interrupted build
# leaves no half-installed prefix. It needs the build headers of libssl, libffi, zlib, bz2, lzma, sqlite3,
# readline and ncurses; about 6 minutes on 2 cores.
#
# Environment: PY313_PREFIX (default /opt/py313, or ~/.cache/model1-jax/py313 when /opt is not writable),
# NEWEST_VENV (default .venv-newest in the repository root).
set -euo pipefail
cd "$(dirname "$0")/.."

: "${HOME:=$(getent passwd "$(id -u)" | cut -d: -f6)}"  # CI may run without HOME
if [[ -z "${PY313_PREFIX:-}" ]]; then
    if [[ -w /opt ]]; then PY313_PREFIX=/opt/py313; else PY313_PREFIX="$HOME/.cache/model1-jax/py313"; fi
fi
VENV="${NEWEST_VENV:-.venv-newest}"
say() { echo "[python313] $*" >&2; }

usable() {
    "$1" -c 'import sys, ssl, sqlite3, lzma, bz2, zlib, ctypes, venv; sys.exit(sys.version_info < (3, 12))' \
        >/dev/null 2>&1
}

find_python() {
    local candidates=("$PY313_PREFIX/bin/python3.13") pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}" v p
    for v in 3.13 3.12; do
        p="$(command -v "python$v" || true)"
        [[ -n "$p" ]] && candidates+=("$p")
        for p in $(ls -d "$pyenv_root/versions/$v".* 2>/dev/null | sort -rV || true); do
            candidates+=("$p/bin/python$v")
        done
    done
    for p in "${candidates[@]}"; do
        if usable "$p"; then echo "$p"; return 0; fi
    done
    return 1
}

build_python() {
    if usable "$PY313_PREFIX/bin/python3.13"; then
        say "reusing the CPython build in $PY313_PREFIX"
        return 0
    fi
    if [[ -e "$PY313_PREFIX" ]]; then
        say "error: $PY313_PREFIX exists but holds no usable python3.13; remove it or set PY313_PREFIX"
        return 1
    fi
    local work apt_opts version start=$SECONDS
    BUILD_DIR="$(mktemp -d)"
    trap 'rm -rf "$BUILD_DIR"' EXIT
    work="$BUILD_DIR"
    mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/src"
    echo 'deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main' \
        > "$work/sources.list"
    apt_opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
              -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o Debug::NoLocking=true
              -o APT::Sandbox::User=root)  # the private folder is not readable by user _apt
    say "downloading Debian 13's python3.13 source package"
    apt-get "${apt_opts[@]}" -qq update
    (cd "$work" && apt-get "${apt_opts[@]}" -qq source --download-only python3.13 >/dev/null)
    tar xf "$work"/python3.13_*.orig.tar.xz -C "$work/src" --strip-components=1
    version="$(sed -n 's/^#define PY_VERSION *"\(.*\)"/\1/p' "$work/src/Include/patchlevel.h")"
    say "building CPython $version into $PY313_PREFIX"
    (cd "$work/src" && ./configure -q --prefix="$PY313_PREFIX" --without-ensurepip >"$work/configure.log" 2>&1 \
        && make -s -j"$(nproc)" >"$work/make.log" 2>&1 \
        && make -s install DESTDIR="$work/stage" >"$work/install.log" 2>&1) || {
        say "error: the CPython build failed; the end of its log:"
        tail -n 30 "$work"/*.log >&2
        return 1
    }
    if ! usable "$work/stage$PY313_PREFIX/bin/python3.13"; then
        # A module whose headers were missing is skipped by the build, not reported as an error.
        say "error: the built python3.13 lacks a standard module (missing -dev headers?):"
        "$work/stage$PY313_PREFIX/bin/python3.13" -c 'import ssl, sqlite3, lzma, bz2, zlib, ctypes' >&2 || true
        return 1
    fi
    mkdir -p "$(dirname "$PY313_PREFIX")"
    mv "$work/stage$PY313_PREFIX" "$PY313_PREFIX"
    say "built in $((SECONDS - start)) s"
}

mode=run
case "${1:-}" in
    --find) mode=find; shift ;;
    --build) mode=build; shift ;;
esac

if [[ $mode == build ]]; then
    build_python
    echo "$PY313_PREFIX/bin/python3.13"
    exit 0
elif ! PY="$(find_python)"; then
    say "no Python >= 3.12 found; building CPython 3.13"
    build_python
    PY="$PY313_PREFIX/bin/python3.13"
fi
say "interpreter: $PY ($("$PY" -V 2>&1))"
if [[ $mode == find ]]; then echo "$PY"; exit 0; fi

start=$SECONDS
"$PY" -m venv --clear "$VENV"
# No version pins: this leg exists to run the newest releases. No torch / transformers (see above); the
# compile-check extra (Triton) for tests/test_compile_check.py.
"$VENV/bin/pip" install -q -e ".[compile-check]" jax flax optax orbax-checkpoint pytest pytest-xdist
"$VENV/bin/python" - <<'EOF'
import sys, importlib.metadata as md
names = ["jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml_dtypes", "triton", "pytest",
         "pytest-xdist"]
print("[python313] Python", sys.version.split()[0], "|", ", ".join(f"{n} {md.version(n)}" for n in names),
      file=sys.stderr)
EOF
say "venv and install: $((SECONDS - start)) s"
"$VENV/bin/python" -m pytest -q --no-oracle "$@"
