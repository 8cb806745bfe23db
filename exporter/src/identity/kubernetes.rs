//! The Kubernetes side of pod identity: one watch on this node's pods
//! (`fieldSelector=spec.nodeName=<node>`, never the whole cluster), owners
//! resolved through a cache, and the watch's health as metrics.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use futures_util::StreamExt as _;
use k8s_openapi::{
    api::{apps::v1::ReplicaSet, batch::v1::Job, core::v1::Pod},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{
    Api, Client,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        watcher::{self, Event, watcher},
    },
};
use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tracing::{debug, info, warn};

use super::pods::{
    PodInfo, ROUTES_ANNOTATION, RoutesAnnotation, Selection, SharedPodIndex, Workload, lock_index,
    parse_routes_annotation, text_hash,
};
use crate::{
    exchange::PodUid,
    health::{Health, WatchRunning},
};

/// How long an owner lookup may take before the name heuristic is used.
const OWNER_LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// Owners do not change; the TTL only bounds the cache.
const OWNER_TTL: Duration = Duration::from_secs(30 * 60);
/// A failed lookup is retried after this long.
const OWNER_FAILURE_TTL: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        source: kube::config::KubeconfigError,
    },
    #[error("in-cluster configuration (service account): {0}")]
    InCluster(#[from] kube::config::InClusterError),
    #[error("creating the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client from a kubeconfig file, or from the pod's service account.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig_error = |source| KubeError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let file = Kubeconfig::read_from(path).map_err(kubeconfig_error)?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(kubeconfig_error)?
        }
        None => kube::Config::incluster()?,
    };
    Ok(Client::try_from(config)?)
}

/// The watch's health, exported beside the request metrics.
#[derive(Clone)]
pub struct WatchMetrics {
    pub events: IntCounterVec,
    pub errors: IntCounter,
    pub relists: IntCounter,
    pub synced: IntGauge,
    pub last_event: Gauge,
    pub last_error: Gauge,
    pub pods: IntGauge,
    pub owner_lookups: IntCounterVec,
    pub route_rule_errors: IntCounter,
}

impl WatchMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        fn add<M: prometheus::core::Collector + Clone + 'static>(
            registry: &Registry,
            metric: M,
        ) -> Result<M, prometheus::Error> {
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        }
        let prefix = "flask_ebpf_exporter_kubernetes_";
        Ok(WatchMetrics {
            events: add(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        format!("{prefix}watch_events_total"),
                        "Pod watch events applied, by type (apply, delete)",
                    ),
                    &["type"],
                )?,
            )?,
            errors: add(
                registry,
                IntCounter::new(
                    format!("{prefix}watch_errors_total"),
                    "Failed list or watch calls (the watch retries with backoff)",
                )?,
            )?,
            relists: add(
                registry,
                IntCounter::new(
                    format!("{prefix}watch_relists_total"),
                    "Completed lists of this node's pods: the first, and one after each expired resourceVersion (410 Gone)",
                )?,
            )?,
            synced: add(
                registry,
                IntGauge::new(
                    format!("{prefix}synced"),
                    "1 once the first list of this node's pods has completed",
                )?,
            )?,
            last_event: add(
                registry,
                Gauge::new(
                    format!("{prefix}watch_last_event_timestamp_seconds"),
                    "Unix time of the last pod watch event",
                )?,
            )?,
            last_error: add(
                registry,
                Gauge::new(
                    format!("{prefix}watch_last_error_timestamp_seconds"),
                    "Unix time of the last failed list or watch call (0: none)",
                )?,
            )?,
            pods: add(
                registry,
                IntGauge::new(
                    format!("{prefix}pods"),
                    "Pods of this node known to the exporter, including deleted ones in their grace period",
                )?,
            )?,
            route_rule_errors: add(
                registry,
                IntCounter::new(
                    format!("{prefix}route_rule_errors_total"),
                    "Rules refused in pods' flask-ebpf-exporter.io/routes annotations (bad, or past a bound)",
                )?,
            )?,
            owner_lookups: add(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        format!("{prefix}owner_lookups_total"),
                        "Owner lookups (ReplicaSet, Job), by result: cached, fetched, failed",
                    ),
                    &["result"],
                )?,
            )?,
        })
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

/// Keeps the pod index current from a watch on this node's pods.
pub struct PodWatch {
    pub client: Client,
    pub node_name: String,
    pub selection: Selection,
    pub index: SharedPodIndex,
    pub metrics: WatchMetrics,
    pub health: Arc<Health>,
}

impl PodWatch {
    /// Runs until the task is dropped. Errors are logged, counted and
    /// retried with backoff; a 410 Gone makes kube's watcher relist.
    pub async fn run(self) {
        // `/healthz` fails once this task ends, however it ends.
        let _running = WatchRunning(&self.health);
        let pods: Api<Pod> = Api::all(self.client.clone());
        let config =
            watcher::Config::default().fields(&format!("spec.nodeName={}", self.node_name));
        let mut events = watcher(pods, config).default_backoff().boxed();
        let mut owners = OwnerCache::new(self.client.clone());
        // UIDs seen during a relist; the others were deleted meanwhile.
        let mut listed: HashSet<PodUid> = HashSet::new();
        let mut failing = false;
        info!(node = %self.node_name, "watching this node's pods");
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(event) => event,
                Err(error) => {
                    self.metrics.errors.inc();
                    self.metrics.last_error.set(unix_now());
                    if !failing {
                        warn!(%error, "pod watch failed; retrying with backoff (see flask_ebpf_exporter_kubernetes_watch_errors_total)");
                    } else {
                        debug!(%error, "pod watch still failing");
                    }
                    failing = true;
                    continue;
                }
            };
            // Init only says a list is about to be tried; anything else means
            // the API server answered.
            if failing && !matches!(event, Event::Init) {
                info!("pod watch recovered");
                failing = false;
            }
            self.metrics.last_event.set(unix_now());
            match event {
                Event::Init => listed.clear(),
                Event::InitApply(pod) => {
                    if let Some(uid) = self.apply(&pod, &mut owners).await {
                        listed.insert(uid);
                    }
                }
                Event::InitDone => {
                    self.metrics.relists.inc();
                    lock_index(&self.index).retain_listed(&listed, Instant::now());
                    listed.clear();
                    if self.metrics.synced.get() == 0 {
                        info!(
                            pods = lock_index(&self.index).len(),
                            "pods of this node listed"
                        );
                    }
                    self.metrics.synced.set(1);
                    self.health.set_synced();
                }
                Event::Apply(pod) => {
                    self.metrics.events.with_label_values(&["apply"]).inc();
                    self.apply(&pod, &mut owners).await;
                }
                Event::Delete(pod) => {
                    self.metrics.events.with_label_values(&["delete"]).inc();
                    if let Some(uid) = pod.metadata.uid.as_deref().and_then(PodUid::parse) {
                        lock_index(&self.index).delete(&uid, Instant::now());
                    }
                }
            }
            self.metrics.pods.set(lock_index(&self.index).len() as i64);
        }
    }

    async fn apply(&self, pod: &Pod, owners: &mut OwnerCache) -> Option<PodUid> {
        let workload = owners.workload(&pod.metadata, &self.metrics).await;
        let Some(mut info) = PodInfo::from_pod(pod, workload, &self.selection) else {
            warn!(pod = ?pod.metadata.name, "pod without a valid UID ignored");
            return None;
        };
        // Only selected pods' rules are read.
        if info.selected
            && let Some(text) = PodInfo::routes_text(pod)
        {
            info.routes = Some(self.routes_annotation(&info, text).await);
        }
        let uid = info.uid.clone();
        lock_index(&self.index).apply(info, Instant::now());
        Some(uid)
    }

    /// The pod's routes annotation parsed, or as parsed before for its
    /// workload. Parsing (regexes included) happens outside the index's
    /// lock, which the pipeline needs per exchange, and on a blocking
    /// thread: whoever writes the annotation decides what it costs, and
    /// the runtime's threads serve /metrics and /healthz.
    async fn routes_annotation(&self, info: &PodInfo, text: &str) -> RoutesAnnotation {
        let workload = info.workload_key();
        let text_hash = text_hash(text);
        if let Some(known) = lock_index(&self.index).parsed_annotation(&workload, text_hash) {
            return known;
        }
        let owned = text.to_owned();
        let key = workload.clone();
        let (routes, errors) = match tokio::task::spawn_blocking(move || {
            parse_routes_annotation(&owned, &key)
        })
        .await
        {
            Ok(parsed) => parsed,
            // Only a panic while parsing: the pod's rules are refused.
            Err(error) => {
                warn!(pod = %info.name, %error, "parsing the routes annotation failed");
                self.metrics.route_rule_errors.inc();
                return RoutesAnnotation {
                    text_hash,
                    rules: Arc::default(),
                };
            }
        };
        for error in &errors {
            warn!(pod = %info.name, namespace = %info.namespace, %error,
                "refused in the {ROUTES_ANNOTATION} annotation; the pod's other rules apply (see flask_ebpf_exporter_kubernetes_route_rule_errors_total)");
        }
        self.metrics.route_rule_errors.inc_by(errors.len() as u64);
        routes
    }
}

/// The controlling owner reference of an object.
fn controller(metadata: &ObjectMeta) -> Option<&OwnerReference> {
    let owners = metadata.owner_references.as_deref()?;
    owners
        .iter()
        .find(|owner| owner.controller == Some(true))
        .or_else(|| owners.first())
}

type OwnerKey = (String, String, String);

/// Workloads of ReplicaSets and Jobs, fetched once each.
struct OwnerCache {
    client: Client,
    entries: HashMap<OwnerKey, (Workload, Instant)>,
}

impl OwnerCache {
    fn new(client: Client) -> Self {
        OwnerCache {
            client,
            entries: HashMap::new(),
        }
    }

    /// The workload a pod belongs to: its controller, followed one more
    /// step from a ReplicaSet to its Deployment and from a Job to its
    /// CronJob. A pod without a controller is its own workload.
    async fn workload(&mut self, pod: &ObjectMeta, metrics: &WatchMetrics) -> Workload {
        let Some(owner) = controller(pod) else {
            return Workload {
                kind: "Pod".to_owned(),
                name: pod.name.clone().unwrap_or_default(),
            };
        };
        let direct = Workload {
            kind: owner.kind.clone(),
            name: owner.name.clone(),
        };
        if owner.kind != "ReplicaSet" && owner.kind != "Job" {
            return direct;
        }
        let namespace = pod.namespace.clone().unwrap_or_default();
        let key = (owner.kind.clone(), namespace.clone(), owner.name.clone());
        let now = Instant::now();
        if let Some((workload, expires)) = self.entries.get(&key)
            && *expires > now
        {
            metrics.owner_lookups.with_label_values(&["cached"]).inc();
            return workload.clone();
        }
        let fetched = tokio::time::timeout(OWNER_LOOKUP_TIMEOUT, self.fetch_owner(&key)).await;
        let (workload, ttl) = match fetched {
            Ok(Ok(owner_of_owner)) => {
                metrics.owner_lookups.with_label_values(&["fetched"]).inc();
                (owner_of_owner.unwrap_or(direct), OWNER_TTL)
            }
            failure => {
                metrics.owner_lookups.with_label_values(&["failed"]).inc();
                let error = match failure {
                    Ok(Err(error)) => error.to_string(),
                    _ => "timed out".to_owned(),
                };
                warn!(kind = %owner.kind, namespace, name = %owner.name, %error,
                    "owner lookup failed; naming the workload from the pod's labels");
                (name_heuristic(pod, direct), OWNER_FAILURE_TTL)
            }
        };
        self.entries.retain(|_, (_, expires)| *expires > now);
        self.entries.insert(key, (workload.clone(), now + ttl));
        workload
    }

    /// The controller of a ReplicaSet or Job, if it has one.
    async fn fetch_owner(
        &self,
        (kind, namespace, name): &OwnerKey,
    ) -> Result<Option<Workload>, kube::Error> {
        let metadata = if kind == "ReplicaSet" {
            Api::<ReplicaSet>::namespaced(self.client.clone(), namespace)
                .get(name)
                .await?
                .metadata
        } else {
            Api::<Job>::namespaced(self.client.clone(), namespace)
                .get(name)
                .await?
                .metadata
        };
        Ok(controller(&metadata).map(|owner| Workload {
            kind: owner.kind.clone(),
            name: owner.name.clone(),
        }))
    }
}

/// When the API cannot say: a ReplicaSet named `<deployment>-<pod-template-hash>`
/// belongs to that Deployment (the Deployment controller names them so).
fn name_heuristic(pod: &ObjectMeta, direct: Workload) -> Workload {
    let hash = pod
        .labels
        .as_ref()
        .and_then(|labels| labels.get("pod-template-hash"));
    match hash {
        Some(hash) if direct.kind == "ReplicaSet" => {
            match direct
                .name
                .strip_suffix(hash.as_str())
                .and_then(|rest| rest.strip_suffix('-'))
            {
                Some(deployment) => Workload {
                    kind: "Deployment".to_owned(),
                    name: deployment.to_owned(),
                },
                None => direct,
            }
        }
        _ => direct,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(json: serde_json::Value) -> ObjectMeta {
        serde_json::from_value(json).expect("metadata")
    }

    #[test]
    fn heuristic_names_the_deployment_of_a_replicaset() {
        let pod = meta(serde_json::json!({"name": "web-7d9c6b5f4-x2x9k",
            "labels": {"pod-template-hash": "7d9c6b5f4"}}));
        let replicaset = Workload {
            kind: "ReplicaSet".to_owned(),
            name: "web-7d9c6b5f4".to_owned(),
        };
        assert_eq!(
            name_heuristic(&pod, replicaset.clone()),
            Workload {
                kind: "Deployment".to_owned(),
                name: "web".to_owned()
            }
        );
        let unlabelled = meta(serde_json::json!({"name": "web-7d9c6b5f4-x2x9k"}));
        assert_eq!(name_heuristic(&unlabelled, replicaset.clone()), replicaset);
    }

    #[test]
    fn controller_reference_is_preferred() {
        let pod = meta(serde_json::json!({"name": "p", "ownerReferences": [
            {"apiVersion": "v1", "kind": "Node", "name": "n", "uid": "1"},
            {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db", "uid": "2", "controller": true}
        ]}));
        assert_eq!(
            controller(&pod).map(|owner| owner.name.as_str()),
            Some("db")
        );
        assert!(controller(&meta(serde_json::json!({"name": "p"}))).is_none());
    }
}
