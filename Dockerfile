# Two stages: build with the Rust toolchain, run on a slim Debian with CA
# certificates (Slack and SMTP over TLS), curl (the health check) and an
# unprivileged user, numeric so that Kubernetes' runAsNonRoot can verify it.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin alert-router

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 alert-router \
    && useradd --system --uid 10001 --gid 10001 --home /app alert-router
WORKDIR /app
COPY --from=build /src/target/release/alert-router /usr/local/bin/alert-router
COPY config ./config
USER 10001:10001
ENV ALERT_ROUTER__HTTP__LISTEN=0.0.0.0:9464 \
    ALERT_ROUTER__LOG__FORMAT=json
EXPOSE 9464
# Healthy while consuming from RabbitMQ (/readyz answers 200).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:9464/readyz"]
ENTRYPOINT ["alert-router"]
CMD ["run"]
