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
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use exporter_common::{EventKind, HEARTBEAT_FD};
use prometheus::{IntCounter, Registry};

use crate::{
    capture::{Capture, RawEvent},
    config::StageSettings,
    debug::{ConnectionsReport, DebugSnapshot, DebugState, PodsReport, RoutesReport},
    exchange::{AttributedExchange, CapturedExchange, Identity, targets},
    health::{Health, monotonic_ns},
    identity::{
        IdentityStage,
        attribution::{self, Attribution, AttributionCounters, HoldLimits},
    },
    metrics::RequestMetrics,
    procfs,
    routes::{
        RouteCounters, RouteLabeler, RouteOptions,
        discovery::{
            Discovery, ParseBudget, RouteDiscovery,
            helper::HelperProgram,
            rules::SourceRules,
            worker::{DiscoveryCounters, DiscoveryWorker, Outcome},
        },
    },
    rules::regexes::SharedBudgets,
    stream::{ConnectionTable, Handled, StreamCounters},
    telemetry::{Budget, Budgets},
};

/// How often the ring buffer is drained while events come: the kernel wakes
/// the reader only when the ring fills up, so this bounds how stale metrics
/// are and how soon the kernel hears what to filter or skip.
const POLL_TIMEOUT: Duration = Duration::from_millis(10);
/// How long to wait after a turn that found no event: each wakeup costs
/// this VM ≈ 90 µs of CPU, so an idle agent waking 100 times a second used
/// ≈ 1 % of a core; the first event after a quiet spell waits this long.
const IDLE_POLL_TIMEOUT: Duration = Duration::from_millis(100);
const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
const UPKEEP_EVERY: Duration = Duration::from_secs(1);
const REAP_EVERY: Duration = Duration::from_secs(5);
/// Most events handled in one turn of the loop, and longest turn: under a
/// sustained flood the loop still turns, so heartbeats, upkeep and liveness
/// go on, even when the agent's CPU is throttled (a limit, a busy node).
const MAX_EVENTS_PER_TURN: usize = 16_384;
const MAX_TURN: Duration = Duration::from_millis(50);
/// Events between two looks at the clock within a turn.
const EVENTS_PER_CLOCK_CHECK: usize = 256;
/// Requests held while their pod is looked up, at most: about 10 s of a
/// busy node's traffic; beyond it they are exported as unknown at once.
const MAX_HELD_REQUESTS: usize = 100_000;
/// How long a workload's first exchanges wait for its rules to be read
/// from its source (the harvest's own time budget), and how many may wait.
const SOURCE_RULES_WAIT: Duration = Duration::from_secs(2);
const MAX_HELD_FOR_SOURCE_RULES: usize = 10_000;
const MAX_HELD_FOR_SOURCE_RULES_BYTES: usize = 8 * 1024 * 1024;
/// Bytes of method and target held while pods are looked up, at most.
const MAX_HELD_REQUEST_BYTES: usize = 32 * 1024 * 1024;

pub struct Pipeline {
    pub capture: Capture,
    pub stages: Stages,
    pub health: Arc<Health>,
    /// Where `/debug/*` snapshots go; `None` when the endpoints are off.
    pub debug: Option<Arc<DebugState>>,
    /// [`IdentityStage::selections`] when last seen.
    pub selections_seen: u64,
}

/// The stages after capture, which take decoded events: the part of the
/// pipeline that needs no kernel (the replay benchmark drives it alone).
pub struct Stages {
    pub table: ConnectionTable,
    pub identity: IdentityStage,
    /// Whether connections keep their server's port: only OpenTelemetry's
    /// names have a `server_port` label.
    pub server_port_label: bool,
    pub attribution: Attribution,
    /// How long a deleted or relabelled pod's series stay.
    pub deleted_pod_grace: Duration,
    pub labeler: RouteLabeler,
    /// Reads apps' rules from their source (`None`: `--route-discovery off`).
    pub discovery: Option<DiscoveryWorker>,
    /// Exchanges waiting for their workload's rules from its source.
    pub held_for_source_rules: HeldForSourceRules,
    pub metrics: RequestMetrics,
}

/// Asks the kernel side for a heartbeat event: it watches for the exporter
/// closing this impossible fd.
fn request_heartbeat() {
    // SAFETY: closing an fd no process can hold only returns EBADF.
    unsafe { libc::close(HEARTBEAT_FD as i32) };
}

/// Exchanges waiting for their workload's rules from its source, within a
/// budget of entries and bytes of what clients chose (targets); past it an
/// exchange is named at once (by learned templates while the rules are not
/// in), counted.
#[derive(Debug)]
pub struct HeldForSourceRules {
    queue: VecDeque<AttributedExchange>,
    bytes: usize,
    max: usize,
    max_bytes: usize,
    budget: IntCounter,
}

impl HeldForSourceRules {
    fn new(max: usize, max_bytes: usize, budget: IntCounter) -> Self {
        HeldForSourceRules {
            queue: VecDeque::new(),
            bytes: 0,
            max,
            max_bytes,
            budget,
        }
    }

    /// Holds `attributed`, or gives it back past the budget.
    fn hold(&mut self, attributed: AttributedExchange) -> Option<AttributedExchange> {
        let size = attributed.exchange.held_bytes();
        if self.queue.len() >= self.max || self.bytes + size > self.max_bytes {
            self.budget.inc();
            return Some(attributed);
        }
        self.bytes += size;
        self.queue.push_back(attributed);
        None
    }

    /// Every exchange held, oldest first; none is held after.
    fn take(&mut self) -> VecDeque<AttributedExchange> {
        self.bytes = 0;
        std::mem::take(&mut self.queue)
    }

    /// The exchanges held for these identities, oldest first; the others
    /// stay held.
    fn take_of(&mut self, identities: &[Arc<Identity>]) -> Vec<AttributedExchange> {
        let (theirs, others): (VecDeque<_>, VecDeque<_>) = self
            .take()
            .into_iter()
            .partition(|held| identities.contains(&held.identity));
        self.bytes = others.iter().map(|held| held.exchange.held_bytes()).sum();
        self.queue = others;
        theirs.into()
    }
}

/// What a turn left in the ring buffer.
enum Drained {
    /// Nothing came.
    None,
    /// Events came, and none wait.
    Some,
    /// Events may wait: the turn's budget ran out.
    More,
}

/// Exchanges between stages, kept to reuse their buffers.
#[derive(Default)]
pub struct HandOffs {
    pub captured: Vec<CapturedExchange>,
    pub attributed: Vec<AttributedExchange>,
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
            let drained = self.drain_events(&mut hand_offs.captured);
            self.capture.settle_server_scans();
            match drained {
                Drained::More => {}
                Drained::Some => self.capture.wait(POLL_TIMEOUT),
                Drained::None => self.capture.wait(IDLE_POLL_TIMEOUT),
            }
            let upkeep = last_upkeep.elapsed() >= UPKEEP_EVERY;
            if upkeep && last_reap.elapsed() >= REAP_EVERY {
                last_reap = Instant::now();
                // Exchanges ended by the reap are recorded with the rest.
                let capture = &self.capture;
                self.stages.table.reap(
                    monotonic_ns(),
                    &procfs::is_running,
                    &|tgid, fd, conn_id| capture.follows(tgid, fd, conn_id),
                    &mut hand_offs.captured,
                );
                self.stages.identity.forget_exited(&procfs::runs);
                self.capture
                    .forget_exited(&procfs::is_running, &procfs::runs);
            }
            self.stages.record(&mut hand_offs);
            if upkeep {
                last_upkeep = Instant::now();
                self.upkeep();
            }
        }
    }

    /// capture → stream: waiting events, to their connections, at most
    /// [`MAX_EVENTS_PER_TURN`] or for [`MAX_TURN`].
    fn drain_events(&mut self, captured: &mut Vec<CapturedExchange>) -> Drained {
        let started = Instant::now();
        for handled in 0..MAX_EVENTS_PER_TURN {
            if handled % EVENTS_PER_CLOCK_CHECK == EVENTS_PER_CLOCK_CHECK - 1
                && started.elapsed() >= MAX_TURN
            {
                return Drained::More;
            }
            let Some(item) = self.capture.next_event() else {
                return if handled == 0 {
                    Drained::None
                } else {
                    Drained::Some
                };
            };
            let Some(event) = item.event() else {
                continue;
            };
            if event.kind == EventKind::Heartbeat {
                self.health.heartbeat(event.header.timestamp_ns);
                continue;
            }
            if event.kind == EventKind::ProcessExit {
                let tgid = event.header.tgid;
                drop(item);
                self.forget_process(tgid);
                continue;
            }
            self.stages.handle(&event, captured);
            drop(item);
            // What the connections showed: what the kernel need not follow.
            for filter in self.stages.table.take_kernel_filters() {
                self.capture.apply(filter);
            }
        }
        Drained::More
    }

    /// A server's main thread exited: what is kept by its pid goes now, not
    /// at the next reap, so that a process reusing the pid is never taken
    /// for it (its connections end at the reap, or at the kernel's sight
    /// of a new connection on their descriptors).
    fn forget_process(&mut self, tgid: u32) {
        let other = |process: u32, _start: u64| process != tgid;
        self.stages.identity.forget_exited(&other);
        self.capture.forget_verdicts_of(tgid);
    }

    /// Once a second: identities gone past their grace period leave the
    /// metrics and routes; the kernel's loss count; the debug snapshot.
    fn upkeep(&mut self) {
        let stages = &mut self.stages;
        stages.release_gone(Instant::now());
        // A pod became selected: listeners judged not monitored are
        // followed again, to be judged anew.
        let selections = stages.identity.selections();
        if selections != self.selections_seen {
            self.selections_seen = selections;
            self.capture.follow_unmonitored_again();
        }
        self.capture.sync_kernel_counters();
        let in_flight = attribution::by_identity(
            stages.identity.pod_index(),
            stages.table.requests_in_flight(),
        );
        stages
            .metrics
            .set_saturation(&in_flight, &procfs::is_running, &procfs::Network);
        if let Some(debug) = &self.debug {
            debug.publish(DebugSnapshot {
                routes: RoutesReport::new(stages.labeler.snapshot()),
                pods: PodsReport {
                    load: stages.metrics.server_loads(),
                    ..PodsReport::new(&stages.identity, Instant::now())
                },
                connections: ConnectionsReport::new(&stages.table, &stages.attribution),
                ..DebugSnapshot::default()
            });
        }
    }
}

impl Stages {
    /// Every stage after capture, each registering its own counters in
    /// `registry`.
    pub fn new(
        settings: StageSettings,
        identity: IdentityStage,
        registry: &Registry,
        budgets: &Budgets,
    ) -> Result<Self, prometheus::Error> {
        let StageSettings {
            series,
            routes,
            pod_wait,
            deleted_pod_grace,
        } = settings;
        let server_port_label = series.names.otel();
        let unknown = identity.unknown();
        let discovery = match routes.discovery {
            RouteDiscovery::Source => match DiscoveryWorker::start(
                HelperProgram::default(),
                ParseBudget::default(),
                DiscoveryCounters::register(registry, budgets)?,
            ) {
                Ok(worker) => Some(worker),
                Err(error) => {
                    tracing::warn!(%error, "could not start route discovery: rules come from flags and learning");
                    None
                }
            },
            RouteDiscovery::Off => None,
        };
        Ok(Stages {
            table: ConnectionTable::new(StreamCounters::register(registry, budgets)?),
            metrics: RequestMetrics::register(registry, identity.label_names(), budgets, series)?,
            identity,
            server_port_label,
            attribution: Attribution::new(
                HoldLimits {
                    wait: pod_wait,
                    max_held: MAX_HELD_REQUESTS,
                    max_held_bytes: MAX_HELD_REQUEST_BYTES,
                },
                unknown,
                AttributionCounters::register(registry, budgets)?,
            ),
            deleted_pod_grace,
            labeler: RouteLabeler::new(
                RouteOptions {
                    discovery: discovery.is_some(),
                    mode: routes.path_label,
                    excluded_paths: routes.excluded_paths,
                    max_paths_per_workload: routes.max_paths_per_workload,
                    segment_cap: routes.segment_cap,
                    user_rules: Arc::new(routes.user_rules),
                },
                RouteCounters::register(registry, budgets)?,
            ),
            discovery,
            held_for_source_rules: HeldForSourceRules::new(
                MAX_HELD_FOR_SOURCE_RULES,
                MAX_HELD_FOR_SOURCE_RULES_BYTES,
                budgets.counter(Budget::SourceRulesWait),
            ),
        })
    }

    /// stream (+ identity for a new connection): one event to its
    /// connection; finished exchanges are appended to `captured`.
    pub fn handle(&mut self, event: &RawEvent<'_>, captured: &mut Vec<CapturedExchange>) {
        if let Handled::NewConnection(origin) = self.table.handle(event, captured) {
            let served_by = self.identity.resolve(&origin);
            let cgroup_unmonitored =
                served_by.is_none() && self.identity.cgroup_selected_out(origin.tgid);
            let server_port = origin.port.filter(|_| self.server_port_label);
            self.table.open(event, served_by, server_port, captured);
            if cgroup_unmonitored {
                self.table.ignore_cgroup(event);
            }
        }
    }

    /// attribution → routes → metrics, for the exchanges in `captured`
    /// (some may wait in attribution for their pod).
    pub fn record(&mut self, hand_offs: &mut HandOffs) {
        if self.identity.settle() {
            self.attribution.retry_held();
            self.table.settle_forgotten_handshakes();
        }
        // Requests read that will make no exchange count against their
        // server's completeness at once.
        for (served_by, lost) in self.table.take_losses() {
            if let Some(identity) = self
                .attribution
                .identity_now(self.identity.pod_index(), &served_by)
            {
                self.metrics.record_lost(&identity, lost);
            }
        }
        self.attribution.attribute(
            self.identity.pod_index(),
            &mut hand_offs.captured,
            Instant::now(),
            &mut hand_offs.attributed,
        );
        for attributed in hand_offs.attributed.drain(..) {
            let attributed = if self
                .labeler
                .waits_for_source_rules(&attributed, SOURCE_RULES_WAIT)
            {
                match self.held_for_source_rules.hold(attributed) {
                    None => continue,
                    Some(not_held) => not_held,
                }
            } else {
                attributed
            };
            self.label_and_observe(attributed);
        }
        // Routes a learned parameter replaced: their series go, their
        // requests now count under the template.
        for (workload, path) in self.labeler.take_retired() {
            self.metrics.retire_route(&workload, &path);
        }
        if let Some(discovery) = &self.discovery {
            for (workload, tgid) in self.labeler.take_discovery_wanted() {
                discovery.ask(workload, tgid);
            }
            for (workload, outcome) in discovery.finished() {
                let rules = match outcome {
                    Outcome::Harvested(rules) => Some(rules),
                    Outcome::Unchanged => None,
                    // No rules: the workload's routes are learned. The
                    // reason shows on /debug/routes.
                    Outcome::Failed(reason) => Some(Arc::new(SourceRules::new(
                        Discovery {
                            unresolved: vec![reason],
                            ..Discovery::default()
                        },
                        SharedBudgets::default(),
                    ))),
                };
                self.labeler.source_rules_answered(&workload, rules);
            }
        }
        // In order: an exchange waits while an earlier one of its workload does.
        for attributed in self.held_for_source_rules.take() {
            let still_waits = self
                .labeler
                .waits_for_source_rules(&attributed, SOURCE_RULES_WAIT);
            if !still_waits {
                self.label_and_observe(attributed);
            } else if let Some(not_held) = self.held_for_source_rules.hold(attributed) {
                self.label_and_observe(not_held);
            }
        }
    }

    /// Identities gone past their grace period (deleted or relabelled
    /// pods) leave the metrics and the routes.
    pub fn release_gone(&mut self, now: Instant) {
        let released = self.identity.purge(now, self.deleted_pod_grace);
        // Exchanges of theirs still waiting for source rules are counted
        // now: afterwards they would make series no one removes.
        for held in self.held_for_source_rules.take_of(&released) {
            self.label_and_observe(held);
        }
        for identity in released {
            self.metrics.release(&identity);
            self.labeler.forget(&identity);
        }
    }

    /// routes → metrics for one exchange.
    fn label_and_observe(&mut self, attributed: AttributedExchange) {
        // None: an excluded path, not counted.
        if let Some(route) = self.labeler.route(&attributed) {
            self.metrics.observe(&attributed, &route);
        }
        targets::give_back(attributed.exchange.target);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::{Exchange, Identity, IdentityLabels};

    fn held(target: &str) -> AttributedExchange {
        AttributedExchange {
            identity: Arc::new(Identity::new(IdentityLabels::Server {
                process: "gunicorn".to_owned(),
                port: "8000".to_owned(),
            })),
            rules: None,
            tgid: 1,
            exchange: Exchange::sample("GET", target, 200, 1e-9),
        }
    }

    #[test]
    fn exchanges_held_for_source_rules_stay_within_their_budget() {
        let registry = Registry::new();
        let budgets = Budgets::register(&registry).expect("budgets");
        let budget = budgets.counter(Budget::SourceRulesWait);
        // Two entries, 20 bytes of method and target ("GET" + target).
        let mut holding = HeldForSourceRules::new(2, 20, budget.clone());
        assert!(holding.hold(held("/a")).is_none());
        // A long target past the bytes: given back, counted.
        let long = "/".repeat(30);
        let given_back = holding.hold(held(&long)).expect("over the bytes");
        assert_eq!(given_back.exchange.target, long);
        assert!(holding.hold(held("/b")).is_none());
        // Past the entries.
        assert!(holding.hold(held("/c")).is_some());
        assert_eq!(budget.get(), 2);
        let targets: Vec<String> = holding
            .take()
            .into_iter()
            .map(|a| a.exchange.target)
            .collect();
        assert_eq!(targets, ["/a", "/b"], "oldest first");
        // Taken: room again.
        assert!(holding.hold(held("/c")).is_none());
        assert_eq!(budget.get(), 2);
    }

    /// A released identity's held exchanges leave the queue (to be counted
    /// before its series go); the others stay, their bytes with them.
    #[test]
    fn exchanges_of_released_identities_are_taken_from_the_hold() {
        let registry = Registry::new();
        let budgets = Budgets::register(&registry).expect("budgets");
        let mut holding = HeldForSourceRules::new(10, 20, budgets.counter(Budget::SourceRulesWait));
        let mut other = held("/b");
        other.identity = Arc::new(Identity::new(IdentityLabels::Server {
            process: "gunicorn".to_owned(),
            port: "9000".to_owned(),
        }));
        let released = held("/a").identity;
        assert!(holding.hold(held("/a")).is_none());
        assert!(holding.hold(other).is_none());
        assert!(holding.hold(held("/c")).is_none());
        let taken: Vec<String> = holding
            .take_of(std::slice::from_ref(&released))
            .into_iter()
            .map(|a| a.exchange.target)
            .collect();
        assert_eq!(taken, ["/a", "/c"]);
        assert_eq!(holding.bytes, 5, "GET /b is left");
        let left: Vec<String> = holding
            .take()
            .into_iter()
            .map(|a| a.exchange.target)
            .collect();
        assert_eq!(left, ["/b"]);
    }
}
