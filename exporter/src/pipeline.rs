//! The agent's event loop, on its own thread. Each stage takes data and
//! returns data; this loop hands one stage's output to the next:
//!
//! ```text
//! capture → stream (+ identity.resolve for a new connection) → CapturedExchange
//!         → attribution → AttributedExchange → routes → Route → metrics
//!           stream → KernelFilter (what is not HTTP or not monitored) → capture
//! ```
//!
//! Once a second it also retires what the stages dropped (routes a learned
//! parameter replaced, identities of deleted or relabelled pods) from the
//! metrics, and publishes the `/debug/*` snapshot.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use exporter_common::{EventKind, HEARTBEAT_FD};

use crate::{
    capture::Capture,
    debug::{ConnectionsReport, DebugSnapshot, DebugState, PodsReport, RoutesReport},
    exchange::{AttributedExchange, CapturedExchange},
    health::{Health, monotonic_ns},
    identity::{IdentityStage, attribution::Attribution},
    metrics::RequestMetrics,
    procfs,
    routes::RouteLabeler,
    stream::{ConnectionTable, Handled},
};

/// How often the ring buffer is drained: the kernel wakes the reader only
/// when the ring fills up, so this bounds how stale metrics can be.
const POLL_TIMEOUT: Duration = Duration::from_millis(10);
const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
const UPKEEP_EVERY: Duration = Duration::from_secs(1);
const REAP_EVERY: Duration = Duration::from_secs(5);
/// Most events handled in one turn of the loop: under a sustained flood the
/// loop still turns, so heartbeats, upkeep and liveness go on.
const MAX_EVENTS_PER_TURN: usize = 16_384;

pub struct Pipeline {
    pub capture: Capture,
    pub table: ConnectionTable,
    pub identity: IdentityStage,
    pub attribution: Attribution,
    /// How long a deleted or relabelled pod's series stay.
    pub deleted_pod_grace: Duration,
    pub labeler: RouteLabeler,
    pub metrics: RequestMetrics,
    pub health: Arc<Health>,
    /// Where `/debug/*` snapshots go; `None` when the endpoints are off.
    pub debug: Option<Arc<DebugState>>,
}

/// Asks the kernel side for a heartbeat event: it watches for the exporter
/// closing this impossible fd.
fn request_heartbeat() {
    // SAFETY: closing an fd no process can hold only returns EBADF.
    unsafe { libc::close(HEARTBEAT_FD as i32) };
}

/// Exchanges between stages, kept to reuse their buffers.
#[derive(Default)]
struct HandOffs {
    captured: Vec<CapturedExchange>,
    attributed: Vec<AttributedExchange>,
}

impl Pipeline {
    pub fn run(mut self, shutdown: Arc<AtomicBool>) {
        self.health.set_attached(monotonic_ns());
        let mut hand_offs = HandOffs::default();
        let mut last_heartbeat: Option<Instant> = None;
        let mut last_upkeep = Instant::now();
        let mut last_reap = Instant::now();
        while !shutdown.load(Ordering::SeqCst) {
            self.health.pipeline_turned(monotonic_ns());
            if last_heartbeat.is_none_or(|at| at.elapsed() >= HEARTBEAT_EVERY) {
                request_heartbeat();
                last_heartbeat = Some(Instant::now());
            }
            if !self.drain_events(&mut hand_offs.captured) {
                self.capture.wait(POLL_TIMEOUT);
            }
            let upkeep = last_upkeep.elapsed() >= UPKEEP_EVERY;
            if upkeep && last_reap.elapsed() >= REAP_EVERY {
                last_reap = Instant::now();
                // Exchanges ended by the reap are recorded with the rest.
                self.table
                    .reap(monotonic_ns(), &procfs::is_running, &mut hand_offs.captured);
                self.identity.forget_exited(&procfs::is_running);
                self.capture.forget_exited(&procfs::is_running);
            }
            self.record(&mut hand_offs);
            if upkeep {
                last_upkeep = Instant::now();
                self.upkeep();
            }
        }
    }

    /// capture → stream: waiting events, to their connections, at most
    /// [`MAX_EVENTS_PER_TURN`]; returns whether events are left waiting.
    fn drain_events(&mut self, captured: &mut Vec<CapturedExchange>) -> bool {
        for _ in 0..MAX_EVENTS_PER_TURN {
            let Some(item) = self.capture.next_event() else {
                return false;
            };
            let Some(event) = item.event() else {
                continue;
            };
            if event.kind == EventKind::Heartbeat {
                self.health.heartbeat(event.header.timestamp_ns);
                continue;
            }
            if let Handled::NewConnection(origin) = self.table.handle(&event, captured) {
                let served_by = self.identity.resolve(&origin);
                self.table.open(&event, served_by, captured);
            }
            drop(item);
            // What the connections showed: what the kernel need not follow.
            for filter in self.table.take_kernel_filters() {
                self.capture.apply(filter);
            }
        }
        true
    }

    /// attribution → routes → metrics, for the exchanges in `captured`
    /// (some may wait in attribution for their pod).
    fn record(&mut self, hand_offs: &mut HandOffs) {
        self.attribution.attribute(
            self.identity.pod_index(),
            &mut hand_offs.captured,
            Instant::now(),
            &mut hand_offs.attributed,
        );
        for attributed in hand_offs.attributed.drain(..) {
            let route = self.labeler.route(&attributed);
            self.metrics.observe(&attributed, &route);
        }
        // Routes a learned parameter replaced: their series go, their
        // requests now count under the template.
        for (workload, path) in self.labeler.take_retired() {
            self.metrics.retire_route(&workload, &path);
        }
    }

    /// Once a second: identities gone past their grace period leave the
    /// metrics and routes; the kernel's loss count; the debug snapshot.
    fn upkeep(&mut self) {
        for identity in self.identity.purge(Instant::now(), self.deleted_pod_grace) {
            self.metrics.release(&identity);
            self.labeler.forget(&identity);
        }
        self.capture.sync_kernel_counters();
        if let Some(debug) = &self.debug {
            debug.publish(DebugSnapshot {
                routes: RoutesReport::new(self.labeler.snapshot()),
                pods: PodsReport::new(&self.identity, Instant::now()),
                connections: ConnectionsReport::new(&self.table, &self.attribution),
                ..DebugSnapshot::default()
            });
        }
    }
}
