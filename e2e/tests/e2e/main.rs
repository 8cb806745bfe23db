//! The end-to-end tests, one binary: a module per area, each against real
//! components (the kernel, Flask under real servers, Prometheus, containerd,
//! Chromium). They need root and `cargo xtask setup`; e2e/README.md says
//! how to run one and how to write one.
//!
//! `cargo xtask test` runs the modules one after another, each module's
//! tests side by side, so no module shares the node with another's agent.

mod capture_e2e;
mod containers_e2e;
mod debug_pages_e2e;
mod demo;
mod failure_modes;
mod flask_rules;
mod flood;
mod hostile_e2e;
mod hostile_sources_e2e;
mod kernel_filter_e2e;
mod kube_watch;
mod kubernetes_e2e;
mod manifest_schemas;
mod metric_names_e2e;
mod pfe_options_e2e;
mod pid_reuse_e2e;
mod prometheus_e2e;
mod prometheus_sharding_e2e;
mod route_discovery;
mod routes_e2e;
mod saturation_e2e;
