#!/bin/sh
# Install wingatemap into a virtual environment (.venv, next to this checkout) and run it there.
#
#   sh scripts/venv.sh run --map 127.0.0.1:8080=127.0.0.1:8000   # install, then run a mapping
#   sh scripts/venv.sh test [PYTEST ARGS]                          # install with test extras, run the tests
#   sh scripts/venv.sh COMMAND [ARGS]                              # any command of the venv (twistd, wingatemap...)
#
# Needs only python3 with its venv module (Debian: apt-get install python3-venv); never touches the
# system's Python packages, so it works where PEP 668 makes the system pip refuse. The package is
# reinstalled whenever a file under wingate_map/, twisted/ or pyproject.toml is newer than the last
# install. PYTHON picks the interpreter (default python3); WINGATEMAP_VENV the venv directory.
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
venv=${WINGATEMAP_VENV:-$root/.venv}
python=${PYTHON:-python3}

if [ $# -eq 0 ]; then
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi

command=$1
shift
extras=""
[ "$command" = test ] && extras="[test]"

if [ ! -x "$venv/bin/python" ]; then
    echo "creating $venv" >&2
    if ! "$python" -m venv "$venv"; then
        echo "cannot create a virtual environment with $python: on Debian, apt-get install python3-venv" >&2
        exit 1
    fi
fi

stamp="$venv/.wingatemap-installed$extras"
if [ ! -e "$stamp" ] || [ -n "$(find "$root/wingate_map" "$root/twisted" "$root/pyproject.toml" \( -name __pycache__ -o -name dropin.cache \) -prune -o -newer "$stamp" -print 2>/dev/null | head -n 1)" ]; then
    echo "installing wingatemap$extras into $venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$root$extras"
    touch "$stamp"
fi

case "$command" in
    test)
        cd "$root"
        exec "$venv/bin/python" -m pytest "$@"
        ;;
    run | check | explain | sessions | kill | reload | destinations | intercept-rules)
        exec "$venv/bin/wingatemap" "$command" "$@"
        ;;
    *)
        exec "$venv/bin/$command" "$@"
        ;;
esac
