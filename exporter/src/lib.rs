//! flask-ebpf-exporter: HTTP/1.x request/response pairs captured from the
//! kernel with eBPF, exported as prometheus-flask-exporter's metrics.
//!
//! A byte travels through one module per stage, in this order:
//! [`capture`] (kernel programs, ring buffer) → [`stream`] (per-connection
//! ordering) → [`http`] (heads, framing, pairing) → [`routes`] (path label)
//! and [`identity`] (who served it) → [`metrics`] → [`server`] (endpoints).
//! [`pipeline`] is the loop that drives them; [`config`] the command line;
//! [`debug`] the `/debug/*` views of routes, identities and connections.

pub mod capture;
pub mod config;
pub mod debug;
pub mod http;
pub mod identity;
pub mod metrics;
pub mod pipeline;
pub mod routes;
pub mod server;
pub mod stream;
