# keyhygiene: the worker, beat and every command, in one image. No secret is ever copied in: the
# management key comes at run time from OPENROUTER_MANAGEMENT_KEY or a file named by
# OPENROUTER_MANAGEMENT_KEY_FILE (a Docker secret), the database password from a file named by
# KEYHYGIENE_DATABASE_PASSWORD_FILE.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY keyhygiene ./keyhygiene
COPY db ./db
COPY migrations ./migrations
COPY tasks ./tasks
COPY worker ./worker
RUN pip install --constraint constraints.txt . && rm -rf /src

COPY deploy/docker-entrypoint.sh /usr/local/bin/keyhygiene-entrypoint
RUN chmod 0755 /usr/local/bin/keyhygiene-entrypoint \
    && groupadd --system --gid 10001 keyhygiene \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/keyhygiene --create-home keyhygiene

# No USER: the entrypoint starts as root only to read the secrets compose mounts with the host
# file's owner and mode, then runs every command as keyhygiene (uid 10001) with setpriv.
WORKDIR /var/lib/keyhygiene
ENTRYPOINT ["keyhygiene-entrypoint"]
CMD ["keyhygiene", "--help"]
