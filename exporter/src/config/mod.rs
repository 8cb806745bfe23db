//! Command line and environment: every flag also reads an environment
//! variable, so the DaemonSet can configure the agent either way.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use regex::Regex;

mod settings;

pub use self::settings::{ConfigError, Mode, RouteSettings, Settings, StageSettings};
use crate::{
    exchange::PodGrain,
    metrics::{BodySizes, GroupBy, MetricNames},
    routes::{PathLabelMode, discovery::RouteDiscovery},
};

#[derive(Clone, Debug, Parser)]
#[command(
    name = "flask-ebpf-exporter",
    version,
    about = "Per-route HTTP metrics for Flask apps, captured with eBPF, in prometheus-flask-exporter's format"
)]
pub struct Config {
    /// Address of the HTTP endpoints (/metrics, /healthz, /readyz).
    #[arg(
        long,
        value_name = "ADDR:PORT",
        env = "FLASK_EBPF_EXPORTER_LISTEN",
        default_value = "0.0.0.0:9810"
    )]
    pub listen: SocketAddr,

    /// prometheus-flask-exporter's `group_by`, which names the route label: `path`
    /// (its value set by --path-label), `url_rule` (Flask's rule) or `endpoint` (the
    /// view's endpoint, from the rules read from the app's source).
    #[arg(
        long,
        env = "FLASK_EBPF_EXPORTER_GROUP_BY",
        value_enum,
        default_value = "path"
    )]
    pub group_by: GroupBy,

    /// prometheus-flask-exporter's `excluded_paths`: requests whose path (no query string)
    /// matches this regular expression from its start, as Python's `re.match`, are not
    /// counted. Repeatable; the environment variable takes one a line.
    #[arg(long = "excluded-paths", value_name = "REGEX", env = "FLASK_EBPF_EXPORTER_EXCLUDED_PATHS",
          value_delimiter = '\n', value_parser = parse_regex)]
    pub excluded_paths: Vec<String>,

    /// prometheus-flask-exporter's `buckets`: upper bounds of the duration histogram's
    /// buckets in seconds, increasing, comma-separated (+Inf is always added);
    /// by default prometheus-flask-exporter's.
    #[arg(long, value_name = "SECONDS", env = "FLASK_EBPF_EXPORTER_BUCKETS", value_delimiter = ',',
          value_parser = parse_bucket)]
    pub buckets: Vec<f64>,

    /// prometheus-flask-exporter's `default_latency_as_histogram`: `false` exports
    /// durations as a summary (a count and a sum, no quantiles), as it does.
    #[arg(long, env = "FLASK_EBPF_EXPORTER_DEFAULT_LATENCY_AS_HISTOGRAM",
          default_value_t = true, action = clap::ArgAction::Set)]
    pub default_latency_as_histogram: bool,

    /// Request and response body sizes per route (flask_http_request_size_bytes,
    /// flask_http_response_size_bytes): `off` (prometheus-flask-exporter has none),
    /// `summary` (a count and a sum: mean sizes) or `histogram` (buckets too).
    #[arg(long, value_name = "SHAPE", env = "FLASK_EBPF_EXPORTER_BODY_SIZES", value_enum,
          default_value_t = BodySizes::Off)]
    pub body_sizes: BodySizes,

    /// Export queue time (flask_http_request_queue_seconds) as a histogram with
    /// buckets, for quantiles in PromQL, rather than as a summary of a count and a
    /// sum (the mean), which costs a tenth of the series.
    #[arg(long, env = "FLASK_EBPF_EXPORTER_QUEUE_TIME_BUCKETS")]
    pub queue_time_buckets: bool,

    /// Names of the request series: `flask` (prometheus-flask-exporter's), `otel`
    /// (OpenTelemetry's HTTP server conventions, as its Prometheus exporters name them:
    /// http_server_request_duration_seconds, ...) or `both`.
    #[arg(
        long,
        env = "FLASK_EBPF_EXPORTER_METRIC_NAMES",
        value_enum,
        default_value = "flask"
    )]
    pub metric_names: MetricNames,

    /// With `--group-by path`: `raw`, the request path without its query string
    /// (prometheus-flask-exporter's default); `route`, Flask's rule, else a
    /// low-cardinality template of the path. Other groupings always use routes.
    #[arg(
        long,
        env = "FLASK_EBPF_EXPORTER_PATH_LABEL",
        value_enum,
        default_value = "route"
    )]
    pub path_label: PathLabelMode,

    /// Read each Flask app's url rules from its own source (parsed, never run), found from its
    /// server's command line: `source`, or `off`.
    #[arg(
        long,
        env = "FLASK_EBPF_EXPORTER_ROUTE_DISCOVERY",
        value_enum,
        default_value = "source"
    )]
    pub route_discovery: RouteDiscovery,

    /// Most distinct `path` values per workload (per server in local mode);
    /// further paths are exported as `<other>`.
    #[arg(
        long,
        value_name = "N",
        visible_alias = "max-paths-per-server",
        env = "FLASK_EBPF_EXPORTER_MAX_PATHS_PER_WORKLOAD",
        default_value_t = 500
    )]
    pub max_paths_per_workload: usize,

    /// Most series per workload whose labels responses set (durations by
    /// method, path and status; request totals by method and status);
    /// further ones are exported under path `<other>` and the status's
    /// class (`5xx`).
    #[arg(
        long,
        value_name = "N",
        env = "FLASK_EBPF_EXPORTER_MAX_SERIES_PER_WORKLOAD",
        default_value_t = 2000
    )]
    pub max_series_per_workload: usize,

    /// Most of the same series across all the node's workloads: a bound on what
    /// the agent's /metrics holds however many pods the node runs. Past it, new
    /// ones are exported as past --max-series-per-workload; series already made
    /// stay.
    #[arg(
        long,
        value_name = "N",
        env = "FLASK_EBPF_EXPORTER_MAX_SERIES",
        default_value_t = 20_000
    )]
    pub max_series: usize,

    /// Kubernetes mode: `container` keeps a series set per container of each pod;
    /// `workload` drops the pod and container labels, so each workload on the node
    /// exports the sums over its pods (series grow with routes, not with replicas).
    #[arg(long, value_name = "GRAIN", env = "FLASK_EBPF_EXPORTER_AGGREGATE_BY", value_enum,
          default_value_t = PodGrain::Container)]
    pub aggregate_by: PodGrain,

    /// A Flask rule, `[METHODS ]RULE` (e.g. `GET,PUT /items/<int:item_id>`):
    /// requests it matches get the rule as `path`. Repeatable; the
    /// environment variable takes one rule a line.
    #[arg(
        long = "route",
        value_name = "RULE",
        env = "FLASK_EBPF_EXPORTER_ROUTES"
    )]
    pub routes: Vec<String>,

    /// A file of Flask rules, one a line (`#` comments).
    #[arg(long, value_name = "FILE", env = "FLASK_EBPF_EXPORTER_ROUTES_FILE")]
    pub routes_file: Option<PathBuf>,

    /// Distinct values a path position may take under the same prefix
    /// before it is learned as a parameter.
    #[arg(long, value_name = "N", env = "FLASK_EBPF_EXPORTER_ROUTE_SEGMENT_CAP", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub route_segment_cap: u32,

    /// Address of the /debug/* pages. They name pods, processes and sample
    /// paths, so they stay on loopback unless told otherwise
    /// (`kubectl port-forward` reaches them).
    #[arg(
        long,
        value_name = "ADDR:PORT",
        env = "FLASK_EBPF_EXPORTER_DEBUG_LISTEN",
        default_value = "127.0.0.1:9811"
    )]
    pub debug_listen: SocketAddr,

    /// Connections each listener (/metrics, /debug/*) serves at once; it
    /// accepts and closes the rest, counted.
    #[arg(long, value_name = "N", env = "FLASK_EBPF_EXPORTER_HTTP_MAX_CONNECTIONS", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub http_max_connections: u32,

    /// Time a client of the agent's listeners has to send a request's
    /// headers, from its connection or its previous response: a slow or
    /// idle connection is closed after it, counted.
    #[arg(long, value_name = "DURATION", env = "FLASK_EBPF_EXPORTER_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub http_header_timeout: Duration,

    /// Serve /debug/routes, /debug/pods and /debug/connections.
    #[arg(long, env = "FLASK_EBPF_EXPORTER_DEBUG_ENDPOINTS", default_value_t = true,
          action = clap::ArgAction::Set)]
    pub debug_endpoints: bool,

    /// Bytes copied from the start of each read or write (request line and headers must fit).
    #[arg(long, value_name = "BYTES", env = "FLASK_EBPF_EXPORTER_CAPTURE_BYTES", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(64..=exporter_common::MAX_CAPTURE_BYTES as i64))]
    pub capture_bytes: u32,

    /// Size of the BPF ring buffer in bytes (a power of two, a multiple of the page size).
    #[arg(long, value_name = "BYTES", env = "FLASK_EBPF_EXPORTER_RING_BUFFER_BYTES", default_value_t = 8 * 1024 * 1024,
          value_parser = parse_ring_buffer_bytes)]
    pub ring_buffer_bytes: u32,

    /// Connections the kernel side follows at once, at most (its connection map, ≈ 100 bytes
    /// each). Past it the least recently used is forgotten (counted in
    /// flask_ebpf_exporter_connections_evicted_total).
    #[arg(long, value_name = "N", env = "FLASK_EBPF_EXPORTER_KERNEL_CONNECTIONS", default_value_t = 65_536,
          value_parser = clap::value_parser!(u32).range(16..=1 << 22))]
    pub kernel_connections: u32,

    /// Connections whose handshake the kernel side remembers until their accept, all
    /// listeners of the node together (≈ 30 bytes each), for queue time. Past it the
    /// oldest is forgotten (counted in flask_ebpf_exporter_handshakes_forgotten_total).
    #[arg(long, value_name = "N", env = "FLASK_EBPF_EXPORTER_KERNEL_HANDSHAKES",
          default_value_t = exporter_common::HANDSHAKE_ENTRIES,
          value_parser = clap::value_parser!(u32).range(16..=1 << 22))]
    pub kernel_handshakes: u32,

    /// Watch only these processes (or the process groups they lead). Repeat or comma-separate.
    #[arg(
        long = "pid",
        value_name = "PID",
        env = "FLASK_EBPF_EXPORTER_PIDS",
        value_delimiter = ','
    )]
    pub pids: Vec<u32>,

    /// Watch only processes whose command line matches this regular expression.
    #[arg(
        long = "command",
        value_name = "REGEX",
        env = "FLASK_EBPF_EXPORTER_COMMAND"
    )]
    pub command: Option<Regex>,

    /// Watch only servers listening on these ports. Repeat or comma-separate.
    #[arg(
        long = "port",
        value_name = "PORT",
        env = "FLASK_EBPF_EXPORTER_PORTS",
        value_delimiter = ','
    )]
    pub ports: Vec<u16>,

    /// `auto`: Kubernetes mode in a pod with a service account or when a
    /// kubeconfig is given, else local mode.
    #[arg(
        long,
        env = "FLASK_EBPF_EXPORTER_MODE",
        value_enum,
        default_value = "auto"
    )]
    pub mode: ModeChoice,

    /// Kubeconfig to reach the API server with (Kubernetes mode); in a pod the
    /// service account is used instead.
    #[arg(long, value_name = "FILE", env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// This node's name (Kubernetes mode): only its pods are watched.
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// Monitor only pods in these namespaces (Kubernetes mode). Repeat or comma-separate.
    #[arg(
        long = "namespace",
        value_name = "NS",
        env = "FLASK_EBPF_EXPORTER_NAMESPACES",
        value_delimiter = ','
    )]
    pub namespaces: Vec<String>,

    /// `opt-out`: every pod unless annotated `flask-ebpf-exporter.io/monitor: "false"`;
    /// `opt-in`: only pods annotated `flask-ebpf-exporter.io/monitor: "true"`.
    #[arg(
        long,
        env = "FLASK_EBPF_EXPORTER_POD_SELECTION",
        value_enum,
        default_value = "opt-out"
    )]
    pub pod_selection: PodSelection,

    /// How long requests of a process whose pod (or, in local mode, whose
    /// server) is not known yet are held before they are exported with
    /// identity `<unknown>`.
    #[arg(long, value_name = "DURATION", env = "FLASK_EBPF_EXPORTER_POD_WAIT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub pod_wait: Duration,

    /// How long a deleted pod's series stay, so the last scrapes see their final values.
    #[arg(long, value_name = "DURATION", env = "FLASK_EBPF_EXPORTER_DELETED_POD_GRACE", default_value = "2m", value_parser = humantime::parse_duration)]
    pub deleted_pod_grace: Duration,

    /// Log filter, in tracing's EnvFilter syntax (e.g. `info`, `debug`, `flask_ebpf_exporter=debug`).
    #[arg(
        long,
        value_name = "FILTER",
        env = "FLASK_EBPF_EXPORTER_LOG",
        default_value = "info"
    )]
    pub log: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeChoice {
    Auto,
    Local,
    Kubernetes,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PodSelection {
    OptOut,
    OptIn,
}

fn parse_regex(text: &str) -> Result<String, String> {
    Regex::new(text)
        .map(|_| text.to_owned())
        .map_err(|error| error.to_string())
}

fn parse_bucket(text: &str) -> Result<f64, String> {
    let bound: f64 = text
        .trim()
        .parse()
        .map_err(|error| format!("{text:?}: {error}"))?;
    if bound.is_nan() || bound == f64::NEG_INFINITY {
        return Err(format!("{text:?} is not a bucket bound"));
    }
    Ok(bound)
}

fn parse_ring_buffer_bytes(text: &str) -> Result<u32, String> {
    let bytes: u32 = text.parse().map_err(|error| format!("{error}"))?;
    if bytes < 4096 || !bytes.is_power_of_two() {
        return Err("must be a power of two of at least 4096".to_owned());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{metrics::DURATION_BUCKETS, rules::flask::RuleMatch};

    #[test]
    fn defaults_and_flags() {
        let config = Config::try_parse_from(["flask-ebpf-exporter"]).expect("defaults parse");
        assert_eq!(config.path_label, PathLabelMode::Route);
        let series = config.series_options().expect("default series");
        assert_eq!(series.group_by, GroupBy::Path);
        assert_eq!(series.buckets, DURATION_BUCKETS);
        assert!(series.latency_as_histogram);
        assert!(config.excluded_paths.is_empty());
        assert_eq!(config.listen.port(), 9810);
        assert!(
            config.debug_listen.ip().is_loopback(),
            "debug pages on loopback"
        );
        assert_eq!(config.debug_listen.port(), 9811);
        let config = Config::try_parse_from([
            "flask-ebpf-exporter",
            "--listen",
            "127.0.0.1:1",
            "--path-label",
            "raw",
            "--pid",
            "5,6",
            "--port",
            "8000",
            "--command",
            "gunicorn.*app",
            "--route",
            "GET /items/<int:id>",
            "--route",
            "/users/<uuid:id>",
            "--max-paths-per-server",
            "40",
            "--debug-endpoints",
            "false",
        ])
        .expect("flags parse");
        assert_eq!(config.path_label, PathLabelMode::Raw);
        assert_eq!(config.pids, vec![5, 6]);
        assert_eq!(config.ports, vec![8000]);
        let settings = config.settings().expect("valid flags");
        assert_eq!(settings.stages.routes.user_rules.len(), 2);
        assert_eq!(
            settings
                .stages
                .routes
                .user_rules
                .match_path("/items/5", "GET"),
            RuleMatch::Rule("/items/<int:id>")
        );
        assert_eq!(settings.debug_listen, None);
        assert_eq!(settings.local_filter.pids, [5, 6]);
        assert_eq!(config.max_paths_per_workload, 40);
        assert!(!config.debug_endpoints);
        assert!(Config::try_parse_from(["x", "--ring-buffer-bytes", "5000"]).is_err());
        assert!(Config::try_parse_from(["x", "--excluded-paths", "(unclosed"]).is_err());
        assert!(Config::try_parse_from(["x", "--group-by", "url-rule"]).is_err());
        let pfe = Config::try_parse_from([
            "x",
            "--group-by",
            "url_rule",
            "--path-label",
            "raw",
            "--excluded-paths",
            "/health",
            "--excluded-paths",
            "/static/.*",
            "--buckets",
            "0.1,0.5,1,+Inf",
            "--default-latency-as-histogram",
            "false",
        ])
        .expect("pfe's options parse");
        let series = pfe.series_options().expect("series");
        assert_eq!(series.group_by, GroupBy::UrlRule);
        assert_eq!(series.buckets, [0.1, 0.5, 1.0]);
        assert!(!series.latency_as_histogram);
        assert_eq!(pfe.excluded_paths, ["/health", "/static/.*"]);
        assert_eq!(
            pfe.settings().expect("valid").stages.routes.path_label,
            PathLabelMode::Route,
            "url_rule needs routes"
        );
        let unordered = Config::try_parse_from(["x", "--buckets", "1,0.5"]).expect("parse");
        assert!(matches!(unordered.settings(), Err(ConfigError::Buckets(_))));
        assert!(Config::try_parse_from(["x", "--capture-bytes", "999999"]).is_err());
        assert!(Config::try_parse_from(["x", "--command", "("]).is_err());
        assert_eq!(settings.mode, Mode::Local);

        let config = Config::try_parse_from([
            "x",
            "--kubeconfig",
            "/k",
            "--node-name",
            "node-a",
            "--namespace",
            "shop,billing",
            "--pod-selection",
            "opt-in",
            "--pod-wait",
            "3s",
            "--deleted-pod-grace",
            "1m 30s",
        ])
        .expect("kubernetes flags parse");
        let settings = config.settings().expect("valid flags");
        assert_eq!(
            settings.mode,
            Mode::Kubernetes {
                kubeconfig: Some(PathBuf::from("/k")),
                node_name: "node-a".to_owned(),
                grain: PodGrain::Container,
            }
        );
        let aggregated = Config::try_parse_from([
            "x",
            "--mode",
            "kubernetes",
            "--node-name",
            "node-a",
            "--aggregate-by",
            "workload",
        ])
        .expect("parse");
        assert!(matches!(
            aggregated.settings().expect("valid flags").mode,
            Mode::Kubernetes {
                grain: PodGrain::Workload,
                ..
            }
        ));
        let local = Config::try_parse_from(["x", "--mode", "local", "--aggregate-by", "workload"])
            .expect("parse");
        let refused = local.settings().expect_err("no pods to aggregate");
        assert!(matches!(refused, ConfigError::AggregateLocal));
        assert!(settings.pod_selection.opt_in);
        assert_eq!(settings.stages.pod_wait, Duration::from_secs(3));
        assert_eq!(config.namespaces, ["shop", "billing"]);
        assert_eq!(config.pod_selection, PodSelection::OptIn);
        assert_eq!(config.pod_wait, Duration::from_secs(3));
        assert_eq!(config.deleted_pod_grace, Duration::from_secs(90));
        let no_node = Config::try_parse_from(["x", "--mode", "kubernetes", "--node-name", ""])
            .expect("parse");
        let refused = no_node.settings().expect_err("no node name");
        assert!(matches!(refused, ConfigError::NodeName));
        assert!(refused.to_string().contains("NODE_NAME"));
        let bad_rule = Config::try_parse_from(["x", "--route", "no-slash"]).expect("parse");
        assert!(matches!(bad_rule.settings(), Err(ConfigError::Rule(_))));
    }
}
