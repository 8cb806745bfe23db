//! The HTTP stage's counters: what could not be parsed or paired.

use prometheus::{IntCounter, Registry};

use crate::telemetry::counter;

/// What the HTTP stage counts that is not an exchange. The stage owns these
/// counters: `/metrics` and `/debug/connections` read them as they are.
#[derive(Clone, Debug)]
pub struct HttpCounters {
    /// Bytes that did not parse as HTTP/1.x where a message had to start.
    pub unparsed_bytes: IntCounter,
    /// Heads or chunk lines that fell outside the copied prefix.
    pub truncated_captures: IntCounter,
    /// Responses with no request waiting for them.
    pub unpaired_responses: IntCounter,
    /// Requests dropped without a response (gap, reset, close, overflow,
    /// a response head that did not parse).
    pub abandoned_requests: IntCounter,
    /// Requests whose framing a server must refuse (RFC 9112 §6.3): their
    /// connection is no longer followed.
    pub ambiguous_requests: IntCounter,
    /// Exchanges whose client went away before the response was written
    /// (counted, with the status the server wrote).
    pub client_gone: IntCounter,
}

impl HttpCounters {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        Ok(HttpCounters {
            unparsed_bytes: counter(
                registry,
                "flask_ebpf_exporter_unparsed_bytes_total",
                "Bytes on server connections that did not parse as HTTP/1.x",
            )?,
            truncated_captures: counter(
                registry,
                "flask_ebpf_exporter_truncated_captures_total",
                "HTTP heads or chunk lines beyond the copied prefix of a buffer",
            )?,
            unpaired_responses: counter(
                registry,
                "flask_ebpf_exporter_unpaired_responses_total",
                "Responses with no request waiting for them",
            )?,
            abandoned_requests: counter(
                registry,
                "flask_ebpf_exporter_abandoned_requests_total",
                "Requests that ended without a response being seen",
            )?,
            ambiguous_requests: counter(
                registry,
                "flask_ebpf_exporter_ambiguous_requests_total",
                "Requests with framing a server must refuse (RFC 9112 6.3); their connection is no longer followed",
            )?,
            client_gone: counter(
                registry,
                "flask_ebpf_exporter_client_gone_total",
                "Exchanges whose client went away before the response was written, counted with the status the server wrote",
            )?,
        })
    }
}
