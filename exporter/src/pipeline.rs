//! The agent's event loop, on its own thread: reads the ring buffer and
//! drives each event through stream → http → routes/identity → metrics.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use exporter_common::{EventKind, HEARTBEAT_FD};
use tracing::warn;

use crate::{
    capture::{Capture, decode_event},
    debug::{ConnectionsReport, DebugSnapshot, DebugState, RoutesReport},
    identity::{Attribution, Identity, IdentityLabels},
    metrics::{Metrics, advance_to},
    routes::RouteLabeler,
    server::{Readiness, monotonic_ns},
    stream::{ConnectionTable, ServedExchange},
};

/// How often the ring buffer is drained: the kernel wakes the reader only
/// when the ring fills up, so this bounds how stale metrics can be.
const POLL_TIMEOUT: Duration = Duration::from_millis(10);
const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
const UPKEEP_EVERY: Duration = Duration::from_secs(1);
const REAP_EVERY: Duration = Duration::from_secs(5);

pub struct Pipeline {
    pub capture: Capture,
    pub table: ConnectionTable,
    pub identity: Identity,
    pub attribution: Attribution,
    /// How long a deleted pod's series stay.
    pub deleted_pod_grace: Duration,
    pub labeler: RouteLabeler,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    /// Where `/debug/*` snapshots go; `None` when the endpoints are off.
    pub debug: Option<Arc<DebugState>>,
}

/// Asks the kernel side for a heartbeat event: it watches for the exporter
/// closing this impossible fd.
fn request_heartbeat() {
    // SAFETY: closing an fd no process can hold only returns EBADF.
    unsafe { libc::close(HEARTBEAT_FD as i32) };
}

impl Pipeline {
    pub fn run(self, shutdown: Arc<AtomicBool>) {
        let Pipeline {
            mut capture,
            mut table,
            mut identity,
            mut attribution,
            deleted_pod_grace,
            mut labeler,
            metrics,
            readiness,
            debug,
        } = self;
        readiness.set_attached();
        let mut served: Vec<ServedExchange> = Vec::new();
        let mut last_heartbeat: Option<Instant> = None;
        let mut last_upkeep = Instant::now();
        let mut last_reap = Instant::now();
        let mut malformed_logged = false;

        while !shutdown.load(Ordering::SeqCst) {
            if last_heartbeat.is_none_or(|at| at.elapsed() >= HEARTBEAT_EVERY) {
                request_heartbeat();
                last_heartbeat = Some(Instant::now());
            }
            capture.poll(POLL_TIMEOUT, |bytes| {
                metrics.events_read.inc();
                match decode_event(bytes) {
                    Ok(event) if event.kind == EventKind::Heartbeat => {
                        readiness.heartbeat(event.header.timestamp_ns);
                    }
                    Ok(event) => {
                        table.handle(&event, &mut |origin| identity.resolve(origin), &mut served);
                    }
                    Err(error) => {
                        metrics.events_malformed.inc();
                        if !malformed_logged {
                            warn!(%error, "malformed event from the ring buffer (logged once; see flask_ebpf_exporter_events_malformed_total)");
                            malformed_logged = true;
                        }
                    }
                }
            });
            let upkeep = last_upkeep.elapsed() >= UPKEEP_EVERY;
            if upkeep && last_reap.elapsed() >= REAP_EVERY {
                last_reap = Instant::now();
                let alive = |tgid: u32| Path::new(&format!("/proc/{tgid}")).exists();
                // Exchanges ended by the reap are recorded with the rest below.
                table.reap(monotonic_ns(), &alive, &mut served);
                identity.forget_exited(&alive);
            }
            record(
                &mut served,
                &identity,
                &mut attribution,
                &mut labeler,
                &metrics,
            );

            if upkeep {
                last_upkeep = Instant::now();
                for labels in identity.purge_deleted(Instant::now(), deleted_pod_grace) {
                    metrics.remove_identity(&labels);
                    metrics.identities_removed.inc();
                    labeler.forget(&labels);
                }
                let lost = capture.lost_events();
                if lost > metrics.events_lost.get() {
                    warn!(
                        lost_total = lost,
                        "the kernel dropped events: ring buffer full (raise --ring-buffer-bytes)"
                    );
                }
                advance_to(&metrics.events_lost, lost);
                let stats = table.stats();
                advance_to(&metrics.unparsed_bytes, stats.http.unparsed_bytes);
                advance_to(&metrics.truncated_captures, stats.http.truncated_captures);
                advance_to(&metrics.unpaired_responses, stats.http.unpaired_responses);
                advance_to(&metrics.abandoned_requests, stats.http.abandoned_requests);
                advance_to(&metrics.sequence_gaps, stats.sequence_gaps);
                advance_to(&metrics.connections_opened, stats.connections_opened);
                advance_to(&metrics.path_overflow, labeler.overflowed());
                advance_to(&metrics.routes_retired, labeler.retired_total());
                metrics.connections_tracked.set(table.len() as i64);
                advance_to(
                    &metrics.unattributed_requests,
                    attribution.stats.unattributed,
                );
                advance_to(&metrics.excluded_requests, attribution.stats.excluded);
                metrics.requests_held.set(attribution.held() as i64);
                if let Some(debug) = &debug {
                    debug.publish(DebugSnapshot {
                        routes: RoutesReport::from_views(
                            identity.workload_label_names(),
                            labeler.snapshot(),
                        ),
                        pods: identity.report(),
                        connections: ConnectionsReport {
                            tracked: table.len(),
                            by_process: table.per_process(),
                            opened_total: stats.connections_opened,
                            sequence_gaps: stats.sequence_gaps,
                            unparsed_bytes: stats.http.unparsed_bytes,
                            truncated_captures: stats.http.truncated_captures,
                            unpaired_responses: stats.http.unpaired_responses,
                            abandoned_requests: stats.http.abandoned_requests,
                            requests_held: attribution.held(),
                        },
                        ..DebugSnapshot::default()
                    });
                }
            }
        }
    }
}

/// The stages after HTTP pairing: identity, then route, then metrics.
/// Labels and counts the exchanges in `served`, leaving it empty (some may
/// wait in `attribution` for their pod).
fn record(
    served: &mut Vec<ServedExchange>,
    identity: &Identity,
    attribution: &mut Attribution,
    labeler: &mut RouteLabeler,
    metrics: &Metrics,
) {
    attribution.attribute(
        identity,
        served,
        Instant::now(),
        &mut |labels, rules, exchange| {
            let workload = || identity.workload_key(labels);
            let path = labeler.label(labels, &workload, rules, exchange);
            metrics.observe(
                &exchange.method,
                &path,
                exchange.status,
                labels,
                exchange.duration_seconds(),
            );
        },
    );
    // Routes a learned parameter replaced: their series go, their requests
    // now count under the template.
    for (workload, path) in labeler.take_retired() {
        metrics.remove_route(&path, &|labels| {
            *identity.workload_key(&IdentityLabels::from(labels.to_vec())) == *workload
        });
    }
}
