# samgate: one static-ish binary in a small non-root image.
#   docker build -t samgate .
#   docker run --rm samgate --help
# Build stage: librdkafka (with vendored OpenSSL and zstd) is compiled from source by rdkafka-sys.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY crates crates
COPY examples examples
# The manifest names tests/chaos.rs (a test with a harness of its own); nothing in tests is built.
COPY tests tests
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin samgate \
    && cp target/release/samgate /samgate

# Runtime: glibc, zlib and CA certificates; nothing else.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates zlib1g \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin samgate
COPY --from=build /samgate /usr/local/bin/samgate
USER 10001:10001
# /metrics, /healthz, /readyz of `samgate run`
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/samgate"]
CMD ["run", "--config", "/etc/samgate/samgate.toml"]
