//! The `path` label. With `--path-label route` (the default) it is what
//! Flask's `url_rule` would be, from, in order:
//!
//! 1. user rules in Flask's syntax (`--route`, `--routes-file`, a pod's
//!    annotation), matched as Werkzeug matches them ([`flask_rules`]);
//! 2. templates learned from each workload's traffic ([`learned`]);
//! 3. for requests no route takes (no user rule, or a 404 that fits no
//!    learned route): `None`, as prometheus-flask-exporter's
//!    `group_by='url_rule'` labels them.
//!
//! With `raw` it is the request path, as prometheus-flask-exporter's
//! default. Query strings never appear. Each workload has at most
//! `max_paths_per_workload` distinct values; more are `<other>`, counted.
//! Per-route statistics feed `/debug/routes`.

pub mod flask_rules;
pub mod learned;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::SystemTime,
};

use percent_encoding::percent_decode_str;
use serde::Serialize;

use self::{
    flask_rules::{NO_RULE, RuleMatch, RuleSet},
    learned::{Learned, RouteLearner},
};
use crate::{http::Exchange, identity::IdentityLabels, metrics::DURATION_BUCKETS};

/// How the `path` label is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PathLabelMode {
    /// The decoded request path without its query string, exactly as
    /// prometheus-flask-exporter's default.
    Raw,
    /// Flask's rule: from user rules, else learned from traffic.
    Route,
}

/// The value used once a workload has more distinct paths than allowed.
pub const OVERFLOW_PATH: &str = "<other>";

/// Trie nodes one workload's learner may hold.
const MAX_LEARNER_NODES: usize = 20_000;
/// Sample paths kept per route, and their length.
const SAMPLES_PER_ROUTE: usize = 5;
const SAMPLE_CHARS: usize = 120;

/// What Werkzeug makes `request.path` from a request target: no query or
/// fragment, percent-decoded as UTF-8 (invalid bytes replaced), one leading
/// slash.
pub fn request_path(target: &str) -> String {
    // Absolute-form targets ("http://host/path") carry scheme and authority.
    let target = match target.split_once("://") {
        Some((scheme, rest)) if !scheme.contains('/') => {
            rest.find('/').map_or("/", |slash| &rest[slash..])
        }
        _ => target,
    };
    let end = target.find(['?', '#']).unwrap_or(target.len());
    let decoded = percent_decode_str(&target[..end]).decode_utf8_lossy();
    format!("/{}", decoded.trim_start_matches('/'))
}

/// Where a route's name came from (shown by `/debug/routes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteSource {
    /// A user rule matched.
    UserRule,
    /// A template with a parameter learned from the workload's traffic.
    Learned,
    /// Literal segments and parameters typed by how values look.
    Heuristic,
    /// The request path as is (`--path-label raw`).
    Raw,
    /// No route takes the request.
    Unmatched,
    /// Past the workload's cap.
    Overflow,
}

/// Statistics of one route of one workload.
#[derive(Clone, Debug)]
pub struct RouteStats {
    pub source: RouteSource,
    pub requests: u64,
    pub methods: BTreeMap<String, u64>,
    pub statuses: BTreeMap<u16, u64>,
    /// Counts per bucket of [`DURATION_BUCKETS`], plus one for +Inf.
    pub buckets: [u64; DURATION_BUCKETS.len() + 1],
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
    /// Request paths (no query string), at most [`SAMPLES_PER_ROUTE`].
    pub samples: Vec<String>,
}

impl RouteStats {
    fn new(source: RouteSource, now: SystemTime) -> Self {
        RouteStats {
            source,
            requests: 0,
            methods: BTreeMap::new(),
            statuses: BTreeMap::new(),
            buckets: [0; DURATION_BUCKETS.len() + 1],
            first_seen: now,
            last_seen: now,
            samples: Vec::new(),
        }
    }

    fn record(&mut self, method: &str, path: &str, status: u16, seconds: f64, now: SystemTime) {
        self.requests += 1;
        // Look up before inserting: most requests repeat a known method.
        match self.methods.get_mut(method) {
            Some(count) => *count += 1,
            None => {
                self.methods.insert(method.to_owned(), 1);
            }
        }
        *self.statuses.entry(status).or_default() += 1;
        let bucket = DURATION_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(DURATION_BUCKETS.len());
        self.buckets[bucket] += 1;
        self.last_seen = now;
        if self.samples.len() < SAMPLES_PER_ROUTE && !self.samples.iter().any(|s| s == path) {
            let mut sample: String = path.chars().take(SAMPLE_CHARS).collect();
            if path.chars().count() > SAMPLE_CHARS {
                sample.push('…');
            }
            self.samples.push(sample);
        }
    }

    /// Adds another route's statistics (a route merged into this one).
    fn absorb(&mut self, other: RouteStats) {
        self.requests += other.requests;
        for (method, count) in other.methods {
            *self.methods.entry(method).or_default() += count;
        }
        for (status, count) in other.statuses {
            *self.statuses.entry(status).or_default() += count;
        }
        for (mine, theirs) in self.buckets.iter_mut().zip(other.buckets) {
            *mine += theirs;
        }
        self.first_seen = self.first_seen.min(other.first_seen);
        self.last_seen = self.last_seen.max(other.last_seen);
        for sample in other.samples {
            if self.samples.len() < SAMPLES_PER_ROUTE && !self.samples.contains(&sample) {
                self.samples.push(sample);
            }
        }
    }

    /// The q-quantile of durations, interpolated within buckets as
    /// Prometheus' `histogram_quantile` does.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.requests == 0 {
            return None;
        }
        let rank = q * self.requests as f64;
        let mut below = 0u64;
        for (index, count) in self.buckets.iter().enumerate() {
            if (below + count) as f64 >= rank && *count > 0 {
                let Some(&upper) = DURATION_BUCKETS.get(index) else {
                    // In +Inf: Prometheus answers the highest finite bound.
                    return DURATION_BUCKETS.last().copied();
                };
                let lower = if index == 0 {
                    0.0
                } else {
                    DURATION_BUCKETS[index - 1]
                };
                let within = (rank - below as f64) / *count as f64;
                return Some(lower + (upper - lower) * within);
            }
            below += count;
        }
        DURATION_BUCKETS.last().copied()
    }
}

/// A copy of one workload's routes, for `/debug/routes`.
#[derive(Clone, Debug)]
pub struct WorkloadRoutesView {
    pub workload: IdentityLabels,
    pub routes: Vec<(Arc<str>, RouteStats)>,
    /// Size of the learned route trie.
    pub learned_nodes: usize,
}

/// One workload's routes.
#[derive(Debug)]
struct WorkloadRoutes {
    learner: RouteLearner,
    routes: HashMap<Arc<str>, RouteStats>,
    /// Identities (series label sets) that map to this workload.
    identities: usize,
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
}

/// Makes `path` labels and keeps route statistics, per workload.
#[derive(Debug)]
pub struct RouteLabeler {
    options: RouteOptions,
    workloads: HashMap<IdentityLabels, WorkloadRoutes>,
    /// Series identity → its workload.
    workload_of: HashMap<IdentityLabels, IdentityLabels>,
    overflowed: u64,
    /// (workload, path label) of routes a learned parameter replaced, for
    /// the metrics stage to remove.
    retired: Vec<(IdentityLabels, Arc<str>)>,
    retired_total: u64,
}

impl RouteLabeler {
    pub fn new(options: RouteOptions) -> Self {
        RouteLabeler {
            options,
            workloads: HashMap::new(),
            workload_of: HashMap::new(),
            overflowed: 0,
            retired: Vec::new(),
            retired_total: 0,
        }
    }

    /// Routes replaced by a learned parameter since the last call: their
    /// series should go (their requests now count under the template).
    pub fn take_retired(&mut self) -> Vec<(IdentityLabels, Arc<str>)> {
        self.retired_total += self.retired.len() as u64;
        std::mem::take(&mut self.retired)
    }

    /// Routes retired so far.
    pub fn retired_total(&self) -> u64 {
        self.retired_total
    }

    /// The `path` label of an exchange served by `identity` (of
    /// `workload`), and its route's statistics updated. `rules`: the
    /// workload's own user rules (a pod annotation), tried before the
    /// global ones.
    pub fn label(
        &mut self,
        identity: &IdentityLabels,
        workload: &dyn Fn() -> IdentityLabels,
        rules: Option<&RuleSet>,
        exchange: &Exchange,
    ) -> Arc<str> {
        let key = match self.workload_of.get(identity) {
            Some(key) => key.clone(),
            None => {
                let key = workload();
                self.workload_of.insert(identity.clone(), key.clone());
                let options = &self.options;
                self.workloads
                    .entry(key.clone())
                    .or_insert_with(|| WorkloadRoutes {
                        learner: RouteLearner::new(options.segment_cap, MAX_LEARNER_NODES),
                        routes: HashMap::new(),
                        identities: 0,
                    })
                    .identities += 1;
                key
            }
        };
        let Some(routes) = self.workloads.get_mut(&key) else {
            return Arc::from(NO_RULE);
        };
        let path = request_path(&exchange.target);
        let (label, source) = name_route(&self.options, rules, routes, &path, exchange);
        for prefix in routes.learner.take_retired() {
            retire(routes, &prefix, &key, &mut self.retired);
        }
        let now = SystemTime::now();
        let seconds = exchange.duration_seconds();
        if let Some((known, _)) = routes.routes.get_key_value(label.as_str()) {
            let known = known.clone();
            if let Some(stats) = routes.routes.get_mut(&known) {
                stats.record(&exchange.method, &path, exchange.status, seconds, now);
            }
            return known;
        }
        let (label, source) = if routes.routes.len() >= self.options.max_paths_per_workload {
            self.overflowed += 1;
            (OVERFLOW_PATH.to_owned(), RouteSource::Overflow)
        } else {
            (label, source)
        };
        let label: Arc<str> = Arc::from(label);
        let stats = routes
            .routes
            .entry(label.clone())
            .or_insert_with(|| RouteStats::new(source, now));
        stats.record(&exchange.method, &path, exchange.status, seconds, now);
        label
    }

    /// Forgets an identity whose series were removed; its workload's routes
    /// go with the workload's last identity.
    pub fn forget(&mut self, identity: &IdentityLabels) {
        let Some(key) = self.workload_of.remove(identity) else {
            return;
        };
        if let Some(routes) = self.workloads.get_mut(&key) {
            routes.identities = routes.identities.saturating_sub(1);
            if routes.identities == 0 {
                self.workloads.remove(&key);
            }
        }
    }

    /// Requests whose path was replaced by [`OVERFLOW_PATH`].
    pub fn overflowed(&self) -> u64 {
        self.overflowed
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
    workload: &IdentityLabels,
    retired: &mut Vec<(IdentityLabels, Arc<str>)>,
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
                .or_insert_with(|| RouteStats::new(source, stats.first_seen))
                .absorb(stats);
        }
        retired.push((workload.clone(), label));
    }
}

/// The label a request gets before the workload's cap.
fn name_route(
    options: &RouteOptions,
    rules: Option<&RuleSet>,
    routes: &mut WorkloadRoutes,
    path: &str,
    exchange: &Exchange,
) -> (String, RouteSource) {
    if options.mode == PathLabelMode::Raw {
        return (path.to_owned(), RouteSource::Raw);
    }
    let rule_sets = rules.into_iter().chain(Some(options.user_rules.as_ref()));
    let mut have_rules = false;
    for set in rule_sets.filter(|set| !set.is_empty()) {
        have_rules = true;
        if let RuleMatch::Rule(rule) = set.match_path(path, &exchange.method) {
            return (rule.to_owned(), RouteSource::UserRule);
        }
    }
    // Flask's router answers what no rule takes with 404, 405 (another
    // method) or 308 (a missing trailing slash): no url_rule.
    let router_answer = matches!(exchange.status, 404 | 405 | 308);
    if have_rules && router_answer {
        return (NO_RULE.to_owned(), RouteSource::Unmatched);
    }
    let fitted = if exchange.status == 404 {
        routes.learner.fit(path)
    } else {
        Some(routes.learner.learn(path))
    };
    match fitted {
        Some((template, Learned::Learned)) => (template, RouteSource::Learned),
        Some((template, Learned::Heuristic)) => (template, RouteSource::Heuristic),
        None => (NO_RULE.to_owned(), RouteSource::Unmatched),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        Exchange {
            method: method.to_owned(),
            target: target.to_owned(),
            status,
            started_ns: 0,
            finished_ns: (seconds * 1e9) as u64,
            request_bytes: 0,
            response_bytes: 0,
        }
    }

    fn labeler(mode: PathLabelMode, cap: usize, rules: &str) -> RouteLabeler {
        let (rules, errors) = RuleSet::parse(rules);
        assert!(errors.is_empty());
        RouteLabeler::new(RouteOptions {
            mode,
            max_paths_per_workload: cap,
            segment_cap: 4,
            user_rules: Arc::new(rules),
        })
    }

    fn ids(names: &[&str]) -> IdentityLabels {
        Arc::from(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
    }

    #[test]
    fn user_rules_first_then_learned_then_none() {
        let mut labeler = labeler(PathLabelMode::Route, 100, "GET /items/<int:item_id>\n");
        let pod = ids(&["shop", "web-1", "web", "web", "Deployment"]);
        let workload = || ids(&["shop", "web", "Deployment"]);
        let mut label = |method: &str, target: &str, status: u16| {
            labeler
                .label(
                    &pod,
                    &workload,
                    None,
                    &exchange(method, target, status, 0.01),
                )
                .to_string()
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
        let server = ids(&["gunicorn", "8000"]);
        let workload = || server.clone();
        let mut label = |target: &str, status: u16| {
            labeler
                .label(
                    &server,
                    &workload,
                    None,
                    &exchange("GET", target, status, 0.01),
                )
                .to_string()
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
        assert_eq!(labeler.overflowed(), 1);
    }

    #[test]
    fn literal_routes_a_parameter_replaces_are_retired() {
        let mut labeler = labeler(PathLabelMode::Route, 100, "");
        let server = ids(&["gunicorn", "8000"]);
        let workload = || server.clone();
        for tag in ["a", "b", "c", "d"] {
            labeler.label(
                &server,
                &workload,
                None,
                &exchange("GET", &format!("/tags/{tag}"), 200, 0.01),
            );
            labeler.label(
                &server,
                &workload,
                None,
                &exchange("GET", &format!("/tags/{tag}/related"), 200, 0.01),
            );
        }
        assert!(labeler.take_retired().is_empty());
        let label = labeler.label(
            &server,
            &workload,
            None,
            &exchange("GET", "/tags/e", 200, 0.01),
        );
        assert_eq!(&*label, "/tags/<string>");
        let mut retired: Vec<String> = labeler
            .take_retired()
            .into_iter()
            .map(|(key, path)| {
                assert_eq!(key, server);
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
        assert_eq!(labeler.retired_total(), 8);
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
        let server = ids(&["python", "5000"]);
        let workload = || server.clone();
        for (status, seconds) in [(200, 0.004), (200, 0.02), (500, 0.3), (200, 0.02)] {
            labeler.label(
                &server,
                &workload,
                None,
                &exchange("GET", "/a/1?q=secret", status, seconds),
            );
        }
        labeler.label(
            &server,
            &workload,
            None,
            &exchange("POST", "/a/1", 201, 0.02),
        );
        let snapshot = labeler.snapshot();
        let (label, stats) = &snapshot[0].routes[0];
        assert_eq!(&**label, "/a/1");
        assert_eq!(stats.source, RouteSource::Raw);
        assert_eq!(stats.requests, 5);
        assert_eq!(stats.methods.get("POST"), Some(&1));
        assert_eq!(stats.statuses.get(&500), Some(&1));
        assert_eq!(stats.samples, ["/a/1"], "no query strings");
        // 1 in le=.005, 3 in (.01, .025], 1 in (.25, .5]: p50 in the third.
        let p50 = stats.quantile(0.5).expect("p50");
        assert!((0.01..=0.025).contains(&p50), "{p50}");
        let p99 = stats.quantile(0.99).expect("p99");
        assert!((0.25..=0.5).contains(&p99), "{p99}");
        labeler.forget(&server);
        assert!(labeler.snapshot().is_empty());
    }
}
