#!/usr/bin/env bash
# Run the whole test suite under every supported torch (`make test-compat`).
#
# Usage: scripts/test_compat.sh VERSION...   (each has requirements/compat-torch-VERSION.txt)
#
# One venv per torch version, cached outside the clone in
#   ${XDG_CACHE_HOME:-~/.cache}/torchkeep/compat/<version>-<hash>
# where <hash> covers the version's requirements file and the [project] tables of pyproject.toml
# (dependencies and extras; not the release number), so a changed pin or dependency gets a fresh
# venv. Each venv is installed by ONE pip command: the pinned file plus
# the project (editable) with its test extras. The suite then runs with this clone's src/ first
# on the path, so a venv made from another clone still tests this one.
#
# The machine-wide pip cap (/etc/xdg/pip: torch<=2.14.1) is lifted for that one command only,
# by pointing PIP_CONSTRAINT at an empty file: every package is pinned exactly by the
# requirements file, so the cap has nothing left to protect against.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/torchkeep/compat
mkdir -p "$CACHE"

venv_for() {
    local version=$1 req="requirements/compat-torch-$1.txt" key dir
    [[ -f $req ]] || { echo "no $req" >&2; return 2; }
    key=$({ cat "$req"; sed -n '/^\[project/,/^\[tool/p' pyproject.toml | grep -v '^version ='; } \
        | sha256sum | cut -c1-12)
    dir="$CACHE/$version-$key"
    if [[ ! -f $dir/.installed ]]; then
        rm -rf "$dir"
        "$PYTHON" -m venv "$dir" >&2
        PIP_CONSTRAINT=/dev/null "$dir/bin/python" -m pip install --quiet \
            -r "$req" -e "$ROOT[dev,all]" >&2
        touch "$dir/.installed"
    fi
    echo "$dir"
}

status=0
for version in "$@"; do
    start=$SECONDS
    dir=$(venv_for "$version")
    installed=$((SECONDS - start))
    found=$("$dir/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')
    if [[ $found != "$version" ]]; then
        echo "torch $version: the venv $dir holds torch $found" >&2
        exit 2
    fi
    echo "== torch $version ($dir; venv ready in ${installed}s)"
    if PYTHONPATH="$ROOT/src" "$dir/bin/python" -m pytest -q -p no:cacheprovider; then
        echo "== torch $version: passed in $((SECONDS - start))s"
    else
        echo "== torch $version: FAILED after $((SECONDS - start))s"
        status=1
    fi
done
exit $status
