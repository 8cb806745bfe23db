//! flask-ebpf-exporter: HTTP/1.x request/response pairs captured from the
//! kernel with eBPF, exported as prometheus-flask-exporter's metrics.
//!
//! A byte travels through one module per stage, in this order:
//! [`capture`] (kernel programs, ring buffer) → [`stream`] (per-connection
//! ordering) → [`http`] (heads, framing, pairing) → [`routes`] (path label)
//! → [`identity`] (who served it) → [`metrics`] → [`server`] (endpoints).

pub mod http;
