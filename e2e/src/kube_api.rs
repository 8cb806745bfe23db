//! An in-test Kubernetes API server: no real one can run on these machines,
//! so this speaks the parts of the real protocol the exporter's `kube`
//! client uses, with real object JSON:
//!
//! - `GET /api/v1/pods?fieldSelector=spec.nodeName=<node>` lists (PodList
//!   with a resourceVersion);
//! - `…&watch=true&resourceVersion=<rv>&allowWatchBookmarks=true` streams
//!   newline-delimited ADDED/MODIFIED/DELETED events after `rv`, BOOKMARK
//!   events, and an ERROR event with a 410 Status once `rv` was compacted;
//! - `GET /apis/apps/v1/namespaces/<ns>/replicasets/<name>` and
//!   `/apis/batch/v1/namespaces/<ns>/jobs/<name>`; 404 Status otherwise.
//!
//! Tests drive it: add, modify and delete objects; cut open watches; compact
//! history (the next resume gets 410 Gone); stop and restart the server on
//! the same port (an outage); read the log of requests it served.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::TcpListener,
    sync::{Arc, Mutex, MutexGuard},
    thread::JoinHandle,
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::State,
    http::{StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};

/// How often an open watch gets a BOOKMARK when it asked for them.
const BOOKMARK_EVERY: Duration = Duration::from_millis(500);

#[derive(Default)]
struct Objects {
    resource_version: u64,
    /// Watches resuming before this version get 410 Gone.
    oldest_resumable: u64,
    pods: BTreeMap<(String, String), Value>,
    /// Other kinds by API path (`/apis/apps/v1/namespaces/ns/replicasets/name`).
    others: BTreeMap<String, Value>,
    /// Pod events: (resourceVersion, type, object).
    events: Vec<(u64, &'static str, Value)>,
    /// Request lines served: `GET /path?query`.
    requests: Vec<String>,
}

struct Shared {
    objects: Mutex<Objects>,
    /// Bumped on every pod event, to wake open watches.
    changed: watch::Sender<u64>,
    /// Bumped to end every open watch.
    cut: watch::Sender<u64>,
}

struct Running {
    stop: oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

pub struct KubeApi {
    pub port: u16,
    shared: Arc<Shared>,
    running: Option<Running>,
    /// Holds the kubeconfig that points at this server.
    _dir: tempfile::TempDir,
    kubeconfig: String,
}

impl KubeApi {
    pub fn start() -> KubeApi {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind in-test API server");
        let port = listener.local_addr().expect("address").port();
        let shared = Arc::new(Shared {
            objects: Mutex::new(Objects::default()),
            changed: watch::channel(0).0,
            cut: watch::channel(0).0,
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let mut api = KubeApi {
            port,
            shared,
            running: None,
            kubeconfig: dir.path().join("kubeconfig").to_string_lossy().into_owned(),
            _dir: dir,
        };
        api.write_kubeconfig();
        api.serve(listener);
        api
    }

    fn serve(&mut self, listener: TcpListener) {
        listener.set_nonblocking(true).expect("nonblocking");
        let (stop, stopped) = oneshot::channel();
        let shared = self.shared.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let app = Router::new().fallback(handle).with_state(shared);
                tokio::select! {
                    _ = axum::serve(listener, app) => {}
                    _ = stopped => {}
                }
            });
            // Dropping the runtime cancels every connection: an outage.
        });
        self.running = Some(Running { stop, thread });
    }

    /// Stops answering; open connections are cut.
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            let _ = running.stop.send(());
            let _ = running.thread.join();
        }
    }

    /// Serves again on the same port, with the same objects.
    pub fn restart(&mut self) {
        self.stop();
        let listener = TcpListener::bind(("127.0.0.1", self.port)).expect("rebind API port");
        self.serve(listener);
    }

    fn objects(&self) -> MutexGuard<'_, Objects> {
        self.shared.objects.lock().expect("objects")
    }

    fn pod_event(&self, kind: &'static str, mut pod: Value) {
        let mut objects = self.objects();
        objects.resource_version += 1;
        let version = objects.resource_version;
        pod["metadata"]["resourceVersion"] = json!(version.to_string());
        let key = pod_key(&pod);
        if kind == "DELETED" {
            objects.pods.remove(&key);
        } else {
            objects.pods.insert(key, pod.clone());
        }
        objects.events.push((version, kind, pod));
        drop(objects);
        self.shared.changed.send_modify(|count| *count += 1);
    }

    /// Creates or replaces a pod (ADDED or MODIFIED).
    pub fn put_pod(&self, pod: Value) {
        let exists = { self.objects().pods.contains_key(&pod_key(&pod)) };
        self.pod_event(if exists { "MODIFIED" } else { "ADDED" }, pod);
    }

    pub fn delete_pod(&self, namespace: &str, name: &str) {
        let pod = self
            .objects()
            .pods
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
            .unwrap_or_else(|| panic!("no pod {namespace}/{name}"));
        self.pod_event("DELETED", pod);
    }

    /// Serves a ReplicaSet or Job at its API path.
    pub fn put_object(&self, object: Value) {
        let metadata = &object["metadata"];
        let namespace = metadata["namespace"].as_str().unwrap_or_default();
        let name = metadata["name"].as_str().unwrap_or_default();
        let path = match object["kind"].as_str() {
            Some("ReplicaSet") => {
                format!("/apis/apps/v1/namespaces/{namespace}/replicasets/{name}")
            }
            Some("Job") => format!("/apis/batch/v1/namespaces/{namespace}/jobs/{name}"),
            other => panic!("in-test API server does not serve {other:?}"),
        };
        self.objects().others.insert(path, object);
    }

    /// Ends every open watch (the client resumes from its last version).
    pub fn cut_watches(&self) {
        self.shared.cut.send_modify(|count| *count += 1);
    }

    /// Forgets history, as etcd compaction does: resuming a watch from any
    /// version older than the current one gets 410 Gone.
    pub fn compact(&self) {
        let mut objects = self.objects();
        objects.oldest_resumable = objects.resource_version;
    }

    pub fn requests(&self) -> Vec<String> {
        self.objects().requests.clone()
    }

    /// Path of a kubeconfig for this server (plain HTTP, no credentials).
    /// The exporter's flags for Kubernetes mode against this server, as
    /// node `node`, followed by `extra`.
    pub fn exporter_args<'a>(&'a self, node: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec!["--kubeconfig", self.kubeconfig(), "--node-name", node];
        args.extend_from_slice(extra);
        args
    }

    pub fn kubeconfig(&self) -> &str {
        &self.kubeconfig
    }

    fn write_kubeconfig(&self) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: http://127.0.0.1:{}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\ncurrent-context: test\nusers:\n- name: test\n  user: {{}}\n",
            self.port
        );
        std::fs::write(&self.kubeconfig, text).expect("write kubeconfig");
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.stop();
    }
}

/// (namespace, name) of an object.
fn pod_key(pod: &Value) -> (String, String) {
    let field = |name: &str| {
        pod["metadata"][name]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    (field("namespace"), field("name"))
}

fn query_params(uri: &Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(key, value)| {
            let decode = |text: &str| {
                percent_encoding::percent_decode_str(&text.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (decode(key), decode(value))
        })
        .collect()
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Whether a pod passes a field selector (only `spec.nodeName=` and
/// `metadata.namespace=` terms, which is all an agent should use).
fn selected(pod: &Value, selector: Option<&String>) -> bool {
    selector.is_none_or(|selector| {
        selector.split(',').all(|term| match term.split_once('=') {
            Some(("spec.nodeName", node)) => pod["spec"]["nodeName"] == node,
            Some(("metadata.namespace", namespace)) => pod["metadata"]["namespace"] == namespace,
            _ => false,
        })
    })
}

async fn handle(State(shared): State<Arc<Shared>>, uri: Uri) -> Response {
    let params = query_params(&uri);
    let mut objects = shared.objects.lock().expect("objects");
    objects.requests.push(format!("GET {uri}"));
    let path = uri.path();
    if path != "/api/v1/pods" {
        return match objects.others.get(path) {
            Some(object) => json_response(StatusCode::OK, object),
            None => json_response(
                StatusCode::NOT_FOUND,
                &status(404, "NotFound", &format!("{path} not found")),
            ),
        };
    }
    let field_selector = params.get("fieldSelector");
    if params
        .get("watch")
        .is_none_or(|watch| watch != "true" && watch != "1")
    {
        let items: Vec<Value> = objects
            .pods
            .values()
            .filter(|pod| selected(pod, field_selector))
            .cloned()
            .collect();
        let list = json!({"kind": "PodList", "apiVersion": "v1",
            "metadata": {"resourceVersion": objects.resource_version.to_string()}, "items": items});
        return json_response(StatusCode::OK, &list);
    }

    let from: u64 = params
        .get("resourceVersion")
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(objects.resource_version);
    let bookmarks = params
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let timeout = Duration::from_secs(
        params
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(290),
    );
    let gone = from < objects.oldest_resumable;
    drop(objects);
    let (lines, body) = mpsc::channel::<Bytes>(64);
    let selector = field_selector.cloned();
    tokio::spawn(async move {
        if gone {
            let error = status(410, "Expired", &format!("too old resource version: {from}"));
            let _ = lines
                .send(Bytes::from(format!(
                    "{}\n",
                    json!({"type": "ERROR", "object": error})
                )))
                .await;
            return;
        }
        stream_events(shared, from, selector, bookmarks, timeout, lines).await;
    });
    let stream = futures_util::stream::unfold(body, |mut body| async move {
        body.recv()
            .await
            .map(|line| (Ok::<_, Infallible>(line), body))
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn stream_events(
    shared: Arc<Shared>,
    mut sent: u64,
    selector: Option<String>,
    bookmarks: bool,
    timeout: Duration,
    lines: mpsc::Sender<Bytes>,
) {
    let mut changed = shared.changed.subscribe();
    let mut cut = shared.cut.subscribe();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let (pending, current) = {
            let objects = shared.objects.lock().expect("objects");
            let pending: Vec<String> = objects
                .events
                .iter()
                .filter(|(version, _, pod)| *version > sent && selected(pod, selector.as_ref()))
                .map(|(_, kind, pod)| json!({"type": kind, "object": pod}).to_string())
                .collect();
            (pending, objects.resource_version)
        };
        for line in pending {
            if lines.send(Bytes::from(line + "\n")).await.is_err() {
                return;
            }
        }
        sent = current;
        tokio::select! {
            _ = changed.changed() => {}
            _ = cut.changed() => return,
            _ = tokio::time::sleep_until(deadline) => return,
            _ = tokio::time::sleep(BOOKMARK_EVERY), if bookmarks => {
                let bookmark = json!({"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1",
                    "metadata": {"resourceVersion": sent.to_string()}}});
                if lines.send(Bytes::from(bookmark.to_string() + "\n")).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// What a test pod looks like.
pub struct PodSpec<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    pub node: &'a str,
    /// The controller: (kind, name).
    pub owner: Option<(&'a str, &'a str)>,
    /// App containers: (name, containerd ID once the status has it).
    pub containers: &'a [(&'a str, Option<&'a str>)],
    pub annotations: &'a [(&'a str, &'a str)],
}

fn owner_reference(kind: &str, name: &str) -> Value {
    let api_version = match kind {
        "ReplicaSet" | "Deployment" | "StatefulSet" | "DaemonSet" => "apps/v1",
        "Job" | "CronJob" => "batch/v1",
        _ => "v1",
    };
    json!({"apiVersion": api_version, "kind": kind, "name": name,
           "uid": format!("{:08x}-0000-4000-8000-000000000000", name.len()),
           "controller": true, "blockOwnerDeletion": true})
}

/// The pod UIDs of one test file: those of different files never collide,
/// so their cgroups and Pod objects stay apart.
#[derive(Clone, Copy, Debug)]
pub struct PodUids(pub u16);

impl PodUids {
    /// The UID of pod number `n`.
    pub fn uid(self, n: usize) -> String {
        format!("{n:08x}-{:04x}-4bbb-8ccc-000000000000", self.0)
    }
}

/// A container ID as the runtime writes it (64 hex digits), for container
/// number `n`.
pub fn container_id(n: usize) -> String {
    format!("{n:064x}")
}

/// A Pod object as the API server returns it for a running pod.
pub fn pod(spec: &PodSpec<'_>) -> Value {
    let annotations: BTreeMap<&str, &str> = spec.annotations.iter().copied().collect();
    let containers: Vec<Value> = spec
        .containers
        .iter()
        .map(|(name, _)| {
            json!({"name": name, "image": "registry.example/flask-app:1.0",
            "ports": [{"containerPort": 8000, "protocol": "TCP"}],
            "resources": {}, "terminationMessagePath": "/dev/termination-log",
            "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent"})
        })
        .collect();
    let statuses: Vec<Value> = spec
        .containers
        .iter()
        .map(|(name, id)| {
            let mut status = json!({"name": name, "image": "registry.example/flask-app:1.0",
                "imageID": "registry.example/flask-app@sha256:0000000000000000000000000000000000000000000000000000000000000000",
                "ready": id.is_some(), "restartCount": 0, "started": id.is_some(),
                "state": if id.is_some() {
                    json!({"running": {"startedAt": "2026-11-25T08:00:00Z"}})
                } else {
                    json!({"waiting": {"reason": "ContainerCreating"}})
                }});
            if let Some(id) = id {
                status["containerID"] = json!(format!("containerd://{id}"));
            }
            status
        })
        .collect();
    let mut pod = json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "uid": spec.uid,
            "creationTimestamp": "2026-11-25T08:00:00Z",
            "labels": {"app": spec.name}, "annotations": annotations},
        "spec": {"nodeName": spec.node, "containers": containers, "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default", "schedulerName": "default-scheduler"},
        "status": {"phase": "Running", "hostIP": "10.0.0.1", "podIP": "10.244.1.7",
            "qosClass": "Burstable", "startTime": "2026-11-25T08:00:00Z",
            "containerStatuses": statuses}
    });
    if let Some((kind, name)) = spec.owner {
        pod["metadata"]["ownerReferences"] = json!([owner_reference(kind, name)]);
        if kind == "ReplicaSet"
            && let Some((_, hash)) = name.rsplit_once('-')
        {
            pod["metadata"]["labels"]["pod-template-hash"] = json!(hash);
        }
    }
    pod
}

/// A ReplicaSet owned by a Deployment, or a Job owned by a CronJob.
pub fn owned_by(kind: &str, namespace: &str, name: &str, owner: (&str, &str)) -> Value {
    let api_version = if kind == "ReplicaSet" {
        "apps/v1"
    } else {
        "batch/v1"
    };
    json!({"kind": kind, "apiVersion": api_version,
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": "1",
            "uid": format!("{:08x}-1111-4000-8000-000000000000", name.len()),
            "creationTimestamp": "2026-11-25T07:59:00Z",
            "ownerReferences": [owner_reference(owner.0, owner.1)]},
        "spec": {"selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {}, "spec": {"containers": []}}},
        "status": {"replicas": 1}})
}
