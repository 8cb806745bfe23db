//! `/debug/routes`, `/debug/pods` and `/debug/connections`: which routes
//! the agent captured and why it named them so, who it thinks served them,
//! and what it is following. The pipeline publishes a snapshot once a
//! second; the endpoints serve it as JSON, or as an HTML page to a browser
//! (`Accept: text/html`) or with `?format=html`.
//!
//! Nothing here comes from headers or bodies, and sample paths have their
//! query string removed (the routes stage keeps them so) and are
//! length-capped. The reports are built in `reports.rs` and rendered for
//! people in `html.rs`.

mod html;
mod reports;

pub use self::html::{connections_html, pods_html, routes_html};
use self::reports::unix_seconds;
pub use self::reports::{
    ConnectionsReport, PodRow, PodsReport, ProcessRow, RouteReport, RoutesReport, ServerRow,
    SourceRulesReport, WorkloadReport,
};

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};

/// How an HTML page is shown: `?sort=requests|errors|p99&refresh=SECONDS`.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(default)]
pub struct PageOptions {
    pub sort: RouteOrder,
    /// Seconds between reloads; 0: never.
    pub refresh: u32,
}

impl Default for PageOptions {
    fn default() -> Self {
        PageOptions {
            sort: RouteOrder::Requests,
            refresh: 5,
        }
    }
}

/// The order of `/debug/routes`' rows, largest first.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RouteOrder {
    #[default]
    Requests,
    Errors,
    P99,
}

impl RouteOrder {
    fn name(self) -> &'static str {
        match self {
            RouteOrder::Requests => "requests",
            RouteOrder::Errors => "errors",
            RouteOrder::P99 => "p99",
        }
    }

    /// `routes` ordered largest first (ties by path).
    fn sorted(self, routes: &[RouteReport]) -> Vec<&RouteReport> {
        let mut sorted: Vec<&RouteReport> = routes.iter().collect();
        sorted.sort_by(|a, b| {
            let order = match self {
                RouteOrder::Requests => b.requests.cmp(&a.requests),
                RouteOrder::Errors => b.errors.cmp(&a.errors),
                RouteOrder::P99 => b
                    .p99_seconds
                    .unwrap_or(0.0)
                    .total_cmp(&a.p99_seconds.unwrap_or(0.0)),
            };
            order.then_with(|| a.path.cmp(&b.path))
        });
        sorted
    }
}

/// What the endpoints serve.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DebugSnapshot {
    pub updated_at: f64,
    pub routes: RoutesReport,
    pub pods: PodsReport,
    pub connections: ConnectionsReport,
}

/// The latest snapshot, shared by the pipeline (writer) and the endpoints.
#[derive(Debug, Default)]
pub struct DebugState {
    snapshot: Mutex<Arc<DebugSnapshot>>,
}

impl DebugState {
    pub fn publish(&self, mut snapshot: DebugSnapshot) {
        snapshot.updated_at = unix_seconds(SystemTime::now());
        *self.snapshot.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(snapshot);
    }

    pub fn latest(&self) -> Arc<DebugSnapshot> {
        self.snapshot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}
