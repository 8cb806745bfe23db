//! OpenTelemetry's HTTP server metrics (`--metric-names otel|both`), named
//! as OpenTelemetry's Prometheus exporters name them: dots become
//! underscores, the unit is appended (`s` → `_seconds`, `By` → `_bytes`)
//! and a `{request}` annotation is dropped.
//!
//! | convention | here |
//! |---|---|
//! | `http.server.request.duration` (s) | `http_server_request_duration_seconds` |
//! | `http.server.active_requests` ({request}) | `http_server_active_requests` |
//! | `http.server.request.body.size` (By) | `http_server_request_body_size_bytes` |
//! | `http.server.response.body.size` (By) | `http_server_response_body_size_bytes` |
//!
//! Attributes become labels the same way (`http.request.method` →
//! `http_request_method`). Labels a request does not have are left empty,
//! which Prometheus stores as absent: `http_route` for a request no route
//! takes, `error_type` below status 500, `server_port` when the listening
//! socket could not be read.

use std::sync::Arc;

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntGauge, IntGaugeVec, Opts, Registry};

use super::status::StatusLabel;

/// The labels of the per-route families, before the identity's.
const ROUTE_LABELS: [&str; 7] = [
    "http_request_method",
    "http_route",
    "http_response_status_code",
    "url_scheme",
    "network_protocol_version",
    "server_port",
    "error_type",
];

/// What, besides method and status, tells one request's OpenTelemetry
/// series from another's under the same exported route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Variant {
    /// `http_route`: empty when no route takes the request.
    pub route: Arc<str>,
    pub version: http::Version,
    pub server_port: Option<u16>,
}

/// The series of one (variant, method, status) of an identity.
#[derive(Clone, Debug)]
pub struct RouteHandles {
    pub duration: Histogram,
    /// Request and response body sizes, when `--body-sizes` asks for them.
    pub sizes: Option<[Histogram; 2]>,
}

/// The OpenTelemetry-named families.
#[derive(Clone, Debug)]
pub struct OtelFamilies {
    duration: HistogramVec,
    /// Request and response body sizes: the conventions' optional
    /// metrics, registered only when `--body-sizes` is not `off`.
    sizes: Option<[HistogramVec; 2]>,
    active: IntGaugeVec,
}

/// The method as the conventions have it: `_OTHER` for any method not
/// known.
fn method_value(exported: &'static str) -> &'static str {
    if exported == "OTHER" {
        "_OTHER"
    } else {
        exported
    }
}

fn version_value(version: http::Version) -> &'static str {
    if version == http::Version::HTTP_10 {
        "1.0"
    } else {
        "1.1"
    }
}

impl OtelFamilies {
    /// Registers the families; `identity_labels` follow the conventions'
    /// labels; `buckets` are the duration histogram's bounds and
    /// `size_buckets` the body sizes' (none: no body-size families).
    pub fn register(
        registry: &Registry,
        identity_labels: &[&str],
        buckets: &[f64],
        size_buckets: Option<&[f64]>,
    ) -> Result<Self, prometheus::Error> {
        let route_labels: Vec<&str> = ROUTE_LABELS
            .iter()
            .chain(identity_labels)
            .copied()
            .collect();
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets),
                &route_labels,
            )
        };
        let families = OtelFamilies {
            duration: histogram(
                "http_server_request_duration_seconds",
                "Duration of HTTP server requests (OpenTelemetry's http.server.request.duration): \
                 from the first request byte the server read to the last response byte it wrote",
                buckets.to_vec(),
            )?,
            sizes: match size_buckets {
                Some(size_buckets) => Some([
                    histogram(
                        "http_server_request_body_size_bytes",
                        "Size of HTTP server request bodies (OpenTelemetry's \
                         http.server.request.body.size): payload bytes, chunked framing left out",
                        size_buckets.to_vec(),
                    )?,
                    histogram(
                        "http_server_response_body_size_bytes",
                        "Size of HTTP server response bodies (OpenTelemetry's \
                         http.server.response.body.size): payload bytes, chunked framing left out",
                        size_buckets.to_vec(),
                    )?,
                ]),
                None => None,
            },
            active: IntGaugeVec::new(
                Opts::new(
                    "http_server_active_requests",
                    "Number of active HTTP server requests (OpenTelemetry's \
                     http.server.active_requests): read and not yet answered, sampled once a \
                     second, per server (not per method)",
                ),
                &["url_scheme"]
                    .iter()
                    .chain(identity_labels)
                    .copied()
                    .collect::<Vec<_>>(),
            )?,
        };
        let sizes = families.sizes.iter().flatten();
        for collector in [&families.duration].into_iter().chain(sizes) {
            registry.register(Box::new(collector.clone()))?;
        }
        registry.register(Box::new(families.active.clone()))?;
        Ok(families)
    }

    /// The per-route label values, then the identity's.
    fn values<'a>(
        variant: &'a Variant,
        method: &'static str,
        status: &'a str,
        port: &'a str,
        identity: &'a [String],
    ) -> Vec<&'a str> {
        let error_type = if status.starts_with('5') { status } else { "" };
        [
            method_value(method),
            &variant.route,
            status,
            "http",
            version_value(variant.version),
            port,
            error_type,
        ]
        .into_iter()
        .chain(identity.iter().map(String::as_str))
        .collect()
    }

    /// Calls `with` on the label values of one (variant, method, status)
    /// of an identity.
    fn with_values<R>(
        variant: &Variant,
        method: &'static str,
        status: StatusLabel,
        identity: &[String],
        with: impl FnOnce(&[&str]) -> R,
    ) -> R {
        let status = status.to_string();
        let port = variant
            .server_port
            .map(|p| p.to_string())
            .unwrap_or_default();
        with(&Self::values(variant, method, &status, &port, identity))
    }

    /// The series of one (variant, method, status) of an identity.
    pub fn route_handles(
        &self,
        variant: &Variant,
        method: &'static str,
        status: StatusLabel,
        identity: &[String],
    ) -> RouteHandles {
        Self::with_values(variant, method, status, identity, |values| RouteHandles {
            duration: self.duration.with_label_values(values),
            sizes: self.sizes.as_ref().map(|sizes| {
                sizes
                    .each_ref()
                    .map(|family| family.with_label_values(values))
            }),
        })
    }

    /// Removes the series [`Self::route_handles`] made.
    pub fn remove_route(
        &self,
        variant: &Variant,
        method: &'static str,
        status: StatusLabel,
        identity: &[String],
    ) {
        Self::with_values(variant, method, status, identity, |values| {
            // Only an identity with the same labels could have removed them.
            for family in std::iter::once(&self.duration).chain(self.sizes.iter().flatten()) {
                let _ = family.remove_label_values(values);
            }
        });
    }

    /// An identity's active-requests gauge.
    pub fn active(&self, identity: &[String]) -> IntGauge {
        self.active
            .with_label_values(&Self::active_values(identity))
    }

    pub fn remove_active(&self, identity: &[String]) {
        let _ = self
            .active
            .remove_label_values(&Self::active_values(identity));
    }

    fn active_values(identity: &[String]) -> Vec<&str> {
        std::iter::once("http")
            .chain(identity.iter().map(String::as_str))
            .collect()
    }
}
