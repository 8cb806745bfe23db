//! The exporter's pod watch, driven by the real `kube` client against the
//! in-test API server (e2e/src/kube_api.rs; no real API server can run
//! here): list + watch of one node's pods, owner resolution with a cache,
//! resumed and cut watches, 410 Gone with a relist, and an API server that
//! is down at start or goes away.

use flask_ebpf_exporter_e2e as support;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use flask_ebpf_exporter::{
    exchange::{ContainerRef, IdentityLabels, PodUid},
    health::Health,
    identity::{
        kubernetes::{PodWatch, WatchMetrics, client},
        pods::{Lookup, MONITOR_ANNOTATION, Selection, SharedPodIndex, lock_index},
    },
};
use support::kube_api::{KubeApi, PodSpec, PodUids, container_id, owned_by, pod};

const NODE: &str = "node-a";
/// This file's pod UIDs.
const PODS: PodUids = PodUids(0xaaaa);

struct Watching {
    index: SharedPodIndex,
    metrics: WatchMetrics,
    health: Arc<Health>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn watch(api: &KubeApi, selection: Selection) -> Watching {
    let client = client(Some(std::path::Path::new(api.kubeconfig())))
        .await
        .expect("client");
    let index = SharedPodIndex::default();
    let metrics = WatchMetrics::register(&prometheus::Registry::new()).expect("metrics");
    let health = Arc::new(Health::default());
    let task = tokio::spawn(
        PodWatch {
            client,
            node_name: NODE.to_owned(),
            selection,
            index: index.clone(),
            metrics: metrics.clone(),
            health: health.clone(),
        }
        .run(),
    );
    Watching {
        index,
        metrics,
        health,
        task,
    }
}

/// Polls until `check` holds; panics with `what` after 20 s.
async fn until(what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

fn lookup(watching: &Watching, pod_uid: &str, id: Option<&str>) -> Lookup {
    let container = ContainerRef {
        pod_uid: PodUid::parse(pod_uid).expect("uid"),
        container_id: id.map(str::to_owned),
    };
    lock_index(&watching.index).lookup(&container, false)
}

/// The identity label values of a known container, in exposition order.
fn labels(lookup: Lookup) -> Vec<String> {
    match lookup {
        Lookup::Known(identity) => identity
            .labels
            .pairs()
            .into_iter()
            .map(|(_, value)| value.to_owned())
            .collect(),
        other => panic!("expected known labels, got {other:?}"),
    }
}

fn app_pod(
    namespace: &str,
    name: &str,
    n: usize,
    node: &str,
    owner: Option<(&str, &str)>,
) -> serde_json::Value {
    let id = container_id(n);
    pod(&PodSpec {
        namespace,
        name,
        uid: &PODS.uid(n),
        node,
        owner,
        containers: &[("app", Some(&id))],
        annotations: &[],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_pods_are_listed_watched_and_resolved_to_workloads() {
    let mut api = KubeApi::start();
    api.put_object(owned_by(
        "ReplicaSet",
        "shop",
        "web-5d8f7c9b6",
        ("Deployment", "web"),
    ));
    api.put_object(owned_by(
        "Job",
        "batch",
        "nightly-29012345",
        ("CronJob", "nightly"),
    ));
    let web = ("ReplicaSet", "web-5d8f7c9b6");
    api.put_pod(app_pod("shop", "web-5d8f7c9b6-aaaaa", 1, NODE, Some(web)));
    api.put_pod(app_pod("shop", "web-5d8f7c9b6-bbbbb", 2, NODE, Some(web)));
    api.put_pod(app_pod(
        "shop",
        "db-0",
        3,
        NODE,
        Some(("StatefulSet", "db")),
    ));
    api.put_pod(app_pod(
        "batch",
        "nightly-29012345-xk2p9",
        4,
        NODE,
        Some(("Job", "nightly-29012345")),
    ));
    api.put_pod(app_pod("shop", "debug", 5, NODE, None));
    api.put_pod(app_pod(
        "shop",
        "web-5d8f7c9b6-ccccc",
        9,
        "node-b",
        Some(web),
    ));

    let watching = watch(&api, Selection::default()).await;
    let synced = until("first sync", || watching.health_synced()).await;
    eprintln!("first list applied after {synced:?}");

    let expect = |n: usize, want: [&str; 5]| {
        assert_eq!(
            labels(lookup(&watching, &PODS.uid(n), Some(&container_id(n)))),
            want,
            "pod {n}"
        );
    };
    expect(
        1,
        ["shop", "web-5d8f7c9b6-aaaaa", "app", "web", "Deployment"],
    );
    expect(
        2,
        ["shop", "web-5d8f7c9b6-bbbbb", "app", "web", "Deployment"],
    );
    expect(3, ["shop", "db-0", "app", "db", "StatefulSet"]);
    expect(
        4,
        [
            "batch",
            "nightly-29012345-xk2p9",
            "app",
            "nightly",
            "CronJob",
        ],
    );
    expect(5, ["shop", "debug", "app", "debug", "Pod"]);
    // The other node's pod never reaches this node.
    assert_eq!(
        lookup(&watching, &PODS.uid(9), Some(&container_id(9))),
        Lookup::Pending
    );

    // ADDED, then MODIFIED with a second container, then DELETED.
    let added_at = Instant::now();
    api.put_pod(app_pod("shop", "web-5d8f7c9b6-ddddd", 6, NODE, Some(web)));
    until("ADDED pod", || {
        matches!(
            lookup(&watching, &PODS.uid(6), Some(&container_id(6))),
            Lookup::Known(_)
        )
    })
    .await;
    eprintln!(
        "new pod known {:?} after the API server had it",
        added_at.elapsed()
    );
    let sidecar = container_id(7);
    let two = pod(&PodSpec {
        namespace: "shop",
        name: "web-5d8f7c9b6-ddddd",
        uid: &PODS.uid(6),
        node: NODE,
        owner: Some(web),
        containers: &[("app", Some(&container_id(6))), ("proxy", Some(&sidecar))],
        annotations: &[],
    });
    api.put_pod(two);
    // Before the MODIFIED event the sidecar's ID is unknown and the pod has
    // one app container, so the fallback names that one.
    until("MODIFIED pod", || {
        match lookup(&watching, &PODS.uid(6), Some(&sidecar)) {
            known @ Lookup::Known(_) => labels(known)[2] == "proxy",
            _ => false,
        }
    })
    .await;
    api.delete_pod("shop", "web-5d8f7c9b6-ddddd");
    until("DELETED pod", || {
        watching.metrics.events.with_label_values(&["delete"]).get() == 1
    })
    .await;
    // Deleted pods keep their labels until the grace period ends.
    assert!(matches!(
        lookup(&watching, &PODS.uid(6), Some(&sidecar)),
        Lookup::Known(_)
    ));
    let purged = lock_index(&watching.index).purge_deleted(Instant::now(), Duration::ZERO);
    assert_eq!(purged.len(), 2, "both containers' label sets");
    assert_eq!(
        lookup(&watching, &PODS.uid(6), Some(&sidecar)),
        Lookup::Pending
    );

    // The ReplicaSet was fetched once for its three pods, the Job once.
    let requests = api.requests();
    let fetched = |path: &str| requests.iter().filter(|r| r.contains(path)).count();
    assert_eq!(fetched("/replicasets/web-5d8f7c9b6"), 1, "{requests:#?}");
    assert_eq!(fetched("/jobs/nightly-29012345"), 1);
    // Only this node's pods were ever asked for, and watches ask for bookmarks.
    let pod_requests: Vec<&String> = requests
        .iter()
        .filter(|r| r.contains("/api/v1/pods"))
        .collect();
    assert!(
        pod_requests
            .iter()
            .all(|r| r.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "{pod_requests:#?}"
    );
    assert!(
        pod_requests
            .iter()
            .any(|r| r.contains("watch=true") && r.contains("allowWatchBookmarks=true"))
    );

    // A watch cut mid-stream resumes from its resourceVersion: no relist.
    api.cut_watches();
    api.put_pod(app_pod("shop", "after-cut", 8, NODE, None));
    until("pod added after the cut", || {
        matches!(
            lookup(&watching, &PODS.uid(8), Some(&container_id(8))),
            Lookup::Known(_)
        )
    })
    .await;
    assert_eq!(watching.metrics.relists.get(), 1);

    // Bookmarks carry versions this watch never saw an event for (another
    // node's pod): resumed from the bookmark after compaction, no relist.
    api.put_pod(app_pod(
        "shop",
        "web-5d8f7c9b6-eeeee",
        10,
        "node-b",
        Some(web),
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    api.compact();
    api.cut_watches();
    api.put_pod(app_pod("shop", "after-compaction", 11, NODE, None));
    until("pod added after compaction", || {
        matches!(
            lookup(&watching, &PODS.uid(11), Some(&container_id(11))),
            Lookup::Known(_)
        )
    })
    .await;
    assert_eq!(
        watching.metrics.relists.get(),
        1,
        "resumed from the bookmark, no relist"
    );
    assert_eq!(watching.metrics.errors.get(), 0);

    // An outage during which a pod is deleted and history compacted: the
    // resumed watch gets 410 Gone, relists, and notices the deletion.
    api.stop();
    api.delete_pod("shop", "db-0");
    api.compact();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let errors_during_outage = watching.metrics.errors.get();
    assert!(errors_during_outage >= 1, "the outage was noticed");
    api.restart();
    let reconnect = until("relist after 410", || watching.metrics.relists.get() == 2).await;
    eprintln!("relisted {reconnect:?} after the API server came back (2 s outage)");
    assert!(
        lock_index(&watching.index)
            .purge_deleted(Instant::now(), Duration::ZERO)
            .iter()
            .any(|identity| matches!(&identity.labels, IdentityLabels::Pod { pod, .. } if pod == "db-0"))
    );
    let requests = api.requests();
    assert!(
        requests
            .iter()
            .filter(|r| r.contains("/api/v1/pods"))
            .all(|r| r.contains("spec.nodeName%3Dnode-a"))
    );
}

impl Watching {
    fn health_synced(&self) -> bool {
        self.metrics.synced.get() == 1
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_api_server_is_retried_until_it_answers() {
    let mut api = KubeApi::start();
    api.put_pod(app_pod("shop", "early", 1, NODE, None));
    api.stop();
    let watching = watch(&api, Selection::default()).await;
    until("errors counted", || watching.metrics.errors.get() >= 2).await;
    assert_eq!(watching.metrics.synced.get(), 0);
    assert!(watching.metrics.last_error.get() > 0.0);
    api.restart();
    let took = until("sync after the API server came up", || {
        watching.health_synced()
    })
    .await;
    eprintln!("synced {took:?} after the API server came up");
    assert!(matches!(
        lookup(&watching, &PODS.uid(1), Some(&container_id(1))),
        Lookup::Known(_)
    ));
    assert!(watching.health.is_synced());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotations_and_namespaces_select_pods() {
    let api = KubeApi::start();
    let opted_out = pod(&PodSpec {
        namespace: "shop",
        name: "quiet",
        uid: &PODS.uid(1),
        node: NODE,
        owner: None,
        containers: &[("app", Some(&container_id(1)))],
        annotations: &[(MONITOR_ANNOTATION, "false")],
    });
    api.put_pod(opted_out);
    api.put_pod(app_pod("shop", "plain", 2, NODE, None));
    api.put_pod(app_pod("billing", "invoices", 3, NODE, None));
    let watching = watch(
        &api,
        Selection {
            opt_in: false,
            namespaces: vec!["shop".to_owned()],
        },
    )
    .await;
    until("first sync", || watching.health_synced()).await;
    assert_eq!(
        lookup(&watching, &PODS.uid(1), Some(&container_id(1))),
        Lookup::Excluded
    );
    assert!(matches!(
        lookup(&watching, &PODS.uid(2), Some(&container_id(2))),
        Lookup::Known(_)
    ));
    assert_eq!(
        lookup(&watching, &PODS.uid(3), Some(&container_id(3))),
        Lookup::Excluded
    );
}
