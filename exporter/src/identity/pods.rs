//! This node's pods as the identity stage needs them: container ID and pod
//! UID → the labels of the container, kept current by the Kubernetes watch
//! (see `kubernetes.rs`) and read by the pipeline thread.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};

use super::cgroup::bare_container_id;
use crate::exchange::{ContainerRef, PodUid};
use crate::{
    exchange::{Identity, PodGrain, PodLabels, UNKNOWN, WorkloadKey},
    rules::{flask::RuleSet, regexes::SharedBudgets},
};

/// Pod annotation that selects a pod in or out (`"true"` / `"false"`).
pub const MONITOR_ANNOTATION: &str = "flask-ebpf-exporter.io/monitor";

/// Pod annotation with the workload's Flask rules, one a line, as
/// `--routes-file` takes them.
pub const ROUTES_ANNOTATION: &str = "flask-ebpf-exporter.io/routes";

/// Largest routes annotation read; a larger one is refused whole.
pub const MAX_ROUTES_ANNOTATION_BYTES: usize = 64 * 1024;
/// Most rules read from one routes annotation; the rest are refused.
pub const MAX_ANNOTATION_RULES: usize = 500;

/// A pod's routes annotation, parsed (outside the pod index's lock).
#[derive(Clone, Debug)]
pub struct RoutesAnnotation {
    /// Of the annotation's text: tells whether it changed.
    pub text_hash: u64,
    pub rules: Arc<RuleSet>,
}

impl PartialEq for RoutesAnnotation {
    fn eq(&self, other: &Self) -> bool {
        self.text_hash == other.text_hash
    }
}

/// Why (part of) a routes annotation was refused.
#[derive(Debug, thiserror::Error)]
pub enum AnnotationError {
    #[error("{bytes} bytes, more than {MAX_ROUTES_ANNOTATION_BYTES}: every rule refused")]
    TooLarge { bytes: usize },
    #[error("{rules} rules, more than {MAX_ANNOTATION_RULES}: the rest refused")]
    TooManyRules { rules: usize },
    #[error(transparent)]
    Rule(#[from] crate::rules::flask::RuleError),
}

/// The hash [`RoutesAnnotation::text_hash`] has.
pub fn text_hash(text: &str) -> u64 {
    use std::hash::BuildHasher as _;
    std::hash::BuildHasherDefault::<std::hash::DefaultHasher>::default().hash_one(text)
}

/// Parses a routes annotation within its bounds: what is refused is
/// returned beside the rules that apply.
pub fn parse_routes_annotation(
    text: &str,
    workload: &WorkloadKey,
) -> (RoutesAnnotation, Vec<AnnotationError>) {
    let text_hash = text_hash(text);
    if text.len() > MAX_ROUTES_ANNOTATION_BYTES {
        let refused = AnnotationError::TooLarge { bytes: text.len() };
        let rules = Arc::new(RuleSet::default());
        return (RoutesAnnotation { text_hash, rules }, vec![refused]);
    }
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| !line.split('#').next().unwrap_or_default().trim().is_empty())
        .collect();
    let mut errors = Vec::new();
    if lines.len() > MAX_ANNOTATION_RULES {
        errors.push(AnnotationError::TooManyRules { rules: lines.len() });
    }
    let kept = lines[..lines.len().min(MAX_ANNOTATION_RULES)].join("\n");
    let (rules, rule_errors) =
        RuleSet::parse_within(&kept, SharedBudgets::of_workload(&format!("{workload:?}")));
    errors.extend(rule_errors.into_iter().map(AnnotationError::from));
    let rules = Arc::new(rules);
    (RoutesAnnotation { text_hash, rules }, errors)
}

/// What owns a pod, after following ReplicaSet → Deployment and Job → CronJob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub kind: String,
    pub name: String,
}

/// Which pods are monitored.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// Only pods annotated `monitor: "true"`; otherwise all but `"false"`.
    pub opt_in: bool,
    /// Only these namespaces; empty means all.
    pub namespaces: Vec<String>,
}

impl Selection {
    pub fn selects(&self, namespace: &str, annotations: &BTreeMap<String, String>) -> bool {
        if !self.namespaces.is_empty() && !self.namespaces.iter().any(|ns| ns == namespace) {
            return false;
        }
        match annotations.get(MONITOR_ANNOTATION).map(String::as_str) {
            Some("true") => true,
            Some("false") => false,
            _ => !self.opt_in,
        }
    }
}

/// The part of a Pod object the identity stage uses.
#[derive(Clone, Debug, PartialEq)]
pub struct PodInfo {
    pub uid: PodUid,
    pub namespace: String,
    pub name: String,
    pub workload: Workload,
    /// Container name → runtime container ID, for init, app and ephemeral
    /// containers whose ID the status already has.
    pub container_ids: Vec<(String, String)>,
    /// Names of the app containers in the spec.
    pub app_containers: Vec<String>,
    pub selected: bool,
    /// The routes annotation, parsed; `None` without one, and for pods
    /// selected out (never parsed).
    pub routes: Option<RoutesAnnotation>,
}

impl PodInfo {
    /// `None` for objects without a UID (never sent by a real API server).
    pub fn from_pod(pod: &Pod, workload: Workload, selection: &Selection) -> Option<PodInfo> {
        let metadata = &pod.metadata;
        let uid = PodUid::parse(metadata.uid.as_deref()?)?;
        let namespace = metadata.namespace.clone().unwrap_or_default();
        let status = pod.status.as_ref();
        let statuses = status
            .into_iter()
            .flat_map(|status| {
                let lists: [&Option<Vec<ContainerStatus>>; 3] = [
                    &status.container_statuses,
                    &status.init_container_statuses,
                    &status.ephemeral_container_statuses,
                ];
                lists.into_iter().flatten().flatten()
            })
            .filter_map(|status| {
                let id = status.container_id.as_deref()?;
                Some((status.name.clone(), bare_container_id(id).to_owned()))
            })
            .collect();
        let app_containers = pod
            .spec
            .iter()
            .flat_map(|spec| {
                spec.containers
                    .iter()
                    .map(|container| container.name.clone())
            })
            .collect();
        let empty = BTreeMap::new();
        let annotations = metadata.annotations.as_ref().unwrap_or(&empty);
        Some(PodInfo {
            uid,
            selected: selection.selects(&namespace, annotations),
            routes: None,
            namespace,
            name: metadata.name.clone().unwrap_or_default(),
            workload,
            container_ids: statuses,
            app_containers,
        })
    }

    /// The routes annotation's text, if the pod has one.
    pub fn routes_text(pod: &Pod) -> Option<&str> {
        pod.metadata
            .annotations
            .as_ref()?
            .get(ROUTES_ANNOTATION)
            .map(String::as_str)
    }

    pub fn workload_key(&self) -> WorkloadKey {
        WorkloadKey::Pod {
            namespace: self.namespace.clone(),
            workload: self.workload.name.clone(),
            workload_kind: self.workload.kind.clone(),
        }
    }

    fn identity(&self, container: &str, grain: PodGrain) -> Identity {
        Identity::new(grain.labels(PodLabels {
            namespace: &self.namespace,
            pod: &self.name,
            container,
            workload: &self.workload.name,
            workload_kind: &self.workload.kind,
        }))
    }
}

/// What the index says about a container.
#[derive(Clone, Debug, PartialEq)]
pub enum Lookup {
    Known(Arc<Identity>),
    /// The pod is selected out (annotation or namespace filter).
    Excluded,
    /// The pod, or which of its containers this is, is not known yet.
    Pending,
}

#[derive(Debug)]
struct PodEntry {
    info: PodInfo,
    /// The identity of each container seen serving, made once.
    identities: HashMap<String, Arc<Identity>>,
    deleted_at: Option<Instant>,
}

impl PodEntry {
    fn new(info: PodInfo) -> Self {
        PodEntry {
            info,
            identities: HashMap::new(),
            deleted_at: None,
        }
    }

    fn identity(&mut self, container: &str, grain: PodGrain) -> Arc<Identity> {
        if let Some(identity) = self.identities.get(container) {
            return identity.clone();
        }
        let identity = Arc::new(self.info.identity(container, grain));
        self.identities
            .insert(container.to_owned(), identity.clone());
        identity
    }
}

/// The pod index shared by the Kubernetes watch (writer) and the pipeline.
pub type SharedPodIndex = Arc<Mutex<PodIndex>>;

pub fn lock_index(index: &SharedPodIndex) -> MutexGuard<'_, PodIndex> {
    // The index stays consistent between statements, so a panic elsewhere
    // leaves nothing half-written worth refusing.
    index.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The node's pods, by UID and by container ID.
#[derive(Debug, Default)]
pub struct PodIndex {
    pods: HashMap<PodUid, PodEntry>,
    by_container_id: HashMap<String, PodUid>,
    /// User rules from pods' routes annotations, by workload.
    workload_rules: HashMap<WorkloadKey, RoutesAnnotation>,
    /// Identities a live pod stopped having (its workload changed), and
    /// since when: their series stay for the grace period, as a deleted
    /// pod's do.
    retired: Vec<(Instant, Arc<Identity>)>,
    /// Bumped on every change, so held traffic is retried only when it may
    /// resolve differently.
    generation: u64,
    /// Bumped when a known pod that was selected out becomes selected: what
    /// was judged not monitored must be followed again.
    selections: u64,
    /// Which labels identities keep: under `--aggregate-by workload` the
    /// pods of a workload share one identity, kept while any pod has it.
    grain: PodGrain,
}

impl PodIndex {
    pub fn new(grain: PodGrain) -> Self {
        PodIndex {
            grain,
            ..PodIndex::default()
        }
    }

    pub fn grain(&self) -> PodGrain {
        self.grain
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Changes by which a pod known to be selected out became selected.
    pub fn selections(&self) -> u64 {
        self.selections
    }

    /// Pods known, including deleted ones still in their grace period.
    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// A pod was added or changed at `now`.
    pub fn apply(&mut self, info: PodInfo, now: Instant) {
        self.generation += 1;
        if let Some(routes) = &info.routes {
            self.workload_rules
                .insert(info.workload_key(), routes.clone());
        }
        // The pod's previous container IDs go first: a new status may have
        // dropped some, and the ones it keeps are added back below.
        if let Some(previous) = self.pods.get(&info.uid).map(|entry| entry.info.clone()) {
            self.forget_container_ids(&previous);
            if !previous.selected && info.selected {
                self.selections += 1;
            }
        }
        for (_, id) in &info.container_ids {
            self.by_container_id.insert(id.clone(), info.uid.clone());
        }
        match self.pods.get_mut(&info.uid) {
            // Keep the identities when nothing they carry changed.
            Some(entry)
                if entry.info.namespace == info.namespace
                    && entry.info.name == info.name
                    && entry.info.workload == info.workload =>
            {
                entry.info = info;
                entry.deleted_at = None;
            }
            _ => {
                let uid = info.uid.clone();
                if let Some(previous) = self.pods.insert(uid, PodEntry::new(info)) {
                    // Relabelled (e.g. its ownerReferences changed): the old
                    // identities' series go a grace period after their last
                    // retirement.
                    let identities: Vec<Arc<Identity>> =
                        previous.identities.into_values().collect();
                    self.retired
                        .retain(|(_, retired)| !identities.contains(retired));
                    self.retired
                        .extend(identities.into_iter().map(|identity| (now, identity)));
                }
            }
        }
    }

    /// A pod was deleted: its labels stay until [`Self::purge_deleted`].
    pub fn delete(&mut self, uid: &PodUid, now: Instant) {
        if let Some(entry) = self.pods.get_mut(uid) {
            entry.deleted_at.get_or_insert(now);
            self.generation += 1;
        }
    }

    /// A relist ended: pods it did not return were deleted while the watch
    /// was away.
    pub fn retain_listed(&mut self, listed: &HashSet<PodUid>, now: Instant) {
        let missing: Vec<PodUid> = self
            .pods
            .keys()
            .filter(|uid| !listed.contains(*uid))
            .cloned()
            .collect();
        for uid in missing {
            self.delete(&uid, now);
        }
    }

    /// Drops pods deleted more than `grace` ago, and identities retired
    /// more than `grace` ago; returns the identities whose series should
    /// go: those no live pod has (again).
    pub fn purge_deleted(&mut self, now: Instant, grace: Duration) -> Vec<Arc<Identity>> {
        let expired = |since: Instant| now.saturating_duration_since(since) >= grace;
        let gone: Vec<PodUid> = self
            .pods
            .iter()
            .filter(|(_, entry)| entry.deleted_at.is_some_and(expired))
            .map(|(uid, _)| uid.clone())
            .collect();
        let mut released: Vec<Arc<Identity>> = Vec::new();
        for uid in gone {
            if let Some(entry) = self.pods.remove(&uid) {
                self.forget_container_ids(&entry.info);
                released.extend(entry.identities.into_values());
                self.generation += 1;
            }
        }
        let (due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retired)
            .into_iter()
            .partition(|(since, _)| expired(*since));
        self.retired = waiting;
        released.extend(due.into_iter().map(|(_, identity)| identity));
        if released.is_empty() {
            return released;
        }
        let live: HashSet<&Identity> = self
            .pods
            .values()
            .flat_map(|entry| entry.identities.values().map(|identity| &**identity))
            .collect();
        let mut seen = HashSet::new();
        released.retain(|identity| !live.contains(&**identity) && seen.insert(identity.clone()));
        let workloads: HashSet<WorkloadKey> = self
            .pods
            .values()
            .map(|entry| entry.info.workload_key())
            .collect();
        self.workload_rules.retain(|key, _| workloads.contains(key));
        released
    }

    fn forget_container_ids(&mut self, info: &PodInfo) {
        for (_, id) in &info.container_ids {
            if self.by_container_id.get(id) == Some(&info.uid) {
                self.by_container_id.remove(id);
            }
        }
    }

    /// Every pod known, with when it was deleted (pods stay for the grace
    /// period).
    pub fn pods(&self) -> impl Iterator<Item = (&PodInfo, Option<Instant>)> {
        self.pods
            .values()
            .map(|entry| (&entry.info, entry.deleted_at))
    }

    /// The user rules a pod annotation gives this workload.
    pub fn workload_rules(&self, workload: &WorkloadKey) -> Option<Arc<RuleSet>> {
        self.workload_rules
            .get(workload)
            .map(|routes| routes.rules.clone())
    }

    /// The workload's parsed annotation, if its text is the one hashed:
    /// saves parsing it again.
    pub fn parsed_annotation(
        &self,
        workload: &WorkloadKey,
        text_hash: u64,
    ) -> Option<RoutesAnnotation> {
        self.workload_rules
            .get(workload)
            .filter(|routes| routes.text_hash == text_hash)
            .cloned()
    }

    /// Whether the container's pod is known and selected out: its traffic
    /// need not be captured at all. (A pod not known yet is followed: it
    /// may turn out selected.)
    pub fn selected_out(&self, container: &ContainerRef) -> bool {
        self.pods
            .get(self.pod_uid(container))
            .is_some_and(|entry| !entry.info.selected)
    }

    /// The pod of a container: by its container ID when the pod status
    /// lists it, else the UID its cgroup path names.
    fn pod_uid<'a>(&'a self, container: &'a ContainerRef) -> &'a PodUid {
        container
            .container_id
            .as_ref()
            .and_then(|id| self.by_container_id.get(id))
            .unwrap_or(&container.pod_uid)
    }

    /// The identity of a container. With `give_up`, a pod whose container
    /// cannot be told apart is exported with an unknown container name
    /// instead of waiting.
    pub fn lookup(&mut self, container: &ContainerRef, give_up: bool) -> Lookup {
        let by_id = container
            .container_id
            .as_ref()
            .and_then(|id| Some((id, self.by_container_id.get(id)?.clone())));
        let uid = self.pod_uid(container).clone();
        let Some(entry) = self.pods.get_mut(&uid) else {
            return Lookup::Pending;
        };
        if !entry.info.selected {
            return Lookup::Excluded;
        }
        let name = match &by_id {
            Some((id, _)) => entry
                .info
                .container_ids
                .iter()
                .find(|(_, known)| known == *id)
                .map(|(name, _)| name.clone()),
            None => None,
        };
        // A new container's ID reaches the pod status a little after it
        // starts; a pod with one app container cannot be wrong meanwhile.
        let name = name.or_else(|| match entry.info.app_containers.as_slice() {
            [only] => Some(only.clone()),
            _ => None,
        });
        match name {
            Some(name) => Lookup::Known(entry.identity(&name, self.grain)),
            None if give_up => Lookup::Known(entry.identity(UNKNOWN, self.grain)),
            None => Lookup::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID_A: &str = "11111111-2222-3333-4444-555555555555";
    const ID_A: &str = "aaaaaaaaaaaaaaaaaaaa";
    const ID_SIDECAR: &str = "bbbbbbbbbbbbbbbbbbbb";

    fn pod_json(annotations: serde_json::Value, statuses: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-7d9c6b5f4-x2x9k", "namespace": "shop", "uid": UID_A,
                         "annotations": annotations},
            "spec": {"nodeName": "node-a", "containers": [{"name": "web"}, {"name": "proxy"}]},
            "status": {"containerStatuses": statuses,
                       "initContainerStatuses": [{"name": "migrate", "image": "i", "imageID": "",
                            "ready": false, "restartCount": 0, "containerID": "containerd://cccccccccccccccccccc"}]}
        }))
        .expect("pod json")
    }

    /// Label values, in exposition order.
    fn values(identity: &Identity) -> Vec<&str> {
        identity
            .labels
            .pairs()
            .into_iter()
            .map(|(_, value)| value)
            .collect()
    }

    fn workload() -> Workload {
        Workload {
            kind: "Deployment".to_owned(),
            name: "web".to_owned(),
        }
    }

    fn reference(id: Option<&str>) -> ContainerRef {
        ContainerRef {
            pod_uid: PodUid::parse(UID_A).expect("uid"),
            container_id: id.map(str::to_owned),
        }
    }

    fn status(name: &str, id: &str) -> serde_json::Value {
        serde_json::json!({"name": name, "image": "i", "imageID": "", "ready": true,
                           "restartCount": 0, "containerID": format!("containerd://{id}")})
    }

    #[test]
    fn containers_resolve_by_id_then_wait_for_their_id() {
        let selection = Selection::default();
        let pod = pod_json(
            serde_json::json!({}),
            serde_json::json!([status("web", ID_A)]),
        );
        let info = PodInfo::from_pod(&pod, workload(), &selection).expect("info");
        assert_eq!(info.container_ids.len(), 2, "app and init containers");
        let mut index = PodIndex::default();
        index.apply(info, Instant::now());

        let Lookup::Known(labels) = index.lookup(&reference(Some(ID_A)), false) else {
            panic!("known by container ID");
        };
        assert_eq!(
            values(&labels),
            ["shop", "web-7d9c6b5f4-x2x9k", "web", "web", "Deployment"]
        );
        // The same Arc every time: one label set per container.
        assert_eq!(
            index.lookup(&reference(Some(ID_A)), false),
            Lookup::Known(labels)
        );
        // Two app containers and no ID yet: wait, then give up on the name.
        assert_eq!(
            index.lookup(&reference(Some(ID_SIDECAR)), false),
            Lookup::Pending
        );
        let Lookup::Known(labels) = index.lookup(&reference(Some(ID_SIDECAR)), true) else {
            panic!("known after giving up");
        };
        assert_eq!(values(&labels)[2], UNKNOWN);
        // The status catches up.
        let pod = pod_json(
            serde_json::json!({}),
            serde_json::json!([status("web", ID_A), status("proxy", ID_SIDECAR)]),
        );
        index.apply(
            PodInfo::from_pod(&pod, workload(), &selection).expect("info"),
            Instant::now(),
        );
        let Lookup::Known(labels) = index.lookup(&reference(Some(ID_SIDECAR)), false) else {
            panic!("known by the new ID");
        };
        assert_eq!(values(&labels)[2], "proxy");
        // Unknown pod.
        let stranger = ContainerRef {
            pod_uid: PodUid::parse("99999999-2222-3333-4444-555555555555").expect("uid"),
            container_id: None,
        };
        assert_eq!(index.lookup(&stranger, true), Lookup::Pending);
    }

    #[test]
    fn a_pod_whose_workload_changes_keeps_its_containers() {
        let selection = Selection::default();
        let pod = pod_json(
            serde_json::json!({}),
            serde_json::json!([status("web", ID_A)]),
        );
        let mut index = PodIndex::default();
        let replicaset = Workload {
            kind: "ReplicaSet".to_owned(),
            name: "web-7d9c6b5f4".to_owned(),
        };
        index.apply(
            PodInfo::from_pod(&pod, replicaset, &selection).expect("info"),
            Instant::now(),
        );
        // The owner lookup answered later: the same pod, a new workload.
        index.apply(
            PodInfo::from_pod(&pod, workload(), &selection).expect("info"),
            Instant::now(),
        );
        let Lookup::Known(labels) = index.lookup(&reference(Some(ID_A)), false) else {
            panic!("still known by container ID");
        };
        assert_eq!(values(&labels)[3..], ["web", "Deployment"]);
    }

    #[test]
    fn a_relabelled_pod_releases_its_old_identities_after_the_grace_period() {
        let selection = Selection::default();
        let pod = pod_json(
            serde_json::json!({}),
            serde_json::json!([status("web", ID_A)]),
        );
        let owner = |name: &str| Workload {
            kind: "StatefulSet".to_owned(),
            name: name.to_owned(),
        };
        let info = |name: &str| PodInfo::from_pod(&pod, owner(name), &selection).expect("info");
        let mut index = PodIndex::default();
        let start = Instant::now();
        let grace = Duration::from_secs(30);
        let identity_now = |index: &mut PodIndex| match index.lookup(&reference(Some(ID_A)), false)
        {
            Lookup::Known(identity) => identity,
            other => panic!("{other:?}"),
        };
        index.apply(info("a"), start);
        let first = identity_now(&mut index);
        index.apply(info("b"), start);
        let second = identity_now(&mut index);
        assert_eq!(values(&second)[3], "b");
        // Back to "a" and on to "c": "a" is live again until the last change.
        index.apply(info("a"), start + grace / 2);
        identity_now(&mut index);
        index.apply(info("c"), start + grace / 2);
        identity_now(&mut index);
        // "a" was retired again: it is due a grace period after that.
        assert!(index.purge_deleted(start + grace, grace).is_empty());
        let released = index.purge_deleted(start + grace / 2 + grace, grace);
        assert_eq!(released.len(), 2, "{released:?}");
        assert!(released.contains(&first) && released.contains(&second));
        assert!(index.purge_deleted(start + grace * 3, grace).is_empty());
        assert_eq!(values(&identity_now(&mut index))[3], "c");
    }

    #[test]
    fn deleted_pods_keep_labels_for_the_grace_period() {
        let selection = Selection::default();
        let pod = pod_json(
            serde_json::json!({}),
            serde_json::json!([status("web", ID_A)]),
        );
        let mut index = PodIndex::default();
        index.apply(
            PodInfo::from_pod(&pod, workload(), &selection).expect("info"),
            Instant::now(),
        );
        let Lookup::Known(labels) = index.lookup(&reference(Some(ID_A)), false) else {
            panic!("known");
        };
        let start = Instant::now();
        index.retain_listed(&HashSet::new(), start);
        assert!(matches!(
            index.lookup(&reference(Some(ID_A)), false),
            Lookup::Known(_)
        ));
        let grace = Duration::from_secs(30);
        assert!(index.purge_deleted(start + grace / 2, grace).is_empty());
        assert_eq!(index.purge_deleted(start + grace, grace), vec![labels]);
        assert!(index.is_empty());
        assert!(index.by_container_id.is_empty());
        assert_eq!(index.lookup(&reference(Some(ID_A)), false), Lookup::Pending);
    }

    /// Under `--aggregate-by workload` a workload's pods share one
    /// identity without pod or container, released with the last of them.
    #[test]
    fn aggregated_pods_share_an_identity_released_with_the_last_one() {
        let selection = Selection::default();
        let replica = |n: usize| {
            let uid = format!("{UID_A:.35}{n}");
            let id = format!("{n}{}", &ID_A[1..]);
            let mut pod = pod_json(
                serde_json::json!({}),
                serde_json::json!([status("web", &id)]),
            );
            pod.metadata.uid = Some(uid.clone());
            pod.metadata.name = Some(format!("web-7d9c6b5f4-{n}"));
            let info = PodInfo::from_pod(&pod, workload(), &selection).expect("info");
            let reference = ContainerRef {
                pod_uid: PodUid::parse(&uid).expect("uid"),
                container_id: Some(id),
            };
            (info, reference)
        };
        let mut index = PodIndex::new(PodGrain::Workload);
        let start = Instant::now();
        let ((first, first_ref), (second, second_ref)) = (replica(1), replica(2));
        let (first_uid, second_uid) = (first.uid.clone(), second.uid.clone());
        index.apply(first, start);
        index.apply(second, start);
        let known =
            |index: &mut PodIndex, reference: &ContainerRef| match index.lookup(reference, false) {
                Lookup::Known(identity) => identity,
                other => panic!("{other:?}"),
            };
        let of_first = known(&mut index, &first_ref);
        assert_eq!(of_first, known(&mut index, &second_ref));
        assert_eq!(values(&of_first), ["shop", "web", "Deployment"]);
        let grace = Duration::from_secs(30);
        index.delete(&first_uid, start);
        assert!(
            index.purge_deleted(start + grace, grace).is_empty(),
            "the other pod still has it"
        );
        assert_eq!(index.len(), 1);
        index.delete(&second_uid, start + grace);
        assert_eq!(
            index.purge_deleted(start + grace * 2, grace),
            vec![of_first]
        );
        assert!(index.is_empty());
    }

    #[test]
    fn a_pod_selected_out_is_known_as_such_until_it_is_selected() {
        let selection = Selection::default();
        let info = |annotations| {
            let pod = pod_json(annotations, serde_json::json!([status("web", ID_A)]));
            PodInfo::from_pod(&pod, workload(), &selection).expect("info")
        };
        let mut index = PodIndex::default();
        // Not known yet: followed, as it may be selected.
        assert!(!index.selected_out(&reference(Some(ID_A))));
        index.apply(
            info(serde_json::json!({MONITOR_ANNOTATION: "false"})),
            Instant::now(),
        );
        assert!(index.selected_out(&reference(Some(ID_A))));
        assert!(
            index.selected_out(&reference(None)),
            "by the cgroup's pod UID"
        );
        assert_eq!(index.selections(), 0);
        index.apply(info(serde_json::json!({})), Instant::now());
        assert!(!index.selected_out(&reference(Some(ID_A))));
        assert_eq!(index.selections(), 1, "selected out, then selected");
        index.apply(info(serde_json::json!({})), Instant::now());
        assert_eq!(index.selections(), 1, "no change of selection");
    }

    #[test]
    fn selection_by_annotation_and_namespace() {
        let opt_out = pod_json(
            serde_json::json!({MONITOR_ANNOTATION: "false"}),
            serde_json::json!([status("web", ID_A)]),
        );
        let plain = pod_json(
            serde_json::json!({}),
            serde_json::json!([status("web", ID_A)]),
        );
        let opt_in = pod_json(
            serde_json::json!({MONITOR_ANNOTATION: "true"}),
            serde_json::json!([status("web", ID_A)]),
        );
        let selected = |pod: &Pod, selection: &Selection| {
            PodInfo::from_pod(pod, workload(), selection)
                .expect("info")
                .selected
        };
        let default = Selection::default();
        assert!(!selected(&opt_out, &default));
        assert!(selected(&plain, &default));
        let only_opted_in = Selection {
            opt_in: true,
            namespaces: vec![],
        };
        assert!(!selected(&plain, &only_opted_in));
        assert!(selected(&opt_in, &only_opted_in));
        let other_namespace = Selection {
            opt_in: false,
            namespaces: vec!["billing".to_owned()],
        };
        assert!(!selected(&opt_in, &other_namespace));

        let mut index = PodIndex::default();
        index.apply(
            PodInfo::from_pod(&opt_out, workload(), &default).expect("info"),
            Instant::now(),
        );
        assert_eq!(index.lookup(&reference(Some(ID_A)), true), Lookup::Excluded);
    }

    #[test]
    fn routes_annotations_are_read_within_bounds() {
        let key = WorkloadKey::Pod {
            namespace: "test".into(),
            workload: "bounds".into(),
            workload_kind: "Deployment".into(),
        };
        let huge = format!("GET /a\n{}", "x".repeat(MAX_ROUTES_ANNOTATION_BYTES));
        let (routes, refused) = parse_routes_annotation(&huge, &key);
        assert!(routes.rules.is_empty());
        assert!(
            matches!(refused[..], [AnnotationError::TooLarge { .. }]),
            "{refused:?}"
        );

        let many: String = (0..MAX_ANNOTATION_RULES + 100)
            .map(|n| format!("GET /r{n}\n# a comment\n\n"))
            .collect();
        let (routes, refused) = parse_routes_annotation(&many, &key);
        assert_eq!(routes.rules.len(), MAX_ANNOTATION_RULES);
        assert!(
            matches!(refused[..], [AnnotationError::TooManyRules { rules }] if rules == MAX_ANNOTATION_RULES + 100)
        );

        // A 5,000-segment rule fits the annotation, not a rule.
        let deep: String = (0..5_000).map(|n| format!("/s{n}")).collect();
        let (routes, refused) =
            parse_routes_annotation(&format!("{deep}\nGET /ok/<int:id>\n"), &key);
        assert_eq!(routes.rules.rules().collect::<Vec<_>>(), ["/ok/<int:id>"]);
        assert_eq!(refused.len(), 1);
        assert_eq!(
            routes,
            parse_routes_annotation(&format!("{deep}\nGET /ok/<int:id>\n"), &key).0
        );
    }
}
