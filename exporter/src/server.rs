//! HTTP endpoints: /metrics, /healthz, /readyz, and /debug/* (see
//! [`crate::debug`]).

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode, Uri, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};

use crate::{
    debug::{self, DebugSnapshot, DebugState},
    metrics::Metrics,
};

pub const METRICS_PATH: &str = "/metrics";
/// Liveness: 200 while the process runs.
pub const HEALTHZ_PATH: &str = "/healthz";
/// Readiness: see [`Readiness`].
pub const READYZ_PATH: &str = "/readyz";

/// A heartbeat older than this makes the agent unready.
const HEARTBEAT_STALE_NS: u64 = 10 * 1_000_000_000;

/// Whether the BPF programs are attached and their events reach userspace
/// and, in Kubernetes mode, whether this node's pods were listed once.
#[derive(Debug, Default)]
pub struct Readiness {
    attached: AtomicBool,
    last_heartbeat_ns: AtomicU64,
    sync_required: AtomicBool,
    synced: AtomicBool,
}

impl Readiness {
    /// Kubernetes mode: not ready before the first complete pod list.
    pub fn require_sync(&self) {
        self.sync_required.store(true, Ordering::SeqCst);
    }

    pub fn set_synced(&self) {
        self.synced.store(true, Ordering::SeqCst);
    }

    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }

    pub fn set_attached(&self) {
        self.attached.store(true, Ordering::SeqCst);
    }

    /// The kernel's heartbeat event arrived at `timestamp_ns` (monotonic).
    pub fn heartbeat(&self, timestamp_ns: u64) {
        self.last_heartbeat_ns.store(timestamp_ns, Ordering::SeqCst);
    }

    pub fn is_ready(&self, now_ns: u64) -> bool {
        let last = self.last_heartbeat_ns.load(Ordering::SeqCst);
        self.attached.load(Ordering::SeqCst)
            && (!self.sync_required.load(Ordering::SeqCst) || self.synced.load(Ordering::SeqCst))
            && last > 0
            && now_ns.saturating_sub(last) < HEARTBEAT_STALE_NS
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

#[derive(Clone)]
pub struct ServerState {
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    /// `None`: the `/debug/*` endpoints are off.
    pub debug: Option<Arc<DebugState>>,
}

pub fn router(state: ServerState) -> Router {
    let router = Router::new()
        .route(METRICS_PATH, get(metrics))
        .route(HEALTHZ_PATH, get(|| async { "ok\n" }))
        .route(READYZ_PATH, get(readyz));
    let router = match &state.debug {
        Some(_) => router
            .route("/debug/routes", get(debug_routes))
            .route("/debug/pods", get(debug_pods))
            .route("/debug/connections", get(debug_connections)),
        None => router,
    };
    router.with_state(state)
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

fn debug_view<T: serde::Serialize>(
    state: &ServerState,
    uri: &Uri,
    headers: &HeaderMap,
    part: impl Fn(&DebugSnapshot) -> &T,
    page: impl Fn(&DebugSnapshot) -> maud::Markup,
) -> Response {
    let Some(debug) = &state.debug else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let snapshot = debug.latest();
    if wants_html(uri, headers) {
        return Html(page(&snapshot).into_string()).into_response();
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
        report: part(&snapshot),
    })
    .into_response()
}

async fn debug_routes(State(state): State<ServerState>, uri: Uri, headers: HeaderMap) -> Response {
    debug_view(&state, &uri, &headers, |s| &s.routes, debug::routes_html)
}

async fn debug_pods(State(state): State<ServerState>, uri: Uri, headers: HeaderMap) -> Response {
    debug_view(&state, &uri, &headers, |s| &s.pods, debug::pods_html)
}

async fn debug_connections(
    State(state): State<ServerState>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    debug_view(
        &state,
        &uri,
        &headers,
        |s| &s.connections,
        debug::connections_html,
    )
}

async fn metrics(State(state): State<ServerState>) -> impl IntoResponse {
    match state.metrics.encode() {
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
    if state.readiness.is_ready(monotonic_ns()) {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: BPF programs not attached, no events flowing, or this node's pods not listed yet\n",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_attached_and_heartbeat_is_fresh() {
        let readiness = Readiness::default();
        let now = 100 * 1_000_000_000;
        assert!(!readiness.is_ready(now));
        readiness.heartbeat(now - 1);
        assert!(!readiness.is_ready(now));
        readiness.set_attached();
        assert!(readiness.is_ready(now));
        assert!(!readiness.is_ready(now + HEARTBEAT_STALE_NS));
        readiness.require_sync();
        assert!(!readiness.is_ready(now));
        readiness.set_synced();
        assert!(readiness.is_ready(now));
    }
}
