# The agent (`postern-agent run`). Build from the repository root:
#   docker build -f deploy/docker/agent.Dockerfile -t postern-agent .
# Enroll once, then run, with agent.toml and the trail in a volume
# (agent.toml: audit_path = "/var/lib/postern-agent/audit.jsonl"):
#   docker run -v agent:/var/lib/postern-agent postern-agent \
#     enroll --gateway HOST:4433 --token pse1_… --config /var/lib/postern-agent/agent.toml
#   docker run -d -v agent:/var/lib/postern-agent postern-agent
# Ops run tools (kubectl, psql, ssh, cloud CLIs) inside the agent's container: this image
# has none. Build FROM it and COPY the static tools you allow, and name them in [tools].

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --locked -p tunnel-client --bin postern-agent \
    && install -D -m 0755 target/dist/postern-agent /out/postern-agent \
    && install -d -m 0700 /out/state

# glibc and libgcc only, no shell, no package manager; runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/postern-agent /usr/local/bin/postern-agent
COPY --from=build --chown=65532:65532 /out/state /var/lib/postern-agent
USER 65532:65532
VOLUME ["/var/lib/postern-agent"]
ENV RUST_LOG=info
ENTRYPOINT ["/usr/local/bin/postern-agent"]
CMD ["run", "--config", "/var/lib/postern-agent/agent.toml"]
