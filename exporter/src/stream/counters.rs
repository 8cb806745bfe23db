//! The stream stage's counters.

use prometheus::{IntCounter, IntGauge, Registry};

use crate::{
    http::HttpCounters,
    telemetry::{Budget, Budgets, counter, gauge},
};

/// What this stage and the HTTP stage under it count. The stage owns these
/// counters: `/metrics` and `/debug/connections` read them as they are.
#[derive(Clone, Debug)]
pub struct StreamCounters {
    pub connections_opened: IntCounter,
    pub sequence_gaps: IntCounter,
    pub connections_tracked: IntGauge,
    /// Body bytes the kernel counted without copying or reporting them.
    pub body_bytes_skipped: IntCounter,
    /// Connections the kernel forgot while this side followed them.
    pub connections_evicted: IntCounter,
    /// Partial heads given up to stay within [`MAX_PARTIAL_HEAD_BYTES`].
    pub partial_head_budget: IntCounter,
    /// Waiting requests given up to stay within
    /// [`MAX_PENDING_TARGET_BYTES`].
    pub pending_target_budget: IntCounter,
    /// Accepted connections whose handshake the kernel's map no longer
    /// held: no queue time for them.
    pub handshakes_forgotten: IntCounter,
    /// Forgotten handshakes counted at once, past
    /// [`super::MAX_FORGOTTEN_AWAITING_LOOKUP`], before their server's
    /// lookup answered.
    pub forgotten_handshakes_budget: IntCounter,
    pub http: HttpCounters,
}

impl StreamCounters {
    pub fn register(registry: &Registry, budgets: &Budgets) -> Result<Self, prometheus::Error> {
        Ok(StreamCounters {
            partial_head_budget: budgets.counter(Budget::PartialHeadBytes),
            pending_target_budget: budgets.counter(Budget::PendingTargetBytes),
            forgotten_handshakes_budget: budgets.counter(Budget::ForgottenHandshakes),
            handshakes_forgotten: counter(
                registry,
                "flask_ebpf_exporter_handshakes_forgotten_total",
                "Accepted connections with no queue time because the kernel's handshake map \
                 (--kernel-handshakes entries, node-wide) had forgotten their handshake: more \
                 connections waited to be accepted at once than it holds, or their handshake \
                 ended before the agent started",
            )?,
            connections_opened: counter(
                registry,
                "flask_ebpf_exporter_connections_total",
                "Server-side connections followed since start",
            )?,
            sequence_gaps: counter(
                registry,
                "flask_ebpf_exporter_sequence_gaps_total",
                "Connections on which events went missing",
            )?,
            body_bytes_skipped: counter(
                registry,
                "flask_ebpf_exporter_body_bytes_skipped_total",
                "Request and response body bytes the kernel side counted without copying them, at the agent's request",
            )?,
            connections_evicted: counter(
                registry,
                "flask_ebpf_exporter_connections_evicted_total",
                "Connections whose end this side never saw because the kernel side forgot them: evicted from its connection map when more than --kernel-connections were followed at once (or, rarely, their close event was lost to a full ring buffer, which events_lost_total also counts)",
            )?,
            connections_tracked: gauge(
                registry,
                "flask_ebpf_exporter_connections_tracked",
                "Server-side connections currently followed",
            )?,
            http: HttpCounters::register(registry)?,
        })
    }
}
