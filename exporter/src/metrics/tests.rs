//! The metrics stage against a real registry, read back as exposition text.

use super::*;
use crate::{
    exchange::{Exchange, IdentityLabels, PodGrain, PodLabels, RouteSource},
    telemetry::encode,
};

fn exchange(
    identity: &Arc<Identity>,
    method: &str,
    status: u16,
    seconds: f64,
) -> AttributedExchange {
    AttributedExchange {
        identity: identity.clone(),
        rules: None,
        tgid: 1,
        exchange: Exchange::sample(method, "/", status, seconds),
    }
}

fn budgets(registry: &Registry) -> Budgets {
    Budgets::register(registry).expect("budgets")
}

/// Request metrics of local mode's identity labels.
fn request_metrics(registry: &Registry, options: SeriesOptions) -> RequestMetrics {
    RequestMetrics::register(registry, &["process", "port"], &budgets(registry), options)
        .expect("metrics")
}

fn options(max_series_per_workload: usize) -> SeriesOptions {
    SeriesOptions {
        max_series_per_workload,
        ..SeriesOptions::default()
    }
}

fn route(path: &str) -> Route {
    Route {
        path: Arc::from(path),
        endpoint: None,
        source: RouteSource::Raw,
    }
}

fn server(port: &str) -> Arc<Identity> {
    Arc::new(Identity::new(IdentityLabels::Server {
        process: "gunicorn".to_owned(),
        port: port.to_owned(),
    }))
}

#[test]
fn exposes_pfe_names_labels_and_buckets() {
    let registry = Registry::new();
    let mut metrics = request_metrics(&registry, options(100));
    let identity = server("8000");
    metrics.observe(&exchange(&identity, "GET", 200, 0.3), &route("/a"));
    metrics.observe(&exchange(&identity, "GET", 500, 0.001), &route("/a"));
    metrics.observe(&exchange(&identity, "BREW", 418, 0.001), &route("/pot"));
    let text = encode(&registry).expect("encode");
    assert!(text.contains(
        "flask_http_request_duration_seconds_bucket{method=\"GET\",path=\"/a\",port=\"8000\",process=\"gunicorn\",status=\"200\",le=\"0.5\"} 1"
    ), "{text}");
    assert!(text.contains(
        "flask_http_request_duration_seconds_bucket{method=\"GET\",path=\"/a\",port=\"8000\",process=\"gunicorn\",status=\"200\",le=\"0.25\"} 0"
    ));
    assert!(text.contains("flask_http_request_total{method=\"GET\",port=\"8000\",process=\"gunicorn\",status=\"500\"} 1"));
    assert!(text.contains("flask_http_request_exceptions_total{method=\"GET\",port=\"8000\",process=\"gunicorn\",status=\"500\"} 1"));
    assert!(!text.contains("flask_http_request_exceptions_total{method=\"GET\",port=\"8000\",process=\"gunicorn\",status=\"200\""));
    assert!(text.contains("flask_http_request_total{method=\"OTHER\",port=\"8000\",process=\"gunicorn\",status=\"418\"} 1"));
    assert!(text.contains("flask_exporter_info{version="));

    let other = server("9000");
    metrics.observe(&exchange(&other, "GET", 200, 0.3), &route("/a"));
    // Histogram series (3) + request totals (3) + one exception total +
    // requests seen and lost by reason (4).
    assert_eq!(metrics.release(&identity), 11);
    let text = encode(&registry).expect("encode");
    assert!(!text.contains("port=\"8000\""), "{text}");
    assert!(text.contains("flask_http_request_total{method=\"GET\",port=\"9000\",process=\"gunicorn\",status=\"200\"} 1"));
    assert_eq!(metrics.release(&identity), 0);

    metrics.observe(&exchange(&other, "GET", 200, 0.3), &route("/b"));
    let removed = metrics.retire_route(&other.workload, "/a");
    assert_eq!(removed, 1, "the /a histogram series of port 9000 only");
    let text = encode(&registry).expect("encode");
    assert!(!text.contains("path=\"/a\""), "{text}");
    assert!(text.contains("path=\"/b\""));
    // Request totals carry no path and stay.
    assert!(text.contains("flask_http_request_total{method=\"GET\",port=\"9000\",process=\"gunicorn\",status=\"200\"} 2"));
}

#[test]
fn group_by_names_the_route_label_and_a_summary_replaces_the_histogram() {
    let registry = Registry::new();
    let mut metrics = request_metrics(
        &registry,
        SeriesOptions {
            group_by: GroupBy::Endpoint,
            latency_as_histogram: false,
            ..SeriesOptions::default()
        },
    );
    let identity = server("8000");
    let rule = |path: &str, endpoint: Option<&str>| Route {
        path: Arc::from(path),
        endpoint: endpoint.map(Arc::from),
        source: RouteSource::SourceRule,
    };
    // Two rules of one view count as its endpoint; a route with no
    // endpoint keeps its rule.
    metrics.observe(
        &exchange(&identity, "GET", 200, 0.25),
        &rule("/", Some("index")),
    );
    metrics.observe(
        &exchange(&identity, "GET", 200, 0.5),
        &rule("/index", Some("index")),
    );
    metrics.observe(
        &exchange(&identity, "GET", 200, 0.5),
        &rule("/learned/<id>", None),
    );
    metrics.observe(&exchange(&identity, "GET", 404, 0.5), &rule("None", None));
    let text = encode(&registry).expect("encode");
    assert!(
        text.contains("# TYPE flask_http_request_duration_seconds summary"),
        "{text}"
    );
    assert!(text.contains("flask_http_request_duration_seconds_count{endpoint=\"index\",method=\"GET\",port=\"8000\",process=\"gunicorn\",status=\"200\"} 2"), "{text}");
    assert!(text.contains("flask_http_request_duration_seconds_sum{endpoint=\"index\",method=\"GET\",port=\"8000\",process=\"gunicorn\",status=\"200\"} 0.75"));
    assert!(text.contains("endpoint=\"/learned/<id>\""));
    assert!(text.contains("endpoint=\"None\""));
    assert!(!text.contains("path=\""), "no path label: {text}");
    assert!(!text.contains("_bucket"), "{text}");

    let registry = Registry::new();
    let mut metrics = request_metrics(
        &registry,
        SeriesOptions {
            group_by: GroupBy::UrlRule,
            buckets: vec![0.1, 1.0],
            body_sizes: BodySizes::Summary,
            ..SeriesOptions::default()
        },
    );
    let mut sized = exchange(&identity, "GET", 200, 0.25);
    sized.exchange.response_body_bytes = Some(100);
    metrics.observe(&sized, &rule("/", Some("index")));
    let text = encode(&registry).expect("encode");
    let buckets: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with("flask_http_request_duration_seconds_bucket"))
        .collect();
    assert_eq!(buckets.len(), 3, "0.1, 1 and +Inf: {buckets:?}");
    assert!(text.contains("flask_http_request_duration_seconds_bucket{method=\"GET\",port=\"8000\",process=\"gunicorn\",status=\"200\",url_rule=\"/\",le=\"1\"} 1"), "{text}");
    // Our own per-route families take the same label.
    assert!(text.contains("flask_http_response_size_bytes_count{method=\"GET\",port=\"8000\",process=\"gunicorn\",url_rule=\"/\"} 1"), "{text}");
    assert!(!text.contains("path=\""), "{text}");
}

#[test]
fn the_node_bound_refuses_new_series_and_keeps_the_ones_made() {
    let registry = Registry::new();
    let mut metrics = request_metrics(
        &registry,
        SeriesOptions {
            max_series: 4,
            ..SeriesOptions::default()
        },
    );
    let (a, b) = (server("8000"), server("9000"));
    // Two workloads, a duration and a request total each: the node's 4.
    metrics.observe(&exchange(&a, "GET", 200, 0.01), &route("/a"));
    metrics.observe(&exchange(&b, "GET", 200, 0.01), &route("/a"));
    // A new route of either is refused, and counted under the overflow
    // path and its status's class; what was made keeps counting.
    metrics.observe(&exchange(&b, "GET", 200, 0.01), &route("/b"));
    metrics.observe(&exchange(&a, "GET", 200, 0.01), &route("/a"));
    let text = encode(&registry).expect("encode");
    let duration = |port: &str, path: &str, status: &str| {
        format!(
            "flask_http_request_duration_seconds_count{{method=\"GET\",path=\"{path}\",port=\"{port}\",process=\"gunicorn\",status=\"{status}\"}}"
        )
    };
    assert!(
        text.contains(&format!("{} 2", duration("8000", "/a", "200"))),
        "{text}"
    );
    assert!(
        text.contains(&format!("{} 1", duration("9000", "/a", "200"))),
        "{text}"
    );
    assert!(
        text.contains(&format!("{} 1", duration("9000", OVERFLOW_PATH, "2xx"))),
        "{text}"
    );
    assert!(!text.contains("path=\"/b\""), "{text}");
    assert!(
        text.contains("flask_ebpf_exporter_budget_exhausted_total{budget=\"node_series\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("flask_ebpf_exporter_budget_exhausted_total{budget=\"series\"} 0"),
        "{text}"
    );
    // A released workload gives its room back.
    metrics.release(&a);
    metrics.observe(&exchange(&b, "GET", 200, 0.01), &route("/b"));
    let text = encode(&registry).expect("encode");
    assert!(
        text.contains(&format!("{} 1", duration("9000", "/b", "200"))),
        "{text}"
    );
}

#[test]
fn body_sizes_are_off_by_default_and_a_count_and_a_sum_or_buckets_when_asked() {
    let identity = server("8000");
    let mut sized = exchange(&identity, "POST", 201, 0.01);
    sized.exchange.request_body_bytes = Some(300);
    sized.exchange.response_body_bytes = Some(20);
    let size_lines = |options: SeriesOptions| {
        let registry = Registry::new();
        let mut metrics = request_metrics(&registry, options);
        metrics.observe(&sized, &route("/orders"));
        let text = encode(&registry).expect("encode");
        text.lines()
            .filter(|line| line.contains("_size_bytes") && !line.starts_with('#'))
            .map(str::to_owned)
            .collect::<Vec<String>>()
    };
    assert_eq!(size_lines(SeriesOptions::default()), Vec::<String>::new());
    let summaries = size_lines(SeriesOptions {
        body_sizes: BodySizes::Summary,
        ..SeriesOptions::default()
    });
    assert_eq!(summaries.len(), 4, "a count and a sum each: {summaries:?}");
    assert!(summaries.contains(&"flask_http_request_size_bytes_sum{method=\"POST\",path=\"/orders\",port=\"8000\",process=\"gunicorn\"} 300".to_owned()), "{summaries:?}");
    assert!(summaries.contains(&"flask_http_response_size_bytes_count{method=\"POST\",path=\"/orders\",port=\"8000\",process=\"gunicorn\"} 1".to_owned()), "{summaries:?}");
    let histograms = size_lines(SeriesOptions {
        body_sizes: BodySizes::Histogram,
        ..SeriesOptions::default()
    });
    assert_eq!(
        histograms.len(),
        2 * (SIZE_BUCKETS.len() + 3),
        "buckets, +Inf, count and sum each: {histograms:?}"
    );
    assert!(histograms.contains(&"flask_http_request_size_bytes_bucket{method=\"POST\",path=\"/orders\",port=\"8000\",process=\"gunicorn\",le=\"256\"} 0".to_owned()), "{histograms:?}");
}

#[test]
fn opentelemetry_names_label_as_the_conventions_translate() {
    // Body sizes, optional in the conventions, follow --body-sizes: none
    // by default.
    let registry = Registry::new();
    let mut metrics = request_metrics(
        &registry,
        SeriesOptions {
            names: MetricNames::Otel,
            ..SeriesOptions::default()
        },
    );
    let mut sized = exchange(&server("8000"), "GET", 200, 0.25);
    sized.exchange.response_body_bytes = Some(100);
    metrics.observe(&sized, &route("/"));
    let text = encode(&registry).expect("encode");
    assert!(
        text.contains("http_server_request_duration_seconds_count{"),
        "{text}"
    );
    assert!(!text.contains("body_size"), "{text}");

    let registry = Registry::new();
    let mut metrics = request_metrics(
        &registry,
        SeriesOptions {
            names: MetricNames::Otel,
            body_sizes: BodySizes::Histogram,
            ..SeriesOptions::default()
        },
    );
    let identity = server("8000");
    let rule = |path: &str, source| Route {
        path: Arc::from(path),
        endpoint: None,
        source,
    };
    let mut served = exchange(&identity, "GET", 200, 0.25);
    served.exchange.server_port = Some(8000);
    served.exchange.response_body_bytes = Some(100);
    metrics.observe(&served, &rule("/items/<int:id>", RouteSource::SourceRule));
    let mut failed = exchange(&identity, "BREW", 500, 0.25);
    failed.exchange.version = http::Version::HTTP_10;
    metrics.observe(&failed, &rule("/items/<int:id>", RouteSource::SourceRule));
    metrics.observe(
        &exchange(&identity, "GET", 404, 0.25),
        &rule("None", RouteSource::Unmatched),
    );
    metrics.set_saturation(&HashMap::new(), &|_| true, &NoNetwork);
    let text = encode(&registry).expect("encode");
    assert!(text.contains("http_server_request_duration_seconds_count{error_type=\"\",http_request_method=\"GET\",http_response_status_code=\"200\",http_route=\"/items/<int:id>\",network_protocol_version=\"1.1\",port=\"8000\",process=\"gunicorn\",server_port=\"8000\",url_scheme=\"http\"} 1"), "{text}");
    assert!(text.contains("http_server_request_duration_seconds_count{error_type=\"500\",http_request_method=\"_OTHER\",http_response_status_code=\"500\",http_route=\"/items/<int:id>\",network_protocol_version=\"1.0\",port=\"8000\",process=\"gunicorn\",server_port=\"\",url_scheme=\"http\"} 1"), "{text}");
    assert!(
        text.contains("http_route=\"\""),
        "no route for the router's 404: {text}"
    );
    assert!(text.contains("http_server_response_body_size_bytes_sum{error_type=\"\",http_request_method=\"GET\",http_response_status_code=\"200\",http_route=\"/items/<int:id>\",network_protocol_version=\"1.1\",port=\"8000\",process=\"gunicorn\",server_port=\"8000\",url_scheme=\"http\"} 100"), "{text}");
    assert!(
        text.contains(
            "http_server_active_requests{port=\"8000\",process=\"gunicorn\",url_scheme=\"http\"} 0"
        ),
        "{text}"
    );
    // What the conventions name goes by their names only; what they do
    // not keeps prometheus-flask-exporter's style.
    for gone in [
        "flask_http_request_duration_seconds",
        "flask_http_request_total",
        "flask_http_requests_in_flight",
        "flask_http_response_size_bytes",
    ] {
        assert!(!text.contains(&format!("# TYPE {gone} ")), "{gone}: {text}");
    }
    assert!(text.contains("flask_http_requests_seen_total{port=\"8000\",process=\"gunicorn\"} 3"));
    // Released with their identity.
    assert!(metrics.release(&identity) > 0);
    let text = encode(&registry).expect("encode");
    assert!(!text.contains("port=\"8000\""), "{text}");
}

#[test]
fn identities_with_the_same_labels_share_their_series() {
    let registry = Registry::new();
    let mut metrics = request_metrics(&registry, options(100));
    let (first, again) = (server("8000"), server("8000"));
    metrics.observe(&exchange(&first, "GET", 200, 0.01), &route("/a"));
    metrics.observe(&exchange(&again, "GET", 200, 0.01), &route("/a"));
    let text = encode(&registry).expect("encode");
    assert!(text.contains("flask_http_request_total{method=\"GET\",port=\"8000\",process=\"gunicorn\",status=\"200\"} 2"), "{text}");
    // One histogram and one total, requests seen and lost by reason.
    assert_eq!(metrics.release(&again), 6);
    assert!(
        !encode(&registry)
            .expect("encode")
            .contains("flask_http_request_total{")
    );
}

/// The `label` values of the lines of `family` (by prefix), sorted.
fn label_values(registry: &Registry, family: &str, label: &str) -> Vec<String> {
    let text = encode(registry).expect("encode");
    let mut values: Vec<String> = text
        .lines()
        .filter(|line| line.starts_with(family))
        .filter_map(|line| {
            line.split(&format!("{label}=\""))
                .nth(1)?
                .split('"')
                .next()
                .map(str::to_owned)
        })
        .collect();
    values.sort();
    values
}

#[test]
fn a_workload_past_its_series_budget_counts_under_other() {
    let registry = Registry::new();
    let budgets = budgets(&registry);
    // Room for the request total of (GET, 200) and three durations.
    let mut metrics =
        RequestMetrics::register(&registry, &["process", "port"], &budgets, options(4))
            .expect("metrics");
    let identity = server("8000");
    for n in 0..10 {
        metrics.observe(
            &exchange(&identity, "GET", 200, 0.01),
            &route(&format!("/p{n}")),
        );
    }
    let paths = |registry: &Registry| -> Vec<String> {
        let text = encode(registry).expect("encode");
        let mut paths: Vec<String> = text
            .lines()
            .filter(|line| line.starts_with("flask_http_request_duration_seconds_count"))
            .filter_map(|line| {
                line.split("path=\"")
                    .nth(1)?
                    .split('"')
                    .next()
                    .map(str::to_owned)
            })
            .collect();
        paths.sort();
        paths
    };
    assert_eq!(paths(&registry), ["/p0", "/p1", "/p2", OVERFLOW_PATH]);
    assert_eq!(budgets.counter(Budget::Series).get(), 7);
    assert_eq!(
        label_values(
            &registry,
            "flask_http_request_duration_seconds_count",
            "status"
        ),
        ["200", "200", "200", "2xx"]
    );
    // A retired route frees its room.
    assert_eq!(metrics.retire_route(&identity.workload, "/p0"), 1);
    metrics.observe(&exchange(&identity, "GET", 200, 0.01), &route("/p9"));
    assert_eq!(paths(&registry), ["/p1", "/p2", "/p9", OVERFLOW_PATH]);
}

/// Statuses are written by the app: any three digits parse. Those
/// outside HTTP's share one value, and no family grows past the
/// budget by statuses, the request total included.
#[test]
fn statuses_share_one_value_outside_http_and_stay_within_the_budget() {
    let registry = Registry::new();
    let budgets = budgets(&registry);
    let mut metrics =
        RequestMetrics::register(&registry, &["process", "port"], &budgets, options(20))
            .expect("metrics");
    let identity = server("8000");
    for status in [600, 999, 0, 700] {
        metrics.observe(&exchange(&identity, "GET", status, 0.01), &route("/"));
    }
    assert_eq!(
        label_values(&registry, "flask_http_request_total", "status"),
        ["<other>"]
    );
    for status in 100..600 {
        metrics.observe(&exchange(&identity, "GET", status, 0.01), &route("/"));
    }
    let totals = label_values(&registry, "flask_http_request_total", "status");
    let durations = label_values(
        &registry,
        "flask_http_request_duration_seconds_count",
        "status",
    );
    // 20 series of room: the <other> duration and total, then nine of
    // each; past it, the classes.
    assert_eq!(
        totals.len() + durations.len(),
        20 + 2 * 5,
        "{totals:?} {durations:?}"
    );
    for classes in [&totals, &durations] {
        for class in ["1xx", "2xx", "3xx", "4xx", "5xx"] {
            assert!(
                classes.iter().any(|value| value == class),
                "{class} in {classes:?}"
            );
        }
    }
    assert_eq!(budgets.counter(Budget::Series).get(), 2 * (500 - 9));
}

/// Each line of the exposition, without the `pod` and `container` labels,
/// summed by what is left.
fn summed_without_pods(text: &str) -> std::collections::BTreeMap<String, f64> {
    let pod_labels = regex::Regex::new(r#"([{,])(?:pod|container)="[^"]*""#).expect("regex");
    let mut sums = std::collections::BTreeMap::new();
    for line in text.lines().filter(|line| line.starts_with("flask_http_")) {
        let (series, value) = line.rsplit_once(' ').expect("a sample");
        let kept = pod_labels
            .replace_all(series, "$1")
            .replace("{,", "{")
            .replace(",,", ",")
            .replace(",}", "}");
        *sums.entry(kept).or_insert(0.0) += value.parse::<f64>().expect("a value");
    }
    sums
}

fn pod_identity(grain: PodGrain, pod: &str, container: &str) -> Arc<Identity> {
    Arc::new(Identity::new(grain.labels(PodLabels {
        namespace: "shop",
        pod,
        container,
        workload: "cart",
        workload_kind: "Deployment",
    })))
}

/// The same exchanges observed per container and per workload: every
/// aggregated series, buckets included, is the sum of the finer ones.
#[test]
fn aggregated_series_are_the_sums_of_the_per_pod_ones() {
    let register = |grain: PodGrain| {
        let registry = Registry::new();
        let metrics = RequestMetrics::register(
            &registry,
            grain.label_names(),
            &budgets(&registry),
            SeriesOptions {
                body_sizes: BodySizes::Histogram,
                queue_buckets: true,
                ..SeriesOptions::default()
            },
        )
        .expect("metrics");
        (registry, metrics)
    };
    let (fine_registry, mut fine) = register(PodGrain::Container);
    let (coarse_registry, mut coarse) = register(PodGrain::Workload);
    let members = [("cart-a", "web"), ("cart-b", "web"), ("cart-b", "sidecar")];
    for (n, (pod, container)) in members.into_iter().cycle().take(30).enumerate() {
        let tgid = 100 + n as u32;
        let observed = |grain: PodGrain, metrics: &mut RequestMetrics| {
            let mut sent = exchange(
                &pod_identity(grain, pod, container),
                ["GET", "POST"][n % 2],
                [200, 404, 500][n % 3],
                0.001 * (n * n) as f64,
            );
            sent.tgid = tgid;
            sent.exchange.request_body_bytes = Some(10 * n as u64);
            sent.exchange.queued = Some(crate::exchange::Queued {
                handshake_ns: 0,
                accepted_ns: 1_000 * n as u64,
            });
            metrics.observe(&sent, &route(["/a", "/b/<id>"][n % 2]));
            metrics.record_lost(
                &sent.identity,
                LostRequests {
                    abandoned: (n % 4 == 0) as u32,
                    ..LostRequests::default()
                },
            );
        };
        observed(PodGrain::Container, &mut fine);
        observed(PodGrain::Workload, &mut coarse);
    }
    fine.set_saturation(&HashMap::new(), &|_| true, &NoNetwork);
    coarse.set_saturation(&HashMap::new(), &|_| true, &NoNetwork);
    let (fine_text, coarse_text) = (
        encode(&fine_registry).expect("encode"),
        encode(&coarse_registry).expect("encode"),
    );
    assert!(!coarse_text.contains("pod=\""), "{coarse_text}");
    let (expected, got) = (
        summed_without_pods(&fine_text),
        summed_without_pods(&coarse_text),
    );
    assert!(expected.keys().any(|series| series.contains("_bucket")));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (series, want) in &expected {
        let have = got[series];
        assert!(
            (have - want).abs() < 1e-9,
            "{series}: {have} against {want}"
        );
    }
    assert!(coarse_text.lines().count() < fine_text.lines().count());
}

/// Network namespaces by process, each with its overflow count.
struct Namespaces(HashMap<u32, (u64, u64)>);

impl NetworkCounts for Namespaces {
    fn namespace(&self, tgid: u32) -> Option<u64> {
        self.0.get(&tgid).map(|(namespace, _)| *namespace)
    }
    fn own_namespace(&self) -> Option<u64> {
        Some(1)
    }
    fn listen_overflows(&self, tgid: u32) -> Option<u64> {
        self.0.get(&tgid).map(|(_, overflows)| *overflows)
    }
}

/// An aggregated identity's overflows are the sum over its pods' network
/// namespaces, each counted from when it was first read; a namespace it
/// shares with another identity, or the node's own, is not its own.
#[test]
fn listen_overflows_sum_the_namespaces_an_identity_has_to_itself() {
    let registry = Registry::new();
    let mut metrics = RequestMetrics::register(
        &registry,
        PodGrain::Workload.label_names(),
        &budgets(&registry),
        SeriesOptions::default(),
    )
    .expect("metrics");
    let cart = pod_identity(PodGrain::Workload, "cart-a", "web");
    let other = Arc::new(Identity::new(PodGrain::Workload.labels(PodLabels {
        namespace: "shop",
        pod: "db-0",
        container: "db",
        workload: "db",
        workload_kind: "StatefulSet",
    })));
    // cart: workers 11 and 12 in pod namespaces 10 and 20, 13 in the
    // node's; db: worker 21, sharing namespace 20.
    for (identity, tgid) in [(&cart, 11), (&cart, 12), (&cart, 13), (&other, 21)] {
        let mut sent = exchange(identity, "GET", 200, 0.01);
        sent.tgid = tgid;
        metrics.observe(&sent, &route("/"));
    }
    let overflows = |registry: &Registry| {
        label_values(registry, "flask_http_listen_overflows_total", "workload")
    };
    let cart_overflows = |registry: &Registry| -> Option<f64> {
        let text = encode(registry).expect("encode");
        text.lines()
            .find(|line| {
                line.starts_with("flask_http_listen_overflows_total")
                    && line.contains("workload=\"cart\"")
            })
            .and_then(|line| line.rsplit_once(' ')?.1.parse().ok())
    };
    let network = |a: u64, b: u64, node: u64| {
        Namespaces(HashMap::from([
            (11, (10, a)),
            (12, (20, b)),
            (13, (1, node)),
            (21, (20, b)),
        ]))
    };
    let running = |_| true;
    metrics.set_saturation(&HashMap::new(), &running, &network(5, 7, 100));
    assert_eq!(
        cart_overflows(&registry),
        Some(0.0),
        "first reading: a baseline"
    );
    metrics.set_saturation(&HashMap::new(), &running, &network(8, 9, 200));
    assert_eq!(
        cart_overflows(&registry),
        Some(3.0),
        "namespace 10 only: {:?}",
        overflows(&registry)
    );
    // db's worker exits: namespace 20 is cart's alone from now on.
    let running = |tgid| tgid != 21;
    metrics.set_saturation(&HashMap::new(), &running, &network(8, 9, 300));
    metrics.set_saturation(&HashMap::new(), &running, &network(10, 15, 400));
    assert_eq!(cart_overflows(&registry), Some(3.0 + 2.0 + 6.0));
}
