# PostgreSQL 15 from Debian's package, for hosts without an image registry (`make images`); it takes the
# official postgres image's environment (POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB) and data path.
ARG DEBIAN=local/debian:bookworm
FROM ${DEBIAN}
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-15 && rm -rf /var/lib/apt/lists/*
ENV PGDATA=/var/lib/postgresql/data PATH=/usr/lib/postgresql/15/bin:$PATH
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
EXPOSE 5432
ENTRYPOINT ["/bin/sh", "/usr/local/bin/postgres-entrypoint.sh"]
