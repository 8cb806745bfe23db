//! flask-ebpf-exporter: HTTP/1.x request/response pairs captured from the
//! kernel with eBPF, exported as prometheus-flask-exporter's metrics.
//!
//! A byte travels through one module per stage, in this order:
//! [`capture`] (kernel programs, ring buffer) → [`stream`] (per-connection
//! ordering) → [`http`] (heads, framing, pairing) → [`identity`] (who served
//! it) → [`routes`] (path label) → [`metrics`] → [`server`] (endpoints).
//! From the HTTP exchange on, stages hand each other the plain data of
//! [`exchange`]. [`pipeline`] is the loop that drives them, and [`agent`] builds it
//! from the validated settings; [`preflight`]
//! checks what loading the kernel programs takes; [`config`] the command
//! line; [`health`] health; [`procfs`] what is read of other processes;
//! [`debug`] the `/debug/*` views of routes, identities and connections.

pub mod agent;
pub mod capture;
pub mod config;
pub mod debug;
pub mod exchange;
pub mod health;
pub mod http;
pub mod identity;
pub mod metrics;
pub mod pipeline;
pub mod preflight;
pub mod procfs;
pub mod routes;
pub mod rules;
pub mod server;
pub mod stream;
pub mod telemetry;
