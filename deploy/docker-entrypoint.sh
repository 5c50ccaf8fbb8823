#!/bin/sh
# Read OPENROUTER_MANAGEMENT_KEY from the file OPENROUTER_MANAGEMENT_KEY_FILE names (a Docker
# secret), unless it is set directly (an env file), then run the command.
set -eu

if [ -n "${OPENROUTER_MANAGEMENT_KEY_FILE:-}" ] && [ -z "${OPENROUTER_MANAGEMENT_KEY:-}" ]; then
    if [ ! -r "$OPENROUTER_MANAGEMENT_KEY_FILE" ]; then
        echo "keyhygiene: error: OPENROUTER_MANAGEMENT_KEY_FILE names $OPENROUTER_MANAGEMENT_KEY_FILE, which cannot be read" >&2
        exit 2
    fi
    OPENROUTER_MANAGEMENT_KEY="$(tr -d '\r\n' < "$OPENROUTER_MANAGEMENT_KEY_FILE")"
    export OPENROUTER_MANAGEMENT_KEY
fi
unset OPENROUTER_MANAGEMENT_KEY_FILE

exec "$@"
