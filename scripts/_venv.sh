# shellcheck shell=bash
# Shared by scripts/test, scripts/demo, scripts/bench and scripts/lock (sourced, not run): make
# sure .venv holds exactly what uv.lock pins (the project in editable mode with its dev, chat
# and tor extras), so a fresh machine next month installs what CI installed today.
#
# uv itself is installed first, into .uv/, with pip from scripts/uv-requirements.txt (one exact
# version, every wheel's hash). Then `uv sync --locked` makes .venv match uv.lock; it refuses,
# and we stop, when pyproject.toml and uv.lock disagree (scripts/lock brings them back in step).
# An up-to-date .venv costs a fraction of a second, so this runs every time.
# Needs nothing outside the repository but python3 (3.11 or newer, with pip and venv) and, for
# the first install, access to the package index.

VEIL_VENV=.venv
VEIL_UV_DIR=.uv
VEIL_UV="$VEIL_UV_DIR/bin/uv"
VEIL_UV_STAMP="$VEIL_UV_DIR/.installed"
export UV_PROJECT_ENVIRONMENT="$VEIL_VENV"
# Only what uv.lock says: no Python downloads, no packages the lock does not name.
export UV_PYTHON_DOWNLOADS=never
# Installed packages are compiled to bytecode once, at install: where PYTHONDONTWRITEBYTECODE
# is set (as on the machines we test on) Python would otherwise compile them at every start.
export UV_COMPILE_BYTECODE=1

veil_ensure_uv() {
    if [ -x "$VEIL_UV" ] && [ -f "$VEIL_UV_STAMP" ] && [ "$VEIL_UV_STAMP" -nt scripts/uv-requirements.txt ]; then
        return 0
    fi
    if ! command -v python3 >/dev/null 2>&1; then
        echo "error: python3 is needed (3.11 or newer)" >&2
        return 1
    fi
    echo "installing uv (pinned, hash-checked) into $VEIL_UV_DIR" >&2
    rm -rf "$VEIL_UV_DIR"
    local log
    log=$(mktemp "${TMPDIR:-/tmp}/veil-uv-install.XXXXXX")
    if ! python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore \
        --require-hashes --only-binary :all: --target "$VEIL_UV_DIR" \
        -r scripts/uv-requirements.txt >"$log" 2>&1; then
        cat "$log" >&2
        echo "error: could not install uv with pip (its output is above, and in $log)" >&2
        return 1
    fi
    rm -f "$log"
    touch "$VEIL_UV_STAMP"
}

veil_ensure_venv() {
    veil_ensure_uv || return 1
    local python=()
    if [ ! -x "$VEIL_VENV/bin/python" ]; then
        # A new .venv: on the python3 found on PATH (resolved, so that a pyenv shim is not
        # mistaken for another interpreter next time). An existing .venv keeps its own.
        local exe
        exe=$(python3 -c 'import sys; print(sys.executable)' 2>/dev/null) || {
            echo "error: python3 is needed (3.11 or newer)" >&2
            return 1
        }
        python=(--python "$exe")
    fi
    if ! "$VEIL_UV" sync --quiet --locked --all-extras "${python[@]}"; then
        echo "error: could not install the locked dependencies into $VEIL_VENV;" \
            "if pyproject.toml changed, run scripts/lock and commit uv.lock" >&2
        return 1
    fi
    # Veil's own modules too (they are installed editable, so uv leaves them alone); only
    # changed files are compiled again. Every `veil` process of the demo and tests starts faster.
    "$VEIL_VENV/bin/python" -m compileall -q -j 0 keyvault wire cipherdb relay node cli >/dev/null
}
