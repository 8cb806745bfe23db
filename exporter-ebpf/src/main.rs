//! Kernel side of flask-ebpf-exporter: syscall tracepoints that follow the
//! server side of TCP connections and copy a bounded prefix of every buffer
//! read from or written to them into a ring buffer.
//!
//! Deliberately small: decide "is this a tracked connection?", copy, count.
//! All HTTP parsing happens in userspace.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod object;
#[cfg(target_arch = "bpf")]
mod programs;

// On the host this crate builds as an empty binary so that workspace-wide
// `cargo build/test/clippy --all-targets` work; the real object is built for
// bpfel-unknown-none by aya-build from exporter/build.rs.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
