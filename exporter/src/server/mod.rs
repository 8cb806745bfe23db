//! HTTP endpoints: /metrics, /healthz, /readyz (see [`crate::health`]),
//! and /debug/* (see [`crate::debug`]), served by [`accept`]'s bounded
//! loop.

pub mod accept;

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Query, State, rejection::QueryRejection},
    http::{HeaderMap, StatusCode, Uri, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};

use prometheus::Registry;
use tower_http::compression::CompressionLayer;

use crate::{
    debug::{self, DebugSnapshot, DebugState, PageOptions},
    health::{Health, monotonic_ns},
    telemetry,
};

pub const METRICS_PATH: &str = "/metrics";
/// Liveness: see [`Health::stalled`].
pub const HEALTHZ_PATH: &str = "/healthz";
/// Readiness: see [`Health::is_ready`].
pub const READYZ_PATH: &str = "/readyz";

#[derive(Clone)]
pub struct ServerState {
    /// Every stage's series and counters.
    pub registry: Registry,
    pub health: Arc<Health>,
    /// `None`: the `/debug/*` endpoints are off.
    pub debug: Option<Arc<DebugState>>,
}

/// What Prometheus and the kubelet reach, on the node's address.
pub fn router(state: ServerState) -> Router {
    Router::new()
        // Prometheus asks for gzip; a node's exposition is mostly repeated
        // label text, and compresses to a small part of its size.
        .route(
            METRICS_PATH,
            get(metrics_text).layer(CompressionLayer::new().gzip(true)),
        )
        .route(HEALTHZ_PATH, get(healthz))
        .route(READYZ_PATH, get(readyz))
        .with_state(state)
}

/// The `/debug/*` pages, on their own listener (loopback by default): they
/// name pods, processes and sample paths.
pub fn debug_router(state: ServerState) -> Router {
    Router::new()
        .route(
            "/debug/routes",
            get(|state, uri, headers, options| {
                debug_page(
                    state,
                    (uri, headers, options),
                    |s| &s.routes,
                    debug::routes_html,
                )
            }),
        )
        .route(
            "/debug/pods",
            get(|state, uri, headers, options| {
                debug_page(
                    state,
                    (uri, headers, options),
                    |s| &s.pods,
                    debug::pods_html,
                )
            }),
        )
        .route(
            "/debug/connections",
            get(|state, uri, headers, options| {
                debug_page(
                    state,
                    (uri, headers, options),
                    |s| &s.connections,
                    debug::connections_html,
                )
            }),
        )
        .with_state(state)
}

async fn healthz(State(state): State<ServerState>) -> impl IntoResponse {
    match state.health.stalled(monotonic_ns()) {
        None => (StatusCode::OK, "ok\n".to_owned()),
        Some(stalled) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not alive: {stalled}\n"),
        ),
    }
}

/// HTML for `?format=html` or a browser's Accept header; JSON otherwise.
fn wants_html(uri: &Uri, headers: &HeaderMap) -> bool {
    let query = uri.query().unwrap_or_default();
    if query.split('&').any(|pair| pair == "format=json") {
        return false;
    }
    query.split('&').any(|pair| pair == "format=html")
        || headers
            .get(header::ACCEPT)
            .and_then(|accept| accept.to_str().ok())
            .is_some_and(|accept| accept.contains("text/html"))
}

/// A debug page as HTML or JSON; unknown or malformed page options are
/// left at their defaults (the page still answers).
async fn debug_page<T: serde::Serialize>(
    State(state): State<ServerState>,
    (uri, headers, options): (Uri, HeaderMap, Result<Query<PageOptions>, QueryRejection>),
    report: impl Fn(&DebugSnapshot) -> &T,
    html: impl Fn(&DebugSnapshot, &PageOptions) -> maud::Markup,
) -> Response {
    let Some(debug) = &state.debug else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let snapshot = debug.latest();
    if wants_html(&uri, &headers) {
        let options = options.map(|Query(options)| options).unwrap_or_default();
        return Html(html(&snapshot, &options).into_string()).into_response();
    }
    /// A report with the time its snapshot was taken beside its fields.
    #[derive(serde::Serialize)]
    struct Stamped<'a, T> {
        updated_at: f64,
        #[serde(flatten)]
        report: &'a T,
    }
    Json(Stamped {
        updated_at: snapshot.updated_at,
        report: report(&snapshot),
    })
    .into_response()
}

async fn metrics_text(State(state): State<ServerState>) -> impl IntoResponse {
    match telemetry::encode(&state.registry) {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        ),
        Err(error) => {
            tracing::error!(%error, "could not encode metrics");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(header::CONTENT_TYPE, "text/plain")],
                error.to_string(),
            )
        }
    }
}

async fn readyz(State(state): State<ServerState>) -> impl IntoResponse {
    if state.health.is_ready(monotonic_ns()) {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: BPF programs not attached, no events flowing, or this node's pods not listed yet\n",
        )
    }
}
