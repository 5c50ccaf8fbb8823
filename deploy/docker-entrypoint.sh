#!/bin/sh
# The image's entrypoint. It starts as root only to read the files compose mounts with the HOST
# file's owner and mode (the secrets: outside swarm, compose ignores uid/gid/mode), then runs the
# command as the unprivileged user keyhygiene (uid 10001).
#
#   OPENROUTER_MANAGEMENT_KEY_FILE     read into OPENROUTER_MANAGEMENT_KEY (unless that is set)
#   KEYHYGIENE_DATABASE_PASSWORD_FILE  put, URL-escaped, into KEYHYGIENE_DATABASE_URL as its password
#   KEYHYGIENE_<NAME>_FILE             any other (a [[notify]] target's webhook URL or signing
#                                      secret): read into KEYHYGIENE_<NAME> (unless that is set);
#                                      KEYHYGIENE_RULES_FILE is a setting, not one of these
#
# None of these values is ever in the image, the compose file or `docker inspect`.
set -eu

APP_UID=10001
APP_HOME=/var/lib/keyhygiene

fail() {  # exit 2 with one line on stderr: the event command_failed where the logs are JSON
    # The settings take the variable's name in any case: so does this (the upper-case one first).
    format=${KEYHYGIENE_LOG_FORMAT-$(env | sed -n 's/^[Kk][Ee][Yy][Hh][Yy][Gg][Ii][Ee][Nn][Ee]_[Ll][Oo][Gg]_[Ff][Oo][Rr][Mm][Aa][Tt]=//p' | head -n 1)}
    case "$(printf '%s' "${format:-auto}" | tr -d ' \t' | tr '[:upper:]' '[:lower:]')" in
        json) json=1 ;;
        console) json= ;;
        *) if [ -t 2 ]; then json=; else json=1; fi ;;  # auto, or a value keyhygiene will refuse
    esac
    if [ -n "$json" ] && python -c '
import datetime, json, sys
now = datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")
print(json.dumps({"error": sys.argv[1], "exit_code": 2, "event": "command_failed", "level": "error",
                  "logger": "keyhygiene.entrypoint", "timestamp": now}))' "$*" >&2; then
        exit 2
    fi
    echo "keyhygiene: error: $*" >&2
    exit 2
}

readable() {  # variable name, file: exit 2 unless the file can be read
    [ -f "$2" ] && [ -r "$2" ] || fail "$1 names $2, which cannot be read (as uid $(id -u)); check the secret file on the host, and that this service mounts it (its compose secrets:)"
}

if [ -n "${OPENROUTER_MANAGEMENT_KEY_FILE:-}" ] && [ -z "${OPENROUTER_MANAGEMENT_KEY:-}" ]; then
    readable OPENROUTER_MANAGEMENT_KEY_FILE "$OPENROUTER_MANAGEMENT_KEY_FILE"
    OPENROUTER_MANAGEMENT_KEY="$(tr -d '\r\n' < "$OPENROUTER_MANAGEMENT_KEY_FILE")"
    export OPENROUTER_MANAGEMENT_KEY
fi
unset OPENROUTER_MANAGEMENT_KEY_FILE

if [ -n "${KEYHYGIENE_DATABASE_PASSWORD_FILE:-}" ]; then
    readable KEYHYGIENE_DATABASE_PASSWORD_FILE "$KEYHYGIENE_DATABASE_PASSWORD_FILE"
    # SQLAlchemy escapes what a URL cannot hold as it is (@ : / % # ? and the like).
    KEYHYGIENE_DATABASE_URL="$(python - <<'PY'
import os
import sys

try:
    from sqlalchemy.engine import make_url

    try:
        with open(os.environ["KEYHYGIENE_DATABASE_PASSWORD_FILE"], encoding="utf-8") as file:
            password = file.read().rstrip("\r\n")
    except (OSError, UnicodeError):
        sys.exit(4)
    try:
        url = make_url(os.environ.get("KEYHYGIENE_DATABASE_URL", ""))
    except Exception:
        sys.exit(3)
    print(url.set(password=password).render_as_string(hide_password=False))
except Exception as exc:  # a bug: its name only (its text may hold the password), and no traceback
    print(type(exc).__name__)
    sys.exit(5)
PY
)" || {
        case $? in
            3) fail "KEYHYGIENE_DATABASE_URL is not a database URL" ;;
            4) fail "KEYHYGIENE_DATABASE_PASSWORD_FILE names $KEYHYGIENE_DATABASE_PASSWORD_FILE, which cannot be read as UTF-8 text" ;;
            5) fail "KEYHYGIENE_DATABASE_PASSWORD_FILE could not be put into KEYHYGIENE_DATABASE_URL ($KEYHYGIENE_DATABASE_URL)" ;;
            *) fail "KEYHYGIENE_DATABASE_PASSWORD_FILE could not be put into KEYHYGIENE_DATABASE_URL" ;;
        esac
    }
    export KEYHYGIENE_DATABASE_URL
fi
unset KEYHYGIENE_DATABASE_PASSWORD_FILE

for file_variable in $(env | sed -n 's/^\(KEYHYGIENE_[A-Z0-9_]*_FILE\)=.*/\1/p'); do
    [ "$file_variable" = KEYHYGIENE_RULES_FILE ] && continue
    name=${file_variable%_FILE}
    eval "path=\${$file_variable}"
    eval "given=\${$name:-}"
    if [ -n "$path" ] && [ -z "$given" ]; then
        readable "$file_variable" "$path"
        export "$name=$(tr -d '\r\n' < "$path")"
    fi
    unset "$file_variable"
done

# A bind mount of a rules file that was missing on the host shows up as a directory.
if [ -n "${KEYHYGIENE_RULES_FILE:-}" ] && [ -d "$KEYHYGIENE_RULES_FILE" ]; then
    fail "the rules file $KEYHYGIENE_RULES_FILE is a directory: put your rules at ./keyhygiene.toml next to docker-compose.yml (start from deploy/keyhygiene.toml.example; remove the directory Docker created)"
fi

if [ "$(id -u)" = 0 ]; then
    export HOME="$APP_HOME" USER=keyhygiene
    exec setpriv --reuid="$APP_UID" --regid="$APP_UID" --clear-groups --no-new-privs -- "$@"
fi
exec "$@"
