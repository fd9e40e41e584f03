# PostgreSQL from Debian's packages, a stand-in for the published postgres image in
# infra/podman/compose.local.yaml (no registry reachable). It keeps the published image's
# contract: POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB, data in /var/lib/postgresql/data,
# *.sql of /docker-entrypoint-initdb.d run once on an empty volume. Build from the repository root.
ARG BASE_IMAGE=localhost/vae-pipeline-base:bookworm
FROM ${BASE_IMAGE}

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
COPY infra/podman/postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
VOLUME ["/var/lib/postgresql/data"]
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["postgres"]
