# The gateway (`postern server`). Build from the repository root:
#   docker build -f deploy/docker/gateway.Dockerfile -t postern-gateway .
# Run (state in a volume; the config's data_dir must be /var/lib/postern):
#   docker run -v postern:/var/lib/postern -p 8443:8443 -p 4433:4433/udp postern-gateway \
#     server --data-dir /var/lib/postern --api 0.0.0.0:8443 --relay 0.0.0.0:4433 --metrics 0.0.0.0:9464
# (the endpoint listeners bind to endpoint_host: use a config file and publish their ports).

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --locked -p gateway --bin postern \
    && install -D -m 0755 target/dist/postern /out/postern \
    && install -d -m 0700 /out/state

# glibc and libgcc only, no shell, no package manager; runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/postern /usr/local/bin/postern
COPY --from=build --chown=65532:65532 /out/state /var/lib/postern
USER 65532:65532
VOLUME ["/var/lib/postern"]
EXPOSE 8443/tcp 4433/udp 9464/tcp
ENV RUST_LOG=info
ENTRYPOINT ["/usr/local/bin/postern", "--output", "json"]
CMD ["server", "--data-dir", "/var/lib/postern", "--api", "0.0.0.0:8443", "--relay", "0.0.0.0:4433", "--log-format", "json"]
