# Two stages: build with the Rust toolchain, run on a slim Debian with only CA
# certificates (Slack and SMTP over TLS) and an unprivileged user.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin alert-router

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /app alert-router
WORKDIR /app
COPY --from=build /src/target/release/alert-router /usr/local/bin/alert-router
COPY config ./config
USER alert-router
ENV ALERT_ROUTER__HTTP__LISTEN=0.0.0.0:9464 \
    ALERT_ROUTER__LOG__FORMAT=json
EXPOSE 9464
HEALTHCHECK --interval=10s --timeout=3s CMD ["/bin/sh", "-c", "exec 3<>/dev/tcp/127.0.0.1/9464"]
ENTRYPOINT ["alert-router"]
CMD ["run"]
