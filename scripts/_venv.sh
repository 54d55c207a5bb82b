# shellcheck shell=bash
# Shared by scripts/test and scripts/demo (sourced, not run): make sure .venv exists and
# holds the project installed in editable mode with its dev, chat and tor extras.
#
# The install is re-run only when pyproject.toml (or this file) is newer than the stamp file, so
# repeated runs start at once. Delete .venv/.veil-installed to force a reinstall.
# Needs nothing outside the repository but python3 (with its venv module) and, for the
# first install, access to the package index.

VEIL_VENV=.venv
VEIL_STAMP="$VEIL_VENV/.veil-installed"

veil_ensure_venv() {
    if [ ! -x "$VEIL_VENV/bin/python" ]; then
        if ! command -v python3 >/dev/null 2>&1; then
            echo "error: python3 is needed (3.11 or newer)" >&2
            return 1
        fi
        echo "creating $VEIL_VENV with $(python3 --version 2>&1)" >&2
        python3 -m venv "$VEIL_VENV"
    fi
    if [ ! -f "$VEIL_STAMP" ] || [ pyproject.toml -nt "$VEIL_STAMP" ] || [ scripts/_venv.sh -nt "$VEIL_STAMP" ]; then
        echo "installing veil and its dependencies into $VEIL_VENV" >&2
        "$VEIL_VENV/bin/pip" install -q -e '.[dev,chat,tor]'
        touch "$VEIL_STAMP"
    fi
}
