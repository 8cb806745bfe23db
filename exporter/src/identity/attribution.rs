//! Gives each captured exchange the identity that served it. In Kubernetes
//! mode a pod may become known only after its first requests, so exchanges
//! of an unknown pod are held (bounded in time and number) and retried when
//! the pod index changes; after that they count as `<unknown>`. Local
//! mode's servers are looked up off the pipeline thread, and their first
//! exchanges are held the same way. Nothing is dropped but the traffic of
//! pods or servers selected out.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use prometheus::{IntCounter, IntGauge, Registry};
use tracing::warn;

use super::pods::{Lookup, PodIndex, SharedPodIndex, lock_index};
use crate::{
    exchange::{AttributedExchange, CapturedExchange, Identity, IdentityLabels, ServedBy},
    rules::flask::RuleSet,
    telemetry::{Budget, Budgets, counter, gauge},
};

/// Limits on traffic held while its pod is looked up.
#[derive(Clone, Copy, Debug)]
pub struct HoldLimits {
    /// How long an exchange waits for its pod before it is exported under
    /// the unknown identity.
    pub wait: Duration,
    /// Most exchanges held at once; beyond it they are exported as unknown
    /// at once.
    pub max_held: usize,
    /// Most bytes of method and target held at once, likewise.
    pub max_held_bytes: usize,
}

/// What the attribution stage counts. It owns these counters: `/metrics`
/// and `/debug/connections` read them as they are.
#[derive(Clone, Debug)]
pub struct AttributionCounters {
    /// Exported under the unknown identity.
    pub unattributed: IntCounter,
    /// Dropped on purpose: their pod is selected out.
    pub excluded: IntCounter,
    pub held: IntGauge,
    /// Exchanges exported as unknown at once because the held bytes were
    /// at their bound.
    pub held_bytes_budget: IntCounter,
}

impl AttributionCounters {
    pub fn register(registry: &Registry, budgets: &Budgets) -> Result<Self, prometheus::Error> {
        Ok(AttributionCounters {
            held_bytes_budget: budgets.counter(Budget::HeldRequestBytes),
            unattributed: counter(
                registry,
                "flask_ebpf_exporter_unattributed_requests_total",
                "Requests exported with identity \"<unknown>\": their pod was not known in time",
            )?,
            excluded: counter(
                registry,
                "flask_ebpf_exporter_excluded_requests_total",
                "Requests captured before their server was found to be left out: a pod selected \
                 out by annotation or namespace filter, or in local mode a server --pid or \
                 --command leaves out, on its first connection while it is looked up",
            )?,
            held: gauge(
                registry,
                "flask_ebpf_exporter_requests_held",
                "Requests waiting for their pod to become known",
            )?,
        })
    }
}

/// Gives exchanges their identity, holding those whose pod is not known yet.
#[derive(Debug)]
pub struct Attribution {
    limits: HoldLimits,
    held: VecDeque<(Instant, CapturedExchange)>,
    /// Bytes of method and target in `held`.
    held_bytes: usize,
    /// Index generation the held exchanges were last tried against.
    tried_generation: u64,
    /// Held exchanges are tried again at the next turn: answers came in
    /// that are no pod index's.
    retry: bool,
    /// Whom requests are exported as when their server is not known in
    /// time (the mode's and grain's unknown labels).
    unknown: Arc<Identity>,
    counters: AttributionCounters,
}

impl Attribution {
    pub fn new(limits: HoldLimits, unknown: IdentityLabels, counters: AttributionCounters) -> Self {
        Attribution {
            limits,
            held: VecDeque::new(),
            held_bytes: 0,
            tried_generation: 0,
            retry: false,
            unknown: Arc::new(Identity::new(unknown)),
            counters,
        }
    }

    /// Held exchanges are tried again at the next [`Self::attribute`]
    /// (local servers were found).
    pub fn retry_held(&mut self) {
        self.retry = true;
    }

    pub fn counters(&self) -> &AttributionCounters {
        &self.counters
    }

    /// The identity a connection's server has now, without waiting: a pod
    /// the index does not know yet is the unknown identity, one selected
    /// out is none.
    pub fn identity_now(
        &self,
        index: Option<&SharedPodIndex>,
        served_by: &ServedBy,
    ) -> Option<Arc<Identity>> {
        let mut index = index.map(lock_index);
        match lookup_now(index.as_deref_mut(), served_by, true) {
            Some(Lookup::Known(identity)) => Some(identity),
            Some(Lookup::Pending) | None => Some(self.unknown.clone()),
            Some(Lookup::Excluded) => None,
        }
    }

    /// Attributes the exchanges in `captured` (leaving it empty) and the
    /// held ones that are now due or resolvable, in order, into `out`; the
    /// rest wait. `index`: the node's pods (Kubernetes mode).
    pub fn attribute(
        &mut self,
        index: Option<&SharedPodIndex>,
        captured: &mut Vec<CapturedExchange>,
        now: Instant,
        out: &mut Vec<AttributedExchange>,
    ) {
        if captured.is_empty() && self.held.is_empty() {
            return;
        }
        let mut index = index.map(lock_index);
        // Held exchanges first: they came before the new ones.
        let generation = index.as_ref().map_or(0, |index| index.generation());
        let due = self
            .held
            .front()
            .is_some_and(|(deadline, _)| *deadline <= now);
        if !self.held.is_empty() && (due || self.retry || generation != self.tried_generation) {
            self.tried_generation = generation;
            self.retry = false;
            self.held_bytes = 0;
            for (deadline, exchange) in std::mem::take(&mut self.held) {
                self.place(index.as_deref_mut(), exchange, deadline, now, out);
            }
        }
        for exchange in captured.drain(..) {
            let deadline = now + self.limits.wait;
            self.place(index.as_deref_mut(), exchange, deadline, now, out);
        }
        self.counters.held.set(self.held.len() as i64);
    }

    fn place(
        &mut self,
        mut index: Option<&mut PodIndex>,
        captured: CapturedExchange,
        deadline: Instant,
        now: Instant,
        out: &mut Vec<AttributedExchange>,
    ) {
        if let ServedBy::Server(identity) = &captured.served_by {
            let identity = identity.clone();
            return out.push(attributed(identity, None, captured));
        }
        let size = held_size(&captured);
        let no_room_left = self.held_bytes + size > self.limits.max_held_bytes;
        let give_up = deadline <= now || self.held.len() >= self.limits.max_held || no_room_left;
        let Some(lookup) = lookup_now(index.as_deref_mut(), &captured.served_by, give_up) else {
            self.counters.unattributed.inc();
            return out.push(attributed(self.unknown.clone(), None, captured));
        };
        match lookup {
            Lookup::Known(identity) => {
                let rules = index.and_then(|index| index.workload_rules(&identity.workload));
                out.push(attributed(identity, rules, captured));
            }
            Lookup::Excluded => self.counters.excluded.inc(),
            Lookup::Pending if give_up => {
                if no_room_left && deadline > now {
                    self.counters.held_bytes_budget.inc();
                }
                if self.counters.unattributed.get() == 0 {
                    warn_unknown(&captured.served_by);
                }
                self.counters.unattributed.inc();
                out.push(attributed(self.unknown.clone(), None, captured));
            }
            Lookup::Pending => {
                self.held_bytes += size;
                self.held.push_back((deadline, captured));
            }
        }
    }
}

/// Sums `counts` by the identity each connection's server has now (pods the
/// index does not know yet, or selected out, are left out).
pub fn by_identity<'a>(
    index: Option<&SharedPodIndex>,
    counts: impl Iterator<Item = (&'a ServedBy, usize)>,
) -> HashMap<Arc<Identity>, i64> {
    let mut index = index.map(lock_index);
    let mut sums: HashMap<Arc<Identity>, i64> = HashMap::new();
    for (served_by, count) in counts {
        if let Some(Lookup::Known(identity)) = lookup_now(index.as_deref_mut(), served_by, false) {
            *sums.entry(identity).or_default() += count as i64;
        }
    }
    sums
}

/// Whom a connection's server is now: a local server is known once found,
/// a container's pod is looked up (`give_up`: see [`PodIndex::lookup`]);
/// `None` without an index to look it up in.
fn lookup_now(index: Option<&mut PodIndex>, served_by: &ServedBy, give_up: bool) -> Option<Lookup> {
    match served_by {
        ServedBy::Server(identity) => Some(Lookup::Known(identity.clone())),
        ServedBy::PendingServer(slot) => Some(match slot.get() {
            Some(Some(identity)) => Lookup::Known(identity.clone()),
            Some(None) => Lookup::Excluded,
            None => Lookup::Pending,
        }),
        ServedBy::Container(container) => Some(index?.lookup(container, give_up)),
    }
}

/// Says once, at the first exchange exported as unknown, why.
fn warn_unknown(served_by: &ServedBy) {
    match served_by {
        ServedBy::Container(container) => warn!(
            pod_uid = %container.pod_uid, container_id = ?container.container_id,
            "traffic of a pod this node's watch does not know: exported with identity labels \"<unknown>\" (logged once; see flask_ebpf_exporter_unattributed_requests_total)"
        ),
        ServedBy::Server(_) | ServedBy::PendingServer(_) => warn!(
            "traffic of a server not found in /proc in time: exported with identity labels \"<unknown>\" (logged once; see flask_ebpf_exporter_unattributed_requests_total)"
        ),
    }
}

/// What holding an exchange costs, in bytes of what a client chose.
fn held_size(captured: &CapturedExchange) -> usize {
    captured.exchange.held_bytes()
}

fn attributed(
    identity: Arc<Identity>,
    rules: Option<Arc<RuleSet>>,
    captured: CapturedExchange,
) -> AttributedExchange {
    AttributedExchange {
        identity,
        rules,
        tgid: captured.tgid,
        exchange: captured.exchange,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        exchange::{ContainerRef, Exchange, PodGrain, PodUid, UNKNOWN, WorkloadKey},
        identity::pods::{PodInfo, Workload, parse_routes_annotation},
    };

    const UID: &str = "11111111-2222-3333-4444-555555555555";
    const ID: &str = "abcdefabcdefabcdef";

    fn captured(target: &str) -> CapturedExchange {
        CapturedExchange {
            served_by: ServedBy::Container(Arc::new(ContainerRef {
                pod_uid: PodUid::parse(UID).expect("uid"),
                container_id: Some(ID.to_owned()),
            })),
            tgid: 1,
            exchange: Exchange::sample("GET", target, 200, 1e-9),
        }
    }

    fn pod_info(selected: bool) -> PodInfo {
        PodInfo {
            uid: PodUid::parse(UID).expect("uid"),
            namespace: "shop".to_owned(),
            name: "web-1".to_owned(),
            workload: Workload {
                kind: "Deployment".to_owned(),
                name: "web".to_owned(),
            },
            container_ids: vec![("app".to_owned(), ID.to_owned())],
            app_containers: vec!["app".to_owned(), "proxy".to_owned()],
            selected,
            routes: Some(
                parse_routes_annotation(
                    "GET /orders/<int:id>\n/bad/<nope:x>\n",
                    &WorkloadKey::Pod {
                        namespace: "shop".to_owned(),
                        workload: "web".to_owned(),
                        workload_kind: "Deployment".to_owned(),
                    },
                )
                .0,
            ),
        }
    }

    fn attribution(wait: Duration, max_held: usize) -> Attribution {
        bounded_attribution(wait, max_held, usize::MAX)
    }

    fn bounded_attribution(wait: Duration, max_held: usize, max_held_bytes: usize) -> Attribution {
        let registry = Registry::new();
        let budgets = Budgets::register(&registry).expect("budgets");
        let counters = AttributionCounters::register(&registry, &budgets).expect("counters");
        let limits = HoldLimits {
            wait,
            max_held,
            max_held_bytes,
        };
        Attribution::new(limits, PodGrain::Container.unknown(), counters)
    }

    /// Runs one attribution pass and returns (pod label, target) attributed.
    fn pass(
        attribution: &mut Attribution,
        index: &SharedPodIndex,
        mut exchanges: Vec<CapturedExchange>,
        now: Instant,
    ) -> Vec<(String, String)> {
        let mut out = Vec::new();
        attribution.attribute(Some(index), &mut exchanges, now, &mut out);
        assert!(exchanges.is_empty());
        out.into_iter()
            .map(|attributed| {
                let IdentityLabels::Pod { pod, .. } = &attributed.identity.labels else {
                    panic!("a pod's identity");
                };
                if pod == "web-1" {
                    assert!(attributed.rules.is_some_and(|rules| rules.len() == 1));
                }
                (pod.clone(), attributed.exchange.target)
            })
            .collect()
    }

    #[test]
    fn traffic_waits_for_its_pod_then_is_attributed_in_order() {
        let index = SharedPodIndex::default();
        let mut attribution = attribution(Duration::from_secs(5), 100);
        let start = Instant::now();
        let early = pass(
            &mut attribution,
            &index,
            vec![captured("/1"), captured("/2")],
            start,
        );
        assert!(early.is_empty());
        assert_eq!(attribution.counters().held.get(), 2);
        // Nothing changed: still held, even when new traffic comes.
        let later = pass(
            &mut attribution,
            &index,
            vec![captured("/3")],
            start + Duration::from_secs(1),
        );
        assert!(later.is_empty());
        let (_, refused) = parse_routes_annotation(
            "GET /orders/<int:id>\n/bad/<nope:x>\n",
            &pod_info(true).workload_key(),
        );
        assert_eq!(refused.len(), 1, "one bad rule line");
        lock_index(&index).apply(pod_info(true), start);
        // The annotation's rules reach the attributed exchange (the bad line skipped).
        let rules = lock_index(&index).workload_rules(&WorkloadKey::Pod {
            namespace: "shop".to_owned(),
            workload: "web".to_owned(),
            workload_kind: "Deployment".to_owned(),
        });
        assert_eq!(rules.map(|r| r.len()), Some(1));
        let resolved = pass(
            &mut attribution,
            &index,
            vec![captured("/4")],
            start + Duration::from_secs(2),
        );
        let targets: Vec<&str> = resolved.iter().map(|(_, target)| target.as_str()).collect();
        assert_eq!(targets, ["/1", "/2", "/3", "/4"]);
        assert!(resolved.iter().all(|(pod, _)| pod == "web-1"));
        assert_eq!(attribution.counters().held.get(), 0);
        assert_eq!(attribution.counters().unattributed.get(), 0);
        assert_eq!(attribution.counters().excluded.get(), 0);
    }

    #[test]
    fn unknown_after_the_wait_or_beyond_the_cap_and_nothing_lost() {
        let index = SharedPodIndex::default();
        let mut attribution = attribution(Duration::from_secs(5), 2);
        let start = Instant::now();
        // The third exchange finds the queue full: unknown at once.
        let now = pass(
            &mut attribution,
            &index,
            vec![captured("/1"), captured("/2"), captured("/3")],
            start,
        );
        assert_eq!(now, [(UNKNOWN.to_owned(), "/3".to_owned())]);
        let due = pass(
            &mut attribution,
            &index,
            Vec::new(),
            start + Duration::from_secs(5),
        );
        assert_eq!(due.len(), 2);
        assert!(due.iter().all(|(pod, _)| pod == UNKNOWN));
        assert_eq!(attribution.counters().unattributed.get(), 3);
        // An opted-out pod's traffic is dropped on purpose, and counted.
        lock_index(&index).apply(pod_info(false), start);
        assert!(pass(&mut attribution, &index, vec![captured("/4")], start).is_empty());
        assert_eq!(attribution.counters().excluded.get(), 1);
        assert_eq!(attribution.counters().held.get(), 0);
    }

    #[test]
    fn held_traffic_is_bounded_in_bytes() {
        let index = SharedPodIndex::default();
        // Room for two exchanges of 3 + 2,003 bytes, not three.
        let mut attribution = bounded_attribution(Duration::from_secs(5), 100, 4_100);
        let long = format!("/{}", "x".repeat(2_002));
        let start = Instant::now();
        let now = pass(
            &mut attribution,
            &index,
            vec![captured(&long), captured(&long), captured(&long)],
            start,
        );
        assert_eq!(
            now,
            [(UNKNOWN.to_owned(), long.clone())],
            "the third at once"
        );
        assert_eq!(attribution.counters().held.get(), 2);
        assert_eq!(attribution.counters().held_bytes_budget.get(), 1);
        // Once they leave, there is room again.
        lock_index(&index).apply(pod_info(true), start);
        assert_eq!(
            pass(&mut attribution, &index, vec![captured("/a")], start).len(),
            3
        );
        assert_eq!(attribution.held_bytes, 0);
    }
}
