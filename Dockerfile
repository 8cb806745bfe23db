# The image the DaemonSet runs (manifests/daemonset.yaml).
#   docker build -t registry.example/flask-ebpf-exporter:0.1.0 .
# The builder installs the toolchain with the project's own set-up step
# (Debian's rustc-web with a prebuilt BPF core, bpf-linker against its LLVM;
# see xtask/src/main.rs); the runtime stage holds only the binary, which
# embeds the BPF programs.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo xtask setup --toolchain-only \
    && cargo build --release --locked -p flask-ebpf-exporter \
    && install -m 0755 target/release/flask-ebpf-exporter /flask-ebpf-exporter

# glibc and libgcc, nothing else: no shell, no package manager.
FROM gcr.io/distroless/cc-debian12
COPY --from=build /flask-ebpf-exporter /usr/local/bin/flask-ebpf-exporter
EXPOSE 9810
ENTRYPOINT ["/usr/local/bin/flask-ebpf-exporter"]
