# syntax=docker/dockerfile:1
#
# The `allot` binary in a small Debian image. Build and run one node:
#
#   docker build -t allot .
#   docker run --rm -p 8080:8080 allot --demo                      # SQLite in /var/lib/allot/data
#   docker run --rm -p 8080:8080 -e ALLOT_DATABASE_URL=postgres://… allot
#
# Several nodes behind nginx over one PostgreSQL: docker-compose.yml and docs/scale-out.md.

# The builder uses the same Debian release as the runtime image, so the binary links against
# the glibc it will run with.
FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# The bundled SQLite's compile-time options (LIBSQLITE3_FLAGS).
COPY .cargo ./.cargo
COPY crates ./crates
# Migrations are embedded in the binary at compile time (sqlx::migrate!); nothing else from the
# source tree is needed at run time.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && install -m 0755 target/release/allot /usr/local/bin/allot

FROM debian:bookworm-slim
# ca-certificates for TLS to external services; curl for container health checks (/readyz).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 allot \
    && useradd --system --uid 10001 --gid allot --home-dir /var/lib/allot --shell /usr/sbin/nologin allot \
    && mkdir -p /var/lib/allot/data \
    && chown -R allot:allot /var/lib/allot
COPY --from=builder /usr/local/bin/allot /usr/local/bin/allot
USER allot:allot
# The default database URL sqlite://data/allot.db is relative to this directory.
WORKDIR /var/lib/allot
# Inside a container the node must listen on all interfaces (the binary's default is
# 127.0.0.1:8080).
ENV ALLOT_LISTEN=0.0.0.0:8080 \
    ALLOT_LOG=info,sqlx=warn
EXPOSE 8080
# SIGTERM (docker stop) makes allot stop accepting and finish in-flight requests.
STOPSIGNAL SIGTERM
ENTRYPOINT ["allot", "serve"]
