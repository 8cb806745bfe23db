# The image the DaemonSet runs (manifests/daemonset.yaml).
#   cargo xtask image        (podman, with local stand-ins for both bases)
#   podman build -t registry.example/flask-ebpf-exporter:0.1.0 .
# The builder installs the toolchain with the project's own set-up step
# (Debian's rustc-web with a prebuilt BPF core, bpf-linker against its LLVM;
# see xtask/src/main.rs); the runtime stage holds only the binary, which
# embeds the BPF programs.
ARG BUILDER_IMAGE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12

FROM ${BUILDER_IMAGE} AS build
WORKDIR /src
COPY . .
# File capabilities in the permitted set only: a non-root process gets them
# at exec when the runtime grants them, and the agent raises them itself
# (with the effective bit, exec would fail outright when one is not granted,
# before the agent could say which).
RUN cargo xtask setup --toolchain-only \
    && cargo build --release --locked -p flask-ebpf-exporter \
    && install --strip -m 0755 target/release/flask-ebpf-exporter /flask-ebpf-exporter \
    && setcap cap_bpf,cap_perfmon,cap_sys_ptrace,cap_dac_read_search+p /flask-ebpf-exporter

# glibc, libgcc and CA certificates, nothing else: no shell, no package manager.
FROM ${RUNTIME_IMAGE}
COPY --from=build /flask-ebpf-exporter /usr/local/bin/flask-ebpf-exporter
USER 65532:65532
EXPOSE 9810
ENTRYPOINT ["/usr/local/bin/flask-ebpf-exporter"]
