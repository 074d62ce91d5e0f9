# One image for the six services of docker-compose.yml (and for the
# simulator): `shardpay serve <service>`, `shardpay run ...`.
FROM rust:1.95-bookworm AS build
# librdkafka is built from source by its own configure script (the image
# has the C compiler and make it needs).
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin shardpay

FROM debian:bookworm-slim
# curl: the compose health checks call /ready.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/shardpay shardpay \
    && mkdir -p /var/lib/shardpay && chown shardpay /var/lib/shardpay
COPY --from=build /src/target/release/shardpay /usr/local/bin/shardpay
COPY scenarios /opt/shardpay/scenarios
WORKDIR /opt/shardpay
USER shardpay
ENTRYPOINT ["shardpay"]
CMD ["serve", "--help"]
