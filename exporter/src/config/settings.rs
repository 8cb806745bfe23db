//! The flags validated once into typed settings: each stage's own part,
//! so no stage reads the command line, and every refusal is one
//! [`ConfigError`] that names the flag.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use super::{Config, ModeChoice, PodSelection};
use crate::{
    capture::CaptureOptions,
    exchange::PodGrain,
    identity::{local::ProcessFilter, pods::Selection},
    metrics::{DURATION_BUCKETS, GroupBy, SeriesOptions},
    routes::{ExcludedPaths, PathLabelMode, discovery::RouteDiscovery},
    rules::flask::{RuleError, RuleSet},
    server::accept::ListenerLimits,
};

/// The service account token every pod gets unless it opts out.
const SERVICE_ACCOUNT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// Where the agent runs, decided from the flags and environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    Local,
    Kubernetes {
        /// `None`: the pod's service account.
        kubeconfig: Option<PathBuf>,
        node_name: String,
        /// Which of a pod's labels its series keep.
        grain: PodGrain,
    },
}

/// Why the flags cannot run the agent.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--buckets must increase, and hold a finite bound: {0:?}")]
    Buckets(Vec<f64>),
    #[error("--http-header-timeout {} is too short for any client", humantime::format_duration(*.0))]
    HeaderTimeout(Duration),
    #[error("reading --routes-file {path}: {source}")]
    RoutesFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} (in --route or --routes-file)")]
    Rule(RuleError),
    #[error("--excluded-paths: {0}")]
    ExcludedPaths(regex::Error),
    #[error(
        "Kubernetes mode needs this node's name: set NODE_NAME from the downward API \
         (spec.nodeName) or pass --node-name"
    )]
    NodeName,
    #[error(
        "--aggregate-by workload sums a workload's pods, and local mode has none: \
         leave it at container outside Kubernetes"
    )]
    AggregateLocal,
}

/// How routes are named: the routes stage's settings.
#[derive(Debug)]
pub struct RouteSettings {
    pub path_label: PathLabelMode,
    pub excluded_paths: ExcludedPaths,
    pub max_paths_per_workload: usize,
    pub segment_cap: usize,
    /// `--route` and `--routes-file`, compiled.
    pub user_rules: RuleSet,
    pub discovery: RouteDiscovery,
}

/// What the stages after capture are built from.
#[derive(Debug)]
pub struct StageSettings {
    pub series: SeriesOptions,
    pub routes: RouteSettings,
    /// How long requests wait for their pod (or local server).
    pub pod_wait: Duration,
    pub deleted_pod_grace: Duration,
}

/// The agent's settings, validated.
#[derive(Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    /// `None`: the debug pages are off.
    pub debug_listen: Option<SocketAddr>,
    pub listener_limits: ListenerLimits,
    pub mode: Mode,
    /// Local mode's process filters.
    pub local_filter: ProcessFilter,
    /// Kubernetes mode's pod selection.
    pub pod_selection: Selection,
    pub capture: CaptureOptions,
    pub stages: StageSettings,
}

impl Config {
    /// Validates every flag at once into the settings of each stage.
    pub fn settings(&self) -> Result<Settings, ConfigError> {
        Ok(Settings {
            listen: self.listen,
            debug_listen: self.debug_endpoints.then_some(self.debug_listen),
            listener_limits: self.listener_limits()?,
            mode: self.mode()?,
            local_filter: ProcessFilter {
                pids: self.pids.clone(),
                command: self.command.clone(),
                ports: self.ports.clone(),
            },
            pod_selection: Selection {
                opt_in: self.pod_selection == PodSelection::OptIn,
                namespaces: self.namespaces.clone(),
            },
            capture: CaptureOptions {
                capture_bytes: self.capture_bytes,
                ring_buffer_bytes: self.ring_buffer_bytes,
                kernel_connections: self.kernel_connections,
                kernel_handshakes: self.kernel_handshakes,
            },
            stages: StageSettings {
                series: self.series_options()?,
                routes: RouteSettings {
                    path_label: self.path_label_mode(),
                    excluded_paths: ExcludedPaths::new(&self.excluded_paths)
                        .map_err(ConfigError::ExcludedPaths)?,
                    max_paths_per_workload: self.max_paths_per_workload,
                    segment_cap: self.route_segment_cap as usize,
                    user_rules: self.user_rules()?,
                    discovery: self.route_discovery,
                },
                pod_wait: self.pod_wait,
                deleted_pod_grace: self.deleted_pod_grace,
            },
        })
    }

    /// The bounds of each listener's connections.
    fn listener_limits(&self) -> Result<ListenerLimits, ConfigError> {
        if self.http_header_timeout < Duration::from_millis(100) {
            return Err(ConfigError::HeaderTimeout(self.http_header_timeout));
        }
        Ok(ListenerLimits {
            connections: self.http_max_connections as usize,
            header_timeout: self.http_header_timeout,
        })
    }

    /// The request series' options; errors on buckets that do not increase.
    pub(super) fn series_options(&self) -> Result<SeriesOptions, ConfigError> {
        let mut buckets = if self.buckets.is_empty() {
            DURATION_BUCKETS.to_vec()
        } else {
            self.buckets.clone()
        };
        // prometheus_client takes a trailing +Inf; the exposition adds it.
        if buckets.last() == Some(&f64::INFINITY) {
            buckets.pop();
        }
        if buckets.is_empty() || buckets.windows(2).any(|pair| pair[0] >= pair[1]) {
            return Err(ConfigError::Buckets(self.buckets.clone()));
        }
        Ok(SeriesOptions {
            names: self.metric_names,
            group_by: self.group_by,
            buckets,
            latency_as_histogram: self.default_latency_as_histogram,
            body_sizes: self.body_sizes,
            queue_buckets: self.queue_time_buckets,
            max_series_per_workload: self.max_series_per_workload,
            max_series: self.max_series,
        })
    }

    /// How route labels are made: raw paths only where `path` is the
    /// grouping; `url_rule` and `endpoint` need routes.
    fn path_label_mode(&self) -> PathLabelMode {
        match self.group_by {
            GroupBy::Path => self.path_label,
            GroupBy::UrlRule | GroupBy::Endpoint => PathLabelMode::Route,
        }
    }

    /// The user rules of `--route` and `--routes-file`, compiled; the
    /// first refused rule refuses the flags.
    fn user_rules(&self) -> Result<RuleSet, ConfigError> {
        let mut text = self.routes.join("\n");
        if let Some(path) = &self.routes_file {
            let file = std::fs::read_to_string(path).map_err(|source| ConfigError::RoutesFile {
                path: path.clone(),
                source,
            })?;
            text.push('\n');
            text.push_str(&file);
        }
        let (rules, mut errors) = RuleSet::parse(&text);
        match errors.is_empty() {
            true => Ok(rules),
            false => Err(ConfigError::Rule(errors.swap_remove(0))),
        }
    }

    fn mode(&self) -> Result<Mode, ConfigError> {
        let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
            && std::path::Path::new(SERVICE_ACCOUNT_TOKEN).exists();
        let kubernetes = match self.mode {
            ModeChoice::Local => false,
            ModeChoice::Kubernetes => true,
            ModeChoice::Auto => self.kubeconfig.is_some() || in_cluster,
        };
        if !kubernetes {
            return match self.aggregate_by {
                PodGrain::Container => Ok(Mode::Local),
                PodGrain::Workload => Err(ConfigError::AggregateLocal),
            };
        }
        let node_name = self
            .node_name
            .clone()
            .filter(|name| !name.is_empty())
            .ok_or(ConfigError::NodeName)?;
        Ok(Mode::Kubernetes {
            kubeconfig: self.kubeconfig.clone(),
            node_name,
            grain: self.aggregate_by,
        })
    }
}
