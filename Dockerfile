# quantd: multi-stage build. The builder compiles with the repository's .cargo/config.toml
# (x86-64-v3, so candle's AVX2 kernels are in); the runtime image is slim, runs as a non-root
# user, and keeps everything under the /data volume.
FROM rust:1.95-bookworm AS builder
WORKDIR /src
# Everything the manifest names must be here: build.rs and the declared bench target too
# (tests/docker_context.rs replays these COPY lines and runs cargo on the result).
COPY Cargo.toml Cargo.lock build.rs ./
COPY .cargo .cargo
COPY src src
COPY benches benches
COPY migrations migrations
COPY config config
RUN cargo build --release --locked && cp target/release/quantd /usr/local/bin/quantd

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin quantd \
    && mkdir -p /data && chown quantd:quantd /data
COPY --from=builder /usr/local/bin/quantd /usr/local/bin/quantd
USER quantd
WORKDIR /data
VOLUME ["/data"]
ENV QUANTD_DATA_DIR=/data \
    QUANTD_SERVER__HOST=0.0.0.0 \
    QUANTD_SERVER__PORT=8080
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
    CMD curl -fsS http://127.0.0.1:8080/health || exit 1
# Listening on 0.0.0.0 needs API keys (QUANTD_AUTH__ADMIN_KEYS) or an explicit opt-out.
CMD ["quantd", "serve"]
