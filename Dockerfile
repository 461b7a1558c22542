# One image for every MadTech component: `madtech serve <component>`.
#
#   docker build -t madtech:0.1.0 .
#
# Build stage: the Rust toolchain; protoc comes from the protoc-bin-vendored
# crate and aws-lc builds with the C compiler the image has.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin madtech \
    && strip target/release/madtech

# Run stage: glibc and CA certificates, nothing else; no shell, no package
# manager. The `nonroot` variant runs as UID 65532, as the manifests expect.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/madtech /usr/local/bin/madtech
# Default policies (casbin files, consent rules, identity rules), overridden
# in Kubernetes by the mounted ConfigMap at the same path.
COPY policies/*.conf policies/*.csv policies/*.toml /etc/madtech/policies/
ENV MADTECH_GATEWAY__POLICY_DIR=/etc/madtech/policies \
    MADTECH_CONSENT__POLICY_DIR=/etc/madtech/policies \
    MADTECH_PROFILES__IDENTITY_RULES=/etc/madtech/policies/identity.toml \
    MADTECH_TELEMETRY__LOG_FORMAT=json
USER 65532:65532
EXPOSE 50051 50052 50053 50054 50055 9090
ENTRYPOINT ["/usr/local/bin/madtech"]
CMD ["serve", "gateway"]
