//! The `path` label. With `--path-label route` (the default) it is what
//! Flask's `url_rule` would be, from, in order:
//!
//! 1. user rules in Flask's syntax (`--route`, `--routes-file`, a pod's
//!    annotation), matched as Werkzeug matches them (`crate::rules`);
//! 2. the rules read from the app's own source ([`discovery`]), matched
//!    the same way; a request the app served that none of them takes shows
//!    the harvest incomplete (a miss, counted) and goes on to
//! 3. templates learned from each workload's traffic ([`learned`]);
//! 4. for requests no route takes (the router's 404, 405 or 308, or a 404
//!    that fits no learned route): `None`, as prometheus-flask-exporter's
//!    `group_by='url_rule'` labels them.
//!
//! With `raw` it is the request path, as prometheus-flask-exporter's
//! default. Query strings never appear. Each workload has at most
//! `max_paths_per_workload` distinct values; more are `<other>`, counted.
//! Per-route statistics ([`stats`]) feed `/debug/routes`.

mod counters;
pub mod discovery;
pub mod learned;
mod request_paths;
pub mod stats;

pub use self::counters::RouteCounters;
pub use self::request_paths::{ExcludedPaths, request_path};

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use self::stats::RouteStats;
use self::{
    discovery::rules::SourceRules,
    learned::{Learned, RouteLearner},
};
use crate::{
    exchange::{AttributedExchange, Exchange, Identity, Route, RouteSource, WorkloadKey},
    rules::flask::{NO_RULE, RuleSet},
};

/// How the `path` label is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PathLabelMode {
    /// The decoded request path without its query string, exactly as
    /// prometheus-flask-exporter's default.
    Raw,
    /// Flask's rule: from user rules, else learned from traffic.
    Route,
}

pub use crate::exchange::OVERFLOW_PATH;

/// Longest `path` label; a longer route is exported as [`OVERFLOW_PATH`].
pub const MAX_PATH_LABEL_BYTES: usize = 256;

/// Trie nodes one workload's learner may hold.
const MAX_LEARNER_NODES: usize = 20_000;

/// A copy of one workload's routes, for `/debug/routes`.
#[derive(Clone, Debug)]
pub struct WorkloadRoutesView {
    pub workload: WorkloadKey,
    pub routes: Vec<(Arc<str>, RouteStats)>,
    /// Size of the learned route trie.
    pub learned_nodes: usize,
    /// Its rules read from its source, once read.
    pub source_rules: Option<SourceRulesView>,
}

/// One workload's routes.
#[derive(Debug)]
struct WorkloadRoutes {
    learner: RouteLearner,
    routes: HashMap<Arc<str>, RouteStats>,
    /// Identities seen serving this workload.
    identities: usize,
    /// Its rules read from its source, once read.
    source_rules: Option<Arc<SourceRules>>,
    source_misses: u64,
}

/// Processes of a workload whose source was asked for, and the answers
/// still awaited.
#[derive(Debug, Default)]
struct DiscoveryState {
    /// Each asked once: a new process may run new files.
    processes: HashSet<u32>,
    outstanding: u32,
    /// Since when exchanges wait for an answer.
    asked_at: Option<Instant>,
}

/// Processes of one workload kept per [`DiscoveryState`]; past it the set
/// starts over (a process seen again is checked again, a stat per file).
const PROCESSES_PER_WORKLOAD: usize = 1024;

/// Processes asked about and not answered yet, all workloads together (a
/// pod can start a process per request, as gunicorn's `--max-requests 1`
/// does): past it a new process is not asked about until answers come,
/// and its exchanges are named at once.
const MAX_OUTSTANDING_ASKS: usize = 256;

/// The last few processes an identity's exchanges came from (gunicorn's
/// workers take turns): the steady path's check that nothing new runs.
#[derive(Debug, Default)]
struct RecentProcesses {
    tgids: [u32; 4],
    next: usize,
}

impl RecentProcesses {
    fn contains(&self, tgid: u32) -> bool {
        self.tgids.contains(&tgid)
    }

    fn note(&mut self, tgid: u32) {
        if !self.contains(tgid) {
            self.tgids[self.next] = tgid;
            self.next = (self.next + 1) % self.tgids.len();
        }
    }
}

/// Settings of the routes stage.
#[derive(Clone, Debug)]
pub struct RouteOptions {
    pub mode: PathLabelMode,
    pub max_paths_per_workload: usize,
    /// Distinct literal values at one position before it is a parameter.
    pub segment_cap: usize,
    /// Rules of every workload (flag and file).
    pub user_rules: Arc<RuleSet>,
    /// Read each workload's rules from its source (`--route-discovery`).
    pub discovery: bool,
    /// Requests not counted at all.
    pub excluded_paths: ExcludedPaths,
}

/// What `/debug/routes` shows of a workload's harvest.
#[derive(Clone, Debug)]
pub struct SourceRulesView {
    pub rules: Arc<SourceRules>,
    /// Requests the app served that no rule read from its source takes.
    pub misses: u64,
}

/// Names routes and keeps route statistics, per workload.
#[derive(Debug)]
pub struct RouteLabeler {
    options: RouteOptions,
    workloads: HashMap<WorkloadKey, WorkloadRoutes>,
    /// Identities whose workload's routes are kept, with the processes
    /// they were last served by.
    identities: HashMap<Arc<Identity>, RecentProcesses>,
    /// (workload, path label) of routes a learned parameter replaced, for
    /// the metrics stage to remove.
    retired: Vec<(WorkloadKey, Arc<str>)>,
    counters: RouteCounters,
    /// Where each request's label is written (kept: no allocation per
    /// request once its route is known).
    label: String,
    /// Where the endpoint of the rule that named it is written (empty:
    /// none).
    endpoint: String,
    /// Workloads whose source should be read, and a process serving each.
    discovery_wanted: Vec<(WorkloadKey, u32)>,
    /// Route discovery per workload (bounded by the workloads that send
    /// requests; forgotten with the workload).
    discovery: HashMap<WorkloadKey, DiscoveryState>,
    /// Their outstanding asks, summed.
    asks_outstanding: usize,
    /// Harvests that came before their workload's first route.
    early_rules: HashMap<WorkloadKey, Arc<SourceRules>>,
}

impl RouteLabeler {
    pub fn new(options: RouteOptions, counters: RouteCounters) -> Self {
        RouteLabeler {
            options,
            workloads: HashMap::new(),
            identities: HashMap::new(),
            retired: Vec::new(),
            counters,
            label: String::new(),
            endpoint: String::new(),
            discovery_wanted: Vec::new(),
            discovery: HashMap::new(),
            asks_outstanding: 0,
            early_rules: HashMap::new(),
        }
    }

    /// Whether `attributed` should wait (at most `wait`) for its workload's
    /// rules to be read from its source, so that even its first requests
    /// are named by them. The first exchange of a workload asks for them.
    pub fn waits_for_source_rules(
        &mut self,
        attributed: &AttributedExchange,
        wait: Duration,
    ) -> bool {
        // An identity routed from this process before is past the wait: the
        // steady path costs one lookup of a hash computed once per identity.
        let tgid = attributed.tgid;
        if !self.options.discovery
            || self.options.mode == PathLabelMode::Raw
            || self
                .identities
                .get(&attributed.identity)
                .is_some_and(|recent| recent.contains(tgid))
        {
            return false;
        }
        let workload = &attributed.identity.workload;
        if !self.discovery.contains_key(workload) {
            self.discovery
                .insert(workload.clone(), DiscoveryState::default());
        }
        let Some(state) = self.discovery.get_mut(workload) else {
            return false;
        };
        // A process not seen before may run other files than the last one
        // read: asked for too, and waited for (a stat per file when not).
        if !state.processes.contains(&tgid) && self.asks_outstanding >= MAX_OUTSTANDING_ASKS {
            // Not asked, nor marked: a later exchange of it asks again.
            self.counters.discovery_asks_budget.inc();
        } else if !state.processes.contains(&tgid) {
            if state.processes.len() >= PROCESSES_PER_WORKLOAD {
                state.processes.clear();
            }
            state.processes.insert(tgid);
            state.outstanding += 1;
            self.asks_outstanding += 1;
            state.asked_at.get_or_insert_with(Instant::now);
            self.discovery_wanted.push((workload.clone(), tgid));
        }
        state.outstanding > 0 && state.asked_at.is_some_and(|at| at.elapsed() < wait)
    }

    /// Processes, each with its workload, whose source should be read (or
    /// checked against what was read for the workload).
    pub fn take_discovery_wanted(&mut self) -> Vec<(WorkloadKey, u32)> {
        std::mem::take(&mut self.discovery_wanted)
    }

    /// The answer for one process asked for: rules read from its source,
    /// or `None` when it runs the files the workload's rules came from.
    pub fn source_rules_answered(
        &mut self,
        workload: &WorkloadKey,
        rules: Option<Arc<SourceRules>>,
    ) {
        if let Some(state) = self.discovery.get_mut(workload)
            && state.outstanding > 0
        {
            state.outstanding -= 1;
            self.asks_outstanding = self.asks_outstanding.saturating_sub(1);
            if state.outstanding == 0 {
                state.asked_at = None;
            }
        }
        if let Some(rules) = rules {
            self.set_source_rules(workload, rules);
        }
    }

    /// A workload's rules, read from its source.
    fn set_source_rules(&mut self, workload: &WorkloadKey, rules: Arc<SourceRules>) {
        match self.workloads.get_mut(workload) {
            Some(routes) => routes.source_rules = Some(rules),
            None => {
                self.early_rules.insert(workload.clone(), rules);
            }
        }
    }

    pub fn counters(&self) -> &RouteCounters {
        &self.counters
    }

    /// Routes replaced by a learned parameter since the last call: their
    /// series should go (their requests now count under the template).
    pub fn take_retired(&mut self) -> Vec<(WorkloadKey, Arc<str>)> {
        self.counters
            .routes_retired
            .inc_by(self.retired.len() as u64);
        std::mem::take(&mut self.retired)
    }

    /// The route of an exchange, with its statistics updated; `None` for a
    /// path `--excluded-paths` matches, which is not counted. The rules of
    /// the exchange's workload (a pod annotation) are tried before the
    /// global ones.
    pub fn route(&mut self, attributed: &AttributedExchange) -> Option<Route> {
        let exchange = &attributed.exchange;
        let path = request_path(&exchange.target);
        if self.options.excluded_paths.excludes(&path) {
            self.counters.excluded.inc();
            return None;
        }
        let identity = &attributed.identity;
        let workload = &identity.workload;
        if let Some(recent) = self.identities.get_mut(identity) {
            recent.note(attributed.tgid);
        } else {
            let mut recent = RecentProcesses::default();
            recent.note(attributed.tgid);
            self.identities.insert(identity.clone(), recent);
            let options = &self.options;
            self.workloads
                .entry(workload.clone())
                .or_insert_with(|| WorkloadRoutes {
                    learner: RouteLearner::new(options.segment_cap, MAX_LEARNER_NODES),
                    routes: HashMap::new(),
                    identities: 0,
                    source_rules: self.early_rules.remove(workload),
                    source_misses: 0,
                })
                .identities += 1;
        }
        let Some(routes) = self.workloads.get_mut(workload) else {
            return Some(Route {
                path: Arc::from(NO_RULE),
                endpoint: None,
                source: RouteSource::Unmatched,
            });
        };
        let rules = attributed.rules.as_deref();
        let label = &mut self.label;
        let endpoint = &mut self.endpoint;
        endpoint.clear();
        let mut missed = false;
        let mut source = name_route(
            &self.options,
            rules,
            routes,
            &path,
            exchange,
            (label, endpoint),
            &mut missed,
        );
        if missed {
            routes.source_misses += 1;
            self.counters.source_misses.inc();
        }
        if source == RouteSource::Overflow {
            self.counters.learner_budget.inc();
        } else if label.len() > MAX_PATH_LABEL_BYTES {
            self.counters.label_budget.inc();
            label.clear();
            label.push_str(OVERFLOW_PATH);
            endpoint.clear();
            source = RouteSource::Overflow;
        }
        for prefix in routes.learner.take_retired() {
            retire(routes, &prefix, workload, &mut self.retired);
        }
        let now = SystemTime::now();
        let seconds = exchange.duration_seconds();
        let known = routes.routes.get_key_value(label.as_str());
        let (label, source, endpoint) = match known {
            Some((known, stats)) => (known.clone(), stats.source, stats.endpoint.clone()),
            None if routes.routes.len() >= self.options.max_paths_per_workload => {
                self.counters.path_overflow.inc();
                (Arc::from(OVERFLOW_PATH), RouteSource::Overflow, None)
            }
            None => (
                Arc::from(label.as_str()),
                source,
                (!endpoint.is_empty()).then(|| Arc::from(endpoint.as_str())),
            ),
        };
        routes
            .routes
            .entry(label.clone())
            .or_insert_with(|| RouteStats::new(source, endpoint.clone(), now))
            .record(
                exchange.method.as_str(),
                &path,
                exchange.status,
                seconds,
                now,
            );
        Some(Route {
            path: label,
            endpoint,
            source,
        })
    }

    /// Forgets an identity whose series were removed; its workload's routes
    /// go with the workload's last identity.
    pub fn forget(&mut self, identity: &Identity) {
        if self.identities.remove(identity).is_none() {
            return;
        }
        let workload = &identity.workload;
        if let Some(routes) = self.workloads.get_mut(workload) {
            routes.identities = routes.identities.saturating_sub(1);
            if routes.identities == 0 {
                self.workloads.remove(workload);
                if let Some(state) = self.discovery.remove(workload) {
                    self.asks_outstanding = self
                        .asks_outstanding
                        .saturating_sub(state.outstanding as usize);
                }
            }
        }
    }

    /// Every workload's routes, for `/debug/routes`.
    pub fn snapshot(&self) -> Vec<WorkloadRoutesView> {
        let mut workloads: Vec<WorkloadRoutesView> = self
            .workloads
            .iter()
            .map(|(key, routes)| {
                let mut list: Vec<(Arc<str>, RouteStats)> = routes
                    .routes
                    .iter()
                    .map(|(label, stats)| (label.clone(), stats.clone()))
                    .collect();
                list.sort_by(|a, b| a.0.cmp(&b.0));
                WorkloadRoutesView {
                    workload: key.clone(),
                    routes: list,
                    learned_nodes: routes.learner.nodes(),
                    source_rules: routes.source_rules.clone().map(|rules| SourceRulesView {
                        rules,
                        misses: routes.source_misses,
                    }),
                }
            })
            .collect();
        workloads.sort_by(|a, b| a.workload.cmp(&b.workload));
        workloads
    }
}

/// Drops the routes under a template prefix a collapse made obsolete; their
/// statistics join the template that now names their paths.
fn retire(
    routes: &mut WorkloadRoutes,
    prefix: &str,
    workload: &WorkloadKey,
    retired: &mut Vec<(WorkloadKey, Arc<str>)>,
) {
    let below = format!("{prefix}/");
    let gone: Vec<Arc<str>> = routes
        .routes
        .keys()
        .filter(|label| ***label == *prefix || label.starts_with(&below))
        .cloned()
        .collect();
    for label in gone {
        let Some(stats) = routes.routes.remove(&label) else {
            continue;
        };
        let renamed = stats
            .samples
            .first()
            .and_then(|sample| routes.learner.fit(sample));
        if let Some((template, learned)) = renamed {
            let source = match learned {
                Learned::Learned => RouteSource::Learned,
                Learned::Heuristic => RouteSource::Heuristic,
            };
            routes
                .routes
                .entry(Arc::from(template))
                .or_insert_with(|| RouteStats::new(source, None, stats.first_seen))
                .absorb(stats);
        }
        retired.push((workload.clone(), label));
    }
}

/// Whether a view served the exchange's route, so that its path may teach
/// the learner: a final status below 400 other than 308. Werkzeug's router
/// answers requests no rule takes with 404, 405 (another method) or 308 (a
/// missing trailing slash); gunicorn answers requests it cannot parse with
/// 400, 403, 414, 417, 431, 500 or 501 before Flask runs; and middleware may
/// answer 401, 403 or 429 for any path. Other statuses only fit routes
/// already learned.
pub fn teaches_routes(status: u16) -> bool {
    (200..400).contains(&status) && status != 308
}

/// The label a request gets before the workload's cap; `Overflow` when the
/// learner had no room for it.
fn name_route(
    options: &RouteOptions,
    rules: Option<&RuleSet>,
    routes: &mut WorkloadRoutes,
    path: &str,
    exchange: &Exchange,
    (label, endpoint): (&mut String, &mut String),
    missed: &mut bool,
) -> RouteSource {
    fn named(label: &mut String, text: &str, source: RouteSource) -> RouteSource {
        label.clear();
        label.push_str(text);
        source
    }
    if options.mode == PathLabelMode::Raw {
        return named(label, path, RouteSource::Raw);
    }
    let rule_sets = rules.into_iter().chain(Some(options.user_rules.as_ref()));
    let mut have_rules = false;
    for set in rule_sets.filter(|set| !set.is_empty()) {
        have_rules = true;
        if let Some(rule) = set.matched(path, exchange.method.as_str()) {
            endpoint.push_str(rule.endpoint.as_deref().unwrap_or_default());
            return named(label, &rule.text, RouteSource::UserRule);
        }
    }
    // Flask's router answers what no rule takes with 404, 405 (another
    // method) or 308 (a missing trailing slash): no url_rule.
    let router_answer = matches!(exchange.status, 404 | 405 | 308);
    if let Some(source) = routes.source_rules.as_deref().filter(|s| !s.set.is_empty()) {
        if let Some(rule) = source.set.matched(path, exchange.method.as_str()) {
            endpoint.push_str(rule.endpoint.as_deref().unwrap_or_default());
            return named(label, &rule.text, RouteSource::SourceRule);
        }
        if router_answer {
            return named(label, NO_RULE, RouteSource::Unmatched);
        }
        // The app served what no rule read from it takes: the harvest
        // missed a rule (registered at run time, or not followed). Learned
        // templates name it.
        *missed = !have_rules;
    }
    if have_rules && router_answer {
        return named(label, NO_RULE, RouteSource::Unmatched);
    }
    let fitted = if teaches_routes(exchange.status) {
        match routes.learner.learn_into(path, label) {
            Some(learned) => Some(learned),
            None => return named(label, OVERFLOW_PATH, RouteSource::Overflow),
        }
    } else {
        routes.learner.fit_into(path, label)
    };
    match fitted {
        Some(Learned::Learned) => RouteSource::Learned,
        Some(Learned::Heuristic) => RouteSource::Heuristic,
        None => named(label, NO_RULE, RouteSource::Unmatched),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use prometheus::Registry;

    use super::*;
    use crate::{exchange::IdentityLabels, telemetry::Budgets};

    #[test]
    fn request_path_matches_werkzeug() {
        assert_eq!(request_path("/items/5?x=1&y=2"), "/items/5");
        assert_eq!(request_path("/a%20b/%E2%9C%93"), "/a b/✓");
        assert_eq!(request_path("/bad%FFbyte"), "/bad\u{FFFD}byte");
        assert_eq!(request_path("//double/slash"), "/double/slash");
        assert_eq!(request_path("http://example.com/abs?q"), "/abs");
        assert_eq!(request_path("*"), "/*");
        assert_eq!(request_path("/frag#x"), "/frag");
    }

    fn exchange(method: &str, target: &str, status: u16, seconds: f64) -> Exchange {
        Exchange::sample(method, target, status, seconds)
    }

    fn labeler(mode: PathLabelMode, cap: usize, rules: &str) -> RouteLabeler {
        let (rules, errors) = RuleSet::parse(rules);
        assert!(errors.is_empty());
        let registry = Registry::new();
        let budgets = Budgets::register(&registry).expect("budgets");
        let counters = RouteCounters::register(&registry, &budgets).expect("counters");
        RouteLabeler::new(
            RouteOptions {
                mode,
                max_paths_per_workload: cap,
                segment_cap: 4,
                user_rules: Arc::new(rules),
                discovery: true,
                excluded_paths: ExcludedPaths::default(),
            },
            counters,
        )
    }

    #[test]
    fn rules_read_from_the_source_name_routes_and_misses_are_counted() {
        let mut labeler = labeler(PathLabelMode::Route, 100, "");
        let identity = server("gunicorn", "8000");
        // The first exchange asks for the source and waits for it, up to
        // the wait given.
        let first = AttributedExchange {
            identity: identity.clone(),
            rules: None,
            tgid: 1,
            exchange: exchange("GET", "/items/1", 200, 0.01),
        };
        let wait = Duration::from_secs(60);
        assert!(labeler.waits_for_source_rules(&first, wait));
        assert!(labeler.waits_for_source_rules(&first, wait));
        assert!(
            !labeler.waits_for_source_rules(&first, Duration::ZERO),
            "waited long enough"
        );
        let wanted = labeler.take_discovery_wanted();
        assert_eq!(wanted, vec![(identity.workload.clone(), 1)]);
        assert!(labeler.take_discovery_wanted().is_empty(), "asked once");
        labeler.source_rules_answered(
            &identity.workload,
            Some(source_rules(&["/items/<int:item_id>", "/tags/<slug>"])),
        );
        assert!(
            !labeler.waits_for_source_rules(&first, wait),
            "the rules are in"
        );
        let route = labeler.route(&first).expect("counted");
        assert_eq!(route.path.as_ref(), "/items/<int:item_id>");
        assert_eq!(
            route.endpoint.as_deref(),
            Some("view0"),
            "the rule's endpoint"
        );
        let cases = [
            (
                exchange("GET", "/items/7", 200, 0.01),
                "/items/<int:item_id>",
            ),
            // The view's own abort(404) keeps its rule.
            (
                exchange("GET", "/items/1000", 404, 0.01),
                "/items/<int:item_id>",
            ),
            (exchange("GET", "/tags/python", 200, 0.01), "/tags/<slug>"),
            // The router's answers: no rule.
            (exchange("GET", "/nowhere", 404, 0.01), "None"),
            (exchange("POST", "/tags/x", 405, 0.01), "None"),
        ];
        for (exchange, expected) in cases {
            assert_eq!(label(&mut labeler, &identity, exchange), expected);
        }
        assert_eq!(labeler.counters().source_misses.get(), 0);
        // Served, yet no harvested rule takes it: a miss, named by learning.
        assert_eq!(
            label(
                &mut labeler,
                &identity,
                exchange("GET", "/runtime/added", 200, 0.01)
            ),
            "/runtime/added"
        );
        assert_eq!(labeler.counters().source_misses.get(), 1);
        let view = labeler.snapshot();
        assert_eq!(view[0].source_rules.as_ref().map(|s| s.misses), Some(1));
    }

    /// `--excluded-paths` as prometheus-flask-exporter's `excluded_paths`:
    /// matched from the path's start (Python's `re.match`), query string
    /// left out; an excluded request is counted nowhere and teaches nothing.
    #[test]
    fn excluded_paths_are_not_counted() {
        let mut labeler = labeler(PathLabelMode::Route, 100, "");
        labeler.options.excluded_paths =
            ExcludedPaths::new(&["/health".to_owned(), "/static/.*\\.css".to_owned()])
                .expect("patterns");
        let identity = server("gunicorn", "8000");
        let route = |labeler: &mut RouteLabeler, target: &str| {
            labeler
                .route(&AttributedExchange {
                    identity: identity.clone(),
                    rules: None,
                    tgid: 1,
                    exchange: exchange("GET", target, 200, 0.01),
                })
                .map(|route| route.path.to_string())
        };
        assert_eq!(route(&mut labeler, "/health"), None);
        assert_eq!(
            route(&mut labeler, "/healthz?probe=1"),
            None,
            "from the start"
        );
        assert_eq!(route(&mut labeler, "/static/site.css"), None);
        assert_eq!(
            route(&mut labeler, "/static/site.js").as_deref(),
            Some("/static/site.js")
        );
        assert_eq!(
            route(&mut labeler, "/api/health").as_deref(),
            Some("/api/health"),
            "anchored"
        );
        assert_eq!(labeler.counters().excluded.get(), 3);
        let routes: Vec<String> = labeler.snapshot()[0]
            .routes
            .iter()
            .map(|(label, _)| label.to_string())
            .collect();
        assert_eq!(routes, ["/api/health", "/static/site.js"]);
    }

    /// A pod that starts a process per request cannot queue unbounded
    /// work for the discovery thread: past the outstanding asks, a new
    /// process is not asked about (counted) and its exchange is named at
    /// once; once answers come, it is asked about at its next exchange.
    #[test]
    fn outstanding_asks_stay_within_their_budget() {
        let mut labeler = labeler(PathLabelMode::Route, 100, "");
        let identity = server("gunicorn", "8000");
        let from = |tgid| AttributedExchange {
            identity: identity.clone(),
            rules: None,
            tgid,
            exchange: exchange("GET", "/", 200, 0.01),
        };
        let wait = Duration::from_secs(60);
        for tgid in 1..=MAX_OUTSTANDING_ASKS as u32 {
            assert!(labeler.waits_for_source_rules(&from(tgid), wait));
        }
        assert_eq!(labeler.take_discovery_wanted().len(), MAX_OUTSTANDING_ASKS);
        let late = MAX_OUTSTANDING_ASKS as u32 + 1;
        // Its workload still waits for earlier answers: so does it, unasked.
        assert!(labeler.waits_for_source_rules(&from(late), wait));
        assert!(labeler.take_discovery_wanted().is_empty());
        assert_eq!(labeler.counters().discovery_asks_budget.get(), 1);
        labeler.source_rules_answered(&identity.workload, None);
        assert!(labeler.waits_for_source_rules(&from(late), wait));
        assert_eq!(
            labeler.take_discovery_wanted(),
            [(identity.workload.clone(), late)],
            "asked once an answer made room"
        );
        assert_eq!(labeler.counters().discovery_asks_budget.get(), 1);
    }

    fn source_rules(rules: &[&str]) -> Arc<SourceRules> {
        let mut harvest = discovery::Discovery::default();
        for (index, rule) in rules.iter().enumerate() {
            harvest.rules.push(discovery::HarvestedRule {
                rule: (*rule).to_owned(),
                methods: BTreeSet::from(["GET".to_owned()]),
                endpoint: format!("view{index}"),
                strict_slashes: true,
                file: "/srv/app.py".into(),
                line: 1,
            });
        }
        Arc::new(SourceRules::new(harvest, Default::default()))
    }

    /// A new process of a known workload (a restart, a new pod of it) may
    /// run new source: it is asked about, and its exchanges wait for the
    /// answer; the workers it already answered for do not.
    #[test]
    fn each_new_process_of_a_workload_is_asked_about_once() {
        let mut labeler = labeler(PathLabelMode::Route, 100, "");
        let identity = server("gunicorn", "8000");
        let from = |tgid, target| AttributedExchange {
            identity: identity.clone(),
            rules: None,
            tgid,
            exchange: exchange("GET", target, 200, 0.01),
        };
        let wait = Duration::from_secs(60);
        assert!(labeler.waits_for_source_rules(&from(10, "/v1/1"), wait));
        // A second worker while the first is read: asked too.
        assert!(labeler.waits_for_source_rules(&from(11, "/v1/1"), wait));
        let workload = identity.workload.clone();
        assert_eq!(
            labeler.take_discovery_wanted(),
            [(workload.clone(), 10), (workload.clone(), 11)]
        );
        labeler.source_rules_answered(&workload, Some(source_rules(&["/v1/<int:id>"])));
        assert!(
            labeler.waits_for_source_rules(&from(10, "/v1/1"), wait),
            "the second answer is awaited"
        );
        labeler.source_rules_answered(&workload, None);
        for tgid in [10, 11] {
            assert!(!labeler.waits_for_source_rules(&from(tgid, "/v1/2"), wait));
            assert_eq!(
                labeler
                    .route(&from(tgid, "/v1/2"))
                    .expect("counted")
                    .path
                    .as_ref(),
                "/v1/<int:id>"
            );
        }
        assert!(labeler.take_discovery_wanted().is_empty());
        // Restarted with new source: asked about, waited for, and its rules
        // replace the old ones.
        assert!(labeler.waits_for_source_rules(&from(20, "/v2/1"), wait));
        assert_eq!(labeler.take_discovery_wanted(), [(workload.clone(), 20)]);
        labeler.source_rules_answered(&workload, Some(source_rules(&["/v2/<int:id>"])));
        assert!(!labeler.waits_for_source_rules(&from(20, "/v2/1"), wait));
        assert_eq!(
            labeler
                .route(&from(20, "/v2/1"))
                .expect("counted")
                .path
                .as_ref(),
            "/v2/<int:id>"
        );
        assert_eq!(labeler.counters().source_misses.get(), 0);
    }

    fn pod() -> Arc<Identity> {
        Arc::new(Identity::new(IdentityLabels::Pod {
            namespace: "shop".to_owned(),
            pod: "web-1".to_owned(),
            container: "web".to_owned(),
            workload: "web".to_owned(),
            workload_kind: "Deployment".to_owned(),
        }))
    }

    fn server(process: &str, port: &str) -> Arc<Identity> {
        Arc::new(Identity::new(IdentityLabels::Server {
            process: process.to_owned(),
            port: port.to_owned(),
        }))
    }

    /// The path label of `exchange`, served by `identity`.
    fn label(labeler: &mut RouteLabeler, identity: &Arc<Identity>, exchange: Exchange) -> String {
        let attributed = AttributedExchange {
            identity: identity.clone(),
            rules: None,
            tgid: 1,
            exchange,
        };
        labeler
            .route(&attributed)
            .expect("counted")
            .path
            .to_string()
    }

    #[test]
    fn user_rules_first_then_learned_then_none() {
        let mut labeler = labeler(PathLabelMode::Route, 100, "GET /items/<int:item_id>\n");
        let pod = pod();
        let mut label = |method: &str, target: &str, status: u16| {
            label(&mut labeler, &pod, exchange(method, target, status, 0.01))
        };
        assert_eq!(
            label("GET", "/items/5?secret=1", 200),
            "/items/<int:item_id>"
        );
        // A view's own 404 on a matched rule keeps the rule, as in Flask.
        assert_eq!(label("GET", "/items/99999", 404), "/items/<int:item_id>");
        // The router's answers: no rule.
        assert_eq!(label("POST", "/items/5", 405), NO_RULE);
        assert_eq!(label("GET", "/nope", 404), NO_RULE);
        // Served paths no rule names are learned.
        assert_eq!(label("GET", "/orders/17", 200), "/orders/<int>");
    }

    #[test]
    fn without_rules_unmatched_404s_collapse_and_the_cap_holds() {
        let mut labeler = labeler(PathLabelMode::Route, 3, "");
        let server = server("gunicorn", "8000");
        let mut label = |target: &str, status: u16| {
            label(&mut labeler, &server, exchange("GET", target, status, 0.01))
        };
        assert_eq!(label("/users/1", 200), "/users/<int>");
        assert_eq!(
            label("/users/2", 404),
            "/users/<int>",
            "fits a learned route"
        );
        assert_eq!(label("/wp-admin/setup.php", 404), NO_RULE);
        assert_eq!(label("/health", 200), "/health");
        assert_eq!(label("/metrics", 200), OVERFLOW_PATH);
        assert_eq!(label("/users/3", 200), "/users/<int>");
        assert_eq!(labeler.counters().path_overflow.get(), 1);
    }

    #[test]
    fn literal_routes_a_parameter_replaces_are_retired() {
        let mut labeler = labeler(PathLabelMode::Route, 100, "");
        let server = server("gunicorn", "8000");
        for tag in ["a", "b", "c", "d"] {
            let tag_path = format!("/tags/{tag}");
            label(&mut labeler, &server, exchange("GET", &tag_path, 200, 0.01));
            let related = format!("/tags/{tag}/related");
            label(&mut labeler, &server, exchange("GET", &related, 200, 0.01));
        }
        assert!(labeler.take_retired().is_empty());
        let template = label(&mut labeler, &server, exchange("GET", "/tags/e", 200, 0.01));
        assert_eq!(template, "/tags/<string>");
        let mut retired: Vec<String> = labeler
            .take_retired()
            .into_iter()
            .map(|(key, path)| {
                assert_eq!(key, server.workload);
                path.to_string()
            })
            .collect();
        retired.sort();
        assert_eq!(
            retired,
            [
                "/tags/a",
                "/tags/a/related",
                "/tags/b",
                "/tags/b/related",
                "/tags/c",
                "/tags/c/related",
                "/tags/d",
                "/tags/d/related"
            ]
        );
        assert_eq!(labeler.counters().routes_retired.get(), 8);
        // Their statistics joined the templates that name them now.
        let snapshot = labeler.snapshot();
        let requests: BTreeMap<&str, u64> = snapshot[0]
            .routes
            .iter()
            .map(|(label, stats)| (&**label, stats.requests))
            .collect();
        assert_eq!(
            requests,
            BTreeMap::from([("/tags/<string>", 5), ("/tags/<string>/related", 4)])
        );
    }

    #[test]
    fn raw_mode_and_route_statistics() {
        let mut labeler = labeler(PathLabelMode::Raw, 10, "");
        let server = server("python", "5000");
        for (status, seconds) in [(200, 0.004), (200, 0.02), (500, 0.3), (200, 0.02)] {
            label(
                &mut labeler,
                &server,
                exchange("GET", "/a/1?q=secret", status, seconds),
            );
        }
        label(&mut labeler, &server, exchange("POST", "/a/1", 201, 0.02));
        let snapshot = labeler.snapshot();
        let (label, stats) = &snapshot[0].routes[0];
        assert_eq!(&**label, "/a/1");
        assert_eq!(stats.source, RouteSource::Raw);
        assert_eq!(stats.requests, 5);
        assert_eq!(stats.methods.get("POST"), Some(&1));
        assert_eq!(stats.statuses.get(&500), Some(&1));
        assert_eq!(stats.samples, ["/a/1"], "no query strings");
        // From the sketch, within 2 % of what was observed: 4, 20, 20, 20
        // and 300 ms.
        let p50 = stats.quantile(0.5).expect("p50");
        assert!((0.0196..=0.0204).contains(&p50), "{p50}");
        // The sketch ranks as q × (n − 1): of five values the p99 is the
        // fourth, the maximum the fifth.
        let p99 = stats.quantile(0.99).expect("p99");
        assert!((0.0196..=0.0204).contains(&p99), "{p99}");
        let max = stats.quantile(1.0).expect("max");
        assert!((0.294..=0.306).contains(&max), "{max}");
        let p10 = stats.quantile(0.1).expect("p10");
        assert!((0.00392..=0.00408).contains(&p10), "{p10}");
        labeler.forget(&server);
        assert!(labeler.snapshot().is_empty());
    }

    #[test]
    fn only_served_routes_teach_and_long_routes_overflow() {
        let mut labeler = labeler(PathLabelMode::Route, 100, "");
        let server = server("gunicorn", "8000");
        let mut label = |target: &str, status: u16| {
            label(&mut labeler, &server, exchange("GET", target, status, 0.01))
        };
        // Answers of the router, the server or middleware teach nothing.
        for status in [400, 401, 403, 404, 405, 414, 429, 431, 500, 501, 308] {
            assert_eq!(
                label(&format!("/probe{status}/1.2"), status),
                NO_RULE,
                "{status}"
            );
        }
        assert_eq!(label("/users/1", 200), "/users/<int>");
        assert_eq!(
            label("/users/2", 401),
            "/users/<int>",
            "fits what a view served"
        );
        assert_eq!(label("/old", 301), "/old", "a view's redirect");
        // Typed values and long segments make a route, whatever their size...
        let slug = "s".repeat(300);
        assert_eq!(label(&format!("/tags/{slug}"), 200), "/tags/<string>");
        // ...but many literal segments make a label past the length bound.
        let long: String = (0..40).map(|n| format!("/section-number-{n:04}")).collect();
        assert_eq!(label(&long, 200), OVERFLOW_PATH);
        assert_eq!(labeler.counters().label_budget.get(), 1);
        assert_eq!(labeler.counters().learner_budget.get(), 0);
    }
}
