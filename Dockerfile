# syntax=docker/dockerfile:1
# The webhook image: a release build on the official Rust image, copied into distroless "cc"
# (glibc and libgcc, which the binary links; no shell, no package manager), run as the
# distroless nonroot user 65532, the uid the Deployment's securityContext expects.
#
#   docker build -t ghcr.io/lightstep/lightstep-tekton-webhook:0.1.0 .

# Same Debian release as the runtime image, so the glibc the binary was linked against is there.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and the target directory between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release \
    && install -D -m 0755 target/release/lightstep-tekton-webhook /out/lightstep-tekton-webhook

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/lightstep-tekton-webhook /usr/local/bin/lightstep-tekton-webhook
USER 65532:65532
EXPOSE 8443 9090
ENTRYPOINT ["/usr/local/bin/lightstep-tekton-webhook"]
CMD ["serve", "--help"]
