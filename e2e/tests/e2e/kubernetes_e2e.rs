//! Kubernetes mode end to end, on the real kernel: real Flask apps run as
//! "pods" inside kubelet-style cgroups this test creates (systemd driver in
//! the v2 and v1 name=systemd hierarchies, cgroupfs driver in v1 memory and
//! pids), the in-test API server (e2e/src/kube_api.rs) serves the matching
//! Pod objects, and the real exporter binary runs in Kubernetes mode with
//! the real `kube` client.

use flask_ebpf_exporter_e2e as support;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use support::{
    cgroups::{Driver, PodCgroups},
    kube_api::{KubeApi, PodSpec, PodUids, container_id, owned_by, pod},
    *,
};

const NODE: &str = "node-a";
/// This file's pod UIDs.
const PODS: PodUids = PodUids(0xe2e0);

/// Each test's exporter sees every HTTP server on the machine, so another
/// test's pods would count as unknown here: the tests take turns.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
const IDENTITY: [&str; 5] = ["namespace", "pod", "container", "workload", "workload_kind"];

/// Requests served per identity (the five labels joined by '/').
fn requests_by_pod(samples: &[Sample]) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for sample in samples
        .iter()
        .filter(|s| s.name == "flask_http_request_total")
    {
        let identity: Vec<&str> = IDENTITY
            .iter()
            .map(|label| sample.labels.get(*label).map_or("", String::as_str))
            .collect();
        *counts.entry(identity.join("/")).or_insert(0) += sample.value as u64;
    }
    counts
}

/// Puts pod `n` of this file, named `name`, with one container, `web`.
fn put_web_pod(api: &KubeApi, n: usize, name: &str, annotations: &[(&str, &str)]) {
    let (uid, id) = (PODS.uid(n), container_id(n));
    let containers = [("web", Some(id.as_str()))];
    let mut web = spec(name, &uid, None, &containers);
    web.annotations = annotations;
    api.put_pod(pod(&web));
}

/// Scrapes until `identity` (as [`requests_by_pod`] names it) has counted
/// `expected` requests, or `timeout` passes; returns the last scrape.
fn until_counted(
    exporter: &Exporter,
    identity: &str,
    expected: u64,
    timeout: Duration,
) -> Vec<Sample> {
    eventually(
        timeout,
        || exporter.metrics(),
        |samples| requests_by_pod(samples).get(identity) == Some(&expected),
    )
}

/// Six found and two missing pages.
fn send_traffic(port: u16) -> u64 {
    for n in 0..6 {
        let response = http_get(port, &format!("/items/{n}?q=secret")).expect("request");
        assert_eq!(response.status, 200);
    }
    for _ in 0..2 {
        assert_eq!(http_get(port, "/missing").expect("request").status, 404);
    }
    8
}

/// Sends traffic to a pod selected out until the kernel counts one of its
/// connections ignored at accept `by` ("cgroup" or "listener"). Each worker
/// has a listener of its own, and which one accepts is the kernel's choice:
/// a fixed number of rounds would depend on luck.
fn until_ignored_by(exporter: &Exporter, port: u16, by: &str) {
    let ignored = |samples: &[Sample]| ignored_by(samples, by);
    let start = ignored(&exporter.metrics());
    let warmed = eventually(
        Duration::from_secs(20),
        || {
            send_traffic(port);
            exporter.metrics()
        },
        |samples| ignored(samples) > start,
    );
    assert!(
        ignored(&warmed) > start,
        "no connection to port {port} was ignored by {by}"
    );
    // The kernel's counts reach /metrics once a second.
    std::thread::sleep(Duration::from_millis(1100));
}

struct TestPod {
    // Declared before the cgroups, so the app exits before they are removed.
    app: App,
    _cgroups: PodCgroups,
}

fn start_pod(venv: &std::path::Path, server: Server, driver: Driver, n: usize) -> TestPod {
    let cgroups = PodCgroups::create(driver, &PODS.uid(n), &container_id(n));
    let app = App::start_in(venv, server, false, &cgroups.procs_files());
    let placed = PodCgroups::describe(app.process.child.id());
    assert!(
        placed.contains(&container_id(n)),
        "app not in its cgroups:\n{placed}"
    );
    TestPod {
        app,
        _cgroups: cgroups,
    }
}

fn spec<'a>(
    name: &'a str,
    uid: &'a str,
    owner: Option<(&'a str, &'a str)>,
    containers: &'a [(&'a str, Option<&'a str>)],
) -> PodSpec<'a> {
    PodSpec {
        namespace: "shop",
        name,
        uid,
        node: NODE,
        owner,
        containers,
        annotations: &[],
    }
}

#[test]
fn every_series_carries_the_pod_that_served_it() {
    let _turn = one_at_a_time();
    let venv = require_prerequisites();
    let mut api = KubeApi::start();
    api.put_object(owned_by(
        "ReplicaSet",
        "shop",
        "web-5d8f7c9b6",
        ("Deployment", "web"),
    ));

    // A: a Deployment's pod, systemd driver, gunicorn master + 2 workers.
    let (uid_a, id_a) = (PODS.uid(1), container_id(1));
    api.put_pod(pod(&spec(
        "web-5d8f7c9b6-aaaaa",
        &uid_a,
        Some(("ReplicaSet", "web-5d8f7c9b6")),
        &[("web", Some(&id_a))],
    )));
    let pod_a = start_pod(&venv, Server::GunicornSync, Driver::Systemd, 1);
    // B: a StatefulSet's pod, cgroupfs driver, Werkzeug; two containers, so
    // only the container ID tells which one serves. It names its routes in
    // an annotation.
    let (uid_b, id_b) = (PODS.uid(2), container_id(2));
    let sidecar = container_id(20);
    let containers_b = [
        ("sidecar", Some(sidecar.as_str())),
        ("api", Some(id_b.as_str())),
    ];
    let mut db = spec("db-0", &uid_b, Some(("StatefulSet", "db")), &containers_b);
    db.annotations = &[(
        "flask-ebpf-exporter.io/routes",
        "GET /items/<int:item_id>\nGET /missing\n",
    )];
    api.put_pod(pod(&db));
    let pod_b = start_pod(&venv, Server::Werkzeug, Driver::Cgroupfs, 2);
    // C: scheduled on another node: never watched, so unknown here.
    let (uid_c, id_c) = (PODS.uid(3), container_id(3));
    let containers_c = [("web", Some(id_c.as_str()))];
    let mut other_node = spec("elsewhere", &uid_c, None, &containers_c);
    other_node.node = "node-b";
    api.put_pod(pod(&other_node));
    let pod_c = start_pod(&venv, Server::GunicornGthread, Driver::Systemd, 3);
    // D: opted out by annotation.
    let (uid_d, id_d) = (PODS.uid(4), container_id(4));
    let containers_d = [("web", Some(id_d.as_str()))];
    let mut opted_out = spec("quiet", &uid_d, None, &containers_d);
    opted_out.annotations = &[("flask-ebpf-exporter.io/monitor", "false")];
    api.put_pod(pod(&opted_out));
    let pod_d = start_pod(&venv, Server::GunicornGthread, Driver::Cgroupfs, 4);

    let exporter = Exporter::start(
        &api.exporter_args(NODE, &["--pod-wait", "3s", "--deleted-pod-grace", "4s"]),
    );

    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    expected.insert(
        "shop/web-5d8f7c9b6-aaaaa/web/web/Deployment".to_owned(),
        send_traffic(pod_a.app.port),
    );
    expected.insert(
        "shop/db-0/api/db/StatefulSet".to_owned(),
        send_traffic(pod_b.app.port),
    );
    expected.insert(
        "<unknown>/<unknown>/<unknown>/<unknown>/<unknown>".to_owned(),
        send_traffic(pod_c.app.port),
    );
    // D's traffic is never captured: its pod is known to be selected out
    // when its first connection is seen (a_pod_selected_out_costs_no_events_until_selected).
    send_traffic(pod_d.app.port);

    // E: traffic before its Pod object reaches the API server is held, then
    // attributed once the pod is known, within --pod-wait.
    let pod_e = start_pod(&venv, Server::GunicornGthread, Driver::Systemd, 5);
    let early = send_traffic(pod_e.app.port);
    std::thread::sleep(Duration::from_millis(1000));
    let (uid_e, id_e) = (PODS.uid(5), container_id(5));
    api.put_pod(pod(&spec("late", &uid_e, None, &[("web", Some(&id_e))])));
    expected.insert("shop/late/web/late/Pod".to_owned(), early);

    let samples = eventually(
        Duration::from_secs(20),
        || exporter.metrics(),
        |samples| {
            // The exporter's own counters are brought up to date once a second.
            requests_by_pod(samples) == expected
                && value(samples, "flask_ebpf_exporter_unattributed_requests_total") > 0.0
        },
    );
    assert_eq!(requests_by_pod(&samples), expected);
    assert_eq!(
        value(&samples, "flask_ebpf_exporter_unattributed_requests_total"),
        8.0
    );
    assert_eq!(
        value(&samples, "flask_ebpf_exporter_kubernetes_synced"),
        1.0
    );
    // Routes: the annotation's rules for B; for A the rules read from its
    // source, and its router's 404s no rule.
    let paths_of = |pod: &str| -> BTreeSet<String> {
        samples
            .iter()
            .filter(|s| s.name == "flask_http_request_duration_seconds_count")
            .filter(|s| s.labels.get("pod").is_some_and(|p| p == pod))
            .filter_map(|s| s.labels.get("path").cloned())
            .collect()
    };
    assert_eq!(
        paths_of("db-0"),
        BTreeSet::from(["/items/<int:item_id>".to_owned(), "/missing".to_owned()])
    );
    assert_eq!(
        paths_of("web-5d8f7c9b6-aaaaa"),
        BTreeSet::from(["/items/<int:item_id>".to_owned(), "None".to_owned()])
    );
    // /debug/pods shows the node's pods as the watch knows them.
    let pods: serde_json::Value =
        serde_json::from_slice(&exporter.debug_page("/debug/pods").expect("debug pods").body)
            .expect("JSON");
    assert_eq!(pods["mode"], "kubernetes");
    let listed: BTreeSet<&str> = pods["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|pod| pod["pod"].as_str())
        .collect();
    assert!(
        listed.contains("db-0") && listed.contains("quiet"),
        "{pods}"
    );
    assert!(!listed.contains("elsewhere"), "another node's pod");
    // Every request series of every family carries all five labels.
    for sample in samples
        .iter()
        .filter(|s| s.name.starts_with("flask_http_request"))
    {
        for label in IDENTITY {
            assert!(
                sample.labels.get(label).is_some_and(|v| !v.is_empty()),
                "{label} missing on {sample:?}"
            );
        }
        assert!(
            !sample.labels.get("path").is_some_and(|p| p.contains('?')),
            "{sample:?}"
        );
    }

    // F: how long from a pod appearing in the API to its first request
    // exported under its name.
    let pod_f = start_pod(&venv, Server::GunicornGthread, Driver::Cgroupfs, 6);
    let (uid_f, id_f) = (PODS.uid(6), container_id(6));
    let created = Instant::now();
    api.put_pod(pod(&spec("fresh", &uid_f, None, &[("web", Some(&id_f))])));
    assert_eq!(http_get(pod_f.app.port, "/").expect("request").status, 200);
    let fresh = "shop/fresh/web/fresh/Pod".to_owned();
    let samples = until_counted(&exporter, &fresh, 1, Duration::from_secs(10));
    assert_eq!(requests_by_pod(&samples).get(&fresh), Some(&1));
    eprintln!(
        "new pod attributed {:?} after its Pod object was created",
        created.elapsed()
    );

    // Deleting A: its series stay for the grace period, then go.
    let web = "shop/web-5d8f7c9b6-aaaaa/web/web/Deployment".to_owned();
    drop(pod_a);
    let deleted = Instant::now();
    api.delete_pod("shop", "web-5d8f7c9b6-aaaaa");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        requests_by_pod(&exporter.metrics()).contains_key(&web),
        "removed before the grace period"
    );
    let samples = eventually(
        Duration::from_secs(15),
        || exporter.metrics(),
        |samples| !requests_by_pod(samples).contains_key(&web),
    );
    let gone_after = deleted.elapsed();
    assert!(
        !requests_by_pod(&samples).contains_key(&web),
        "deleted pod's series still exported"
    );
    assert!(
        gone_after >= Duration::from_millis(3500),
        "removed after {gone_after:?}, before the 4 s grace"
    );
    assert!(value(&samples, "flask_ebpf_exporter_identities_removed_total") >= 1.0);
    assert!(samples.iter().all(|s| {
        s.labels
            .get("pod")
            .is_none_or(|p| p != "web-5d8f7c9b6-aaaaa")
    }));
    // Other pods' series are untouched.
    assert_eq!(
        requests_by_pod(&samples).get("shop/db-0/api/db/StatefulSet"),
        Some(&8)
    );
    eprintln!("deleted pod's series removed {gone_after:?} after the deletion (grace 4 s)");

    // Only this node's pods were ever listed or watched.
    let pod_requests: Vec<String> = api
        .requests()
        .into_iter()
        .filter(|r| r.contains("/api/v1/pods"))
        .collect();
    assert!(!pod_requests.is_empty());
    assert!(
        pod_requests
            .iter()
            .all(|r| r.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "{pod_requests:#?}"
    );
    drop((pod_b, pod_c, pod_d, pod_e, pod_f));
    api.stop();
}

#[test]
fn a_pod_selected_out_costs_no_events_until_selected() {
    let _turn = one_at_a_time();
    let venv = require_prerequisites();
    let mut api = KubeApi::start();
    put_web_pod(
        &api,
        13,
        "quiet",
        &[("flask-ebpf-exporter.io/monitor", "false")],
    );
    let serving = start_pod(&venv, Server::GunicornSync, Driver::Systemd, 13);
    let exporter = Exporter::start(&api.exporter_args(NODE, &[]));

    // Opted out: once a worker's first connection shows whose it is, the
    // kernel ignores the listener's connections at accept, and then every
    // accept in the container's cgroup.
    let ignored_at_accept = |samples: &[Sample]| {
        ["listener", "cgroup"]
            .iter()
            .map(|by| ignored_by(samples, by))
            .sum::<f64>()
    };
    // Each worker's first connection shows whose it is; once judged, the
    // listener's next accept shows the kernel the container's cgroup.
    until_ignored_by(&exporter, serving.app.port, "cgroup");
    let before = exporter.metrics();
    let sent = send_traffic(serving.app.port) as f64;
    let samples = eventually(
        Duration::from_secs(5),
        || exporter.metrics(),
        |samples| ignored_at_accept(samples) - ignored_at_accept(&before) >= sent - 1.0,
    );
    let ignored = ignored_at_accept(&samples) - ignored_at_accept(&before);
    assert!(
        ignored >= sent - 1.0,
        "{ignored} of {sent} connections ignored at accept"
    );
    let events = value(&samples, "flask_ebpf_exporter_events_read_total")
        - value(&before, "flask_ebpf_exporter_events_read_total");
    // Captured in full, 8 requests are 40 events; left: heartbeats, and at
    // most one connection of a worker not judged yet (5).
    assert!(
        events <= 10.0,
        "{events} events for {sent} opted-out requests"
    );
    assert!(requests_by_pod(&samples).is_empty(), "no series");

    // Selected: within the watch's delivery and the agent's once-a-second
    // upkeep, its listeners are followed again, so every request of the
    // next 8 connections counts (were they left to the one-in-64 recheck,
    // none would).
    assert!(listeners_ignored(&samples) > 0.0, "judged before");
    put_web_pod(&api, 13, "quiet", &[]);
    let followed = eventually(
        Duration::from_secs(10),
        || exporter.metrics(),
        |samples| listeners_ignored(samples) == 0.0,
    );
    assert_eq!(listeners_ignored(&followed), 0.0, "followed again");
    let name = "shop/quiet/web/quiet/Pod".to_owned();
    let sent = send_traffic(serving.app.port);
    let samples = until_counted(&exporter, &name, sent, Duration::from_secs(5));
    assert_eq!(
        requests_by_pod(&samples).get(&name),
        Some(&sent),
        "{:?}",
        requests_by_pod(&samples)
    );
    drop(serving);
    api.stop();
}

/// A pod selected out, on this hybrid v1+v2 host, under each cgroup driver.
/// With the systemd driver a container has its own v2 cgroup, which the
/// kernel can read at accept: once one connection shows whose it is, a new
/// process of the same container is ignored from its first accept on. With
/// the cgroupfs driver the runtime places containers in v1 hierarchies
/// only, all share the v2 root, and listeners are judged one by one.
#[test]
fn a_selected_out_container_is_ignored_by_its_cgroup_where_the_layout_allows() {
    let _turn = one_at_a_time();
    let venv = require_prerequisites();
    let api = KubeApi::start();
    let exporter = Exporter::start(&api.exporter_args(NODE, &[]));
    for (n, driver) in [(15, Driver::Systemd), (16, Driver::Cgroupfs)] {
        put_web_pod(
            &api,
            n,
            &format!("hidden-{n}"),
            &[("flask-ebpf-exporter.io/monitor", "false")],
        );
        let pod = start_pod(&venv, Server::GunicornSync, driver, n);
        // The first connections show whose the listener is; a judged
        // listener's next accept shows the kernel the container's cgroup
        // where the layout allows, and is ignored by listener where not.
        let by = if driver == Driver::Systemd {
            "cgroup"
        } else {
            "listener"
        };
        until_ignored_by(&exporter, pod.app.port, by);
        let before = exporter.metrics();
        // A process the agent never saw, in the same container.
        let newcomer = App::start_in(&venv, Server::Werkzeug, false, &pod._cgroups.procs_files());
        // Its first request shows whose its listener is, where no cgroup did.
        assert_eq!(http_get(newcomer.port, "/").expect("request").status, 200);
        std::thread::sleep(Duration::from_millis(300));
        let sent = send_traffic(newcomer.port) as f64;
        // Under systemd the probe and the first request are ignored too. The
        // kernel's counts reach /metrics once a second: wait for all of them.
        let ignored_in_all = if driver == Driver::Systemd {
            sent + 2.0
        } else {
            sent
        };
        let after = eventually(
            Duration::from_secs(5),
            || exporter.metrics(),
            |after| {
                ignored_by(after, "cgroup") - ignored_by(&before, "cgroup")
                    + ignored_by(after, "listener")
                    - ignored_by(&before, "listener")
                    >= ignored_in_all
            },
        );
        let by_cgroup = ignored_by(&after, "cgroup") - ignored_by(&before, "cgroup");
        let by_listener = ignored_by(&after, "listener") - ignored_by(&before, "listener");
        let events = value(&after, "flask_ebpf_exporter_events_read_total")
            - value(&before, "flask_ebpf_exporter_events_read_total");
        println!(
            "{driver:?}: {sent} connections to a new process: {by_cgroup} ignored by cgroup, \
             {by_listener} by listener, {events} events"
        );
        if driver == Driver::Systemd {
            // The requests, and before them the first one and the
            // readiness probe.
            assert_eq!(by_cgroup, sent + 2.0, "every accept ignored by its cgroup");
            assert_eq!(by_listener, 0.0);
            // Heartbeats only (one every 2 s).
            assert!(events <= 2.0, "{events} events");
        } else {
            assert_eq!(by_cgroup, 0.0, "the v2 root is no container's own");
            // Its first connection shows whose the listener is.
            assert!(
                by_listener >= sent - 1.0,
                "{by_listener} ignored by listener"
            );
        }
        assert!(requests_by_pod(&after).is_empty(), "no series");
    }
}

#[test]
fn exports_while_the_api_server_is_down_and_catches_up() {
    let _turn = one_at_a_time();
    let venv = require_prerequisites();
    let mut api = KubeApi::start();
    let (uid_p, id_p) = (PODS.uid(11), container_id(11));
    api.put_pod(pod(&spec("steady", &uid_p, None, &[("web", Some(&id_p))])));
    api.stop();
    let pod_p = start_pod(&venv, Server::GunicornGthread, Driver::Systemd, 11);

    // Down at start: the exporter runs, exports, and says it is not ready.
    let exporter = Exporter::start_until(
        &api.exporter_args(NODE, &["--pod-wait", "2s", "--debug-endpoints", "false"]),
        "/healthz",
    );
    assert_eq!(exporter.status_of("/readyz"), 503);
    assert!(
        exporter.debug_page("/debug/routes").is_err(),
        "debug endpoints off: nothing listens"
    );
    let unknown = "<unknown>/<unknown>/<unknown>/<unknown>/<unknown>".to_owned();
    let sent = send_traffic(pod_p.app.port);
    let samples = until_counted(&exporter, &unknown, sent, Duration::from_secs(15));
    assert_eq!(
        requests_by_pod(&samples).get(&unknown),
        Some(&sent),
        "{:#?}",
        counts_by_route(&samples, |_| true)
    );
    assert!(
        value(
            &samples,
            "flask_ebpf_exporter_kubernetes_watch_errors_total"
        ) >= 1.0
    );
    assert_eq!(
        value(&samples, "flask_ebpf_exporter_kubernetes_synced"),
        0.0
    );

    let back = Instant::now();
    api.restart();
    let ready = eventually(
        Duration::from_secs(40),
        || exporter.status_of("/readyz"),
        |status| *status == 200,
    );
    assert_eq!(ready, 200, "not ready after the API server came back");
    eprintln!("ready {:?} after the API server came up", back.elapsed());
    let steady = "shop/steady/web/steady/Pod".to_owned();
    send_traffic(pod_p.app.port);
    let samples = eventually(
        Duration::from_secs(10),
        || exporter.metrics(),
        |samples| requests_by_pod(samples).get(&steady) == Some(&sent),
    );
    assert_eq!(requests_by_pod(&samples).get(&steady), Some(&sent));

    // An outage mid-run: known pods keep their names; a pod created once
    // the API server is back is attributed after the watch reconnects.
    api.stop();
    send_traffic(pod_p.app.port);
    std::thread::sleep(Duration::from_secs(3));
    api.restart();
    let back = Instant::now();
    let (uid_q, id_q) = (PODS.uid(12), container_id(12));
    api.put_pod(pod(&spec(
        "newcomer",
        &uid_q,
        None,
        &[("web", Some(&id_q))],
    )));
    let pod_q = start_pod(&venv, Server::GunicornGthread, Driver::Cgroupfs, 12);
    // Until the watch reconnects (kube's backoff) its requests wait 2 s,
    // then count as unknown; one request every 250 ms finds the moment.
    let newcomer = "shop/newcomer/web/newcomer/Pod".to_owned();
    let mut sent_to_q = 0;
    let mut counts = BTreeMap::new();
    while back.elapsed() < Duration::from_secs(60) {
        http_get(pod_q.app.port, "/").expect("request");
        sent_to_q += 1;
        std::thread::sleep(Duration::from_millis(250));
        counts = requests_by_pod(&exporter.metrics());
        if counts.contains_key(&newcomer) {
            break;
        }
    }
    let reconnected = back.elapsed();
    assert!(counts.contains_key(&newcomer), "{counts:#?}");
    assert_eq!(counts.get(&steady), Some(&(2 * sent)));
    // Nothing is lost: every request to Q is either attributed or unknown.
    let samples = eventually(
        Duration::from_secs(10),
        || exporter.metrics(),
        |samples| {
            let counts = requests_by_pod(samples);
            counts.get(&newcomer).copied().unwrap_or(0) + counts.get(&unknown).copied().unwrap_or(0)
                == sent_to_q + sent
        },
    );
    let counts = requests_by_pod(&samples);
    assert_eq!(
        counts.get(&newcomer).copied().unwrap_or(0) + counts.get(&unknown).copied().unwrap_or(0),
        sent_to_q + sent,
        "{counts:#?}"
    );
    eprintln!(
        "after a 3 s outage, a new pod's requests were attributed {reconnected:?} after the API server came back"
    );
    drop((pod_p, pod_q));
}

/// Samples of the request families (every bucket, sum, count and total).
fn request_series(samples: &[Sample]) -> Vec<&Sample> {
    samples
        .iter()
        .filter(|s| s.name.starts_with("flask_http_request"))
        .collect()
}

/// The workload a pod has in `/debug/pods`.
fn workload_shown(exporter: &Exporter, pod: &str) -> Option<String> {
    let response = exporter.debug_page("/debug/pods").ok()?;
    let pods: serde_json::Value = serde_json::from_slice(&response.body).ok()?;
    pods["pods"]
        .as_array()?
        .iter()
        .find(|row| row["pod"] == pod)
        .and_then(|row| row["workload"].as_str().map(str::to_owned))
}

#[test]
fn a_relabelled_pod_leaves_no_series_behind() {
    let _turn = one_at_a_time();
    let venv = require_prerequisites();
    let api = KubeApi::start();
    let (uid_r, id_r) = (PODS.uid(21), container_id(21));
    let containers = [("web", Some(id_r.as_str()))];
    let owners: Vec<String> = (0..=20).map(|n| format!("shard-{n}")).collect();
    let put = |owner: &str| {
        api.put_pod(pod(&spec(
            "relabelled",
            &uid_r,
            Some(("StatefulSet", owner)),
            &containers,
        )))
    };
    put(&owners[0]);
    let serving = start_pod(&venv, Server::GunicornGthread, Driver::Systemd, 21);
    let exporter = Exporter::start(&api.exporter_args(NODE, &["--deleted-pod-grace", "3s"]));
    let identity = |owner: &str| format!("shop/relabelled/web/{owner}/StatefulSet");
    let served_by = |owner: &str| {
        let sent = send_traffic(serving.app.port);
        // The counts, and the gauges the pipeline sets once a second.
        let samples = eventually(
            Duration::from_secs(10),
            || exporter.metrics(),
            |samples| {
                requests_by_pod(samples).get(&identity(owner)) == Some(&sent)
                    && samples.iter().any(|s| {
                        s.name == "flask_http_requests_in_flight"
                            && s.labels.get("workload").map(String::as_str) == Some(owner)
                    })
            },
        );
        assert_eq!(
            requests_by_pod(&samples).get(&identity(owner)),
            Some(&sent),
            "{:#?}",
            requests_by_pod(&samples)
        );
        samples
    };
    // What one pod with this traffic exports.
    let one_pod = request_series(&served_by(&owners[0])).len();
    assert!(one_pod > 0);

    // The pod's controller changes 20 times while it serves.
    for owner in &owners[1..] {
        put(owner);
        let shown = eventually(
            Duration::from_secs(10),
            || workload_shown(&exporter, "relabelled"),
            |shown| shown.as_deref() == Some(owner.as_str()),
        );
        assert_eq!(shown.as_deref(), Some(owner.as_str()));
        served_by(owner);
    }
    // During the grace period the old label sets are still exported.
    let previous = identity(&owners[19]);
    assert!(requests_by_pod(&exporter.metrics()).contains_key(&previous));

    let last = identity(&owners[20]);
    let samples = eventually(
        Duration::from_secs(15),
        || exporter.metrics(),
        |samples| requests_by_pod(samples).keys().eq([&last]),
    );
    assert_eq!(
        requests_by_pod(&samples).keys().collect::<Vec<_>>(),
        [&last],
        "old workloads' series left behind"
    );
    assert_eq!(
        request_series(&samples).len(),
        one_pod,
        "after the grace period, the series of one pod"
    );
    assert_eq!(
        value(&samples, "flask_ebpf_exporter_identities_removed_total"),
        20.0
    );
    drop(serving);
}

#[test]
fn hostile_routes_annotations_are_refused_and_other_pods_keep_flowing() {
    let _turn = one_at_a_time();
    let venv = require_prerequisites();
    let api = KubeApi::start();
    let huge = format!("GET /a\n{}", "x".repeat(1024 * 1024));
    let deep: String = (0..100_000).map(|n| format!("/s{n}")).collect();
    let bad_but_ignored = "/bad/<nope:x>";
    for (n, name, annotations) in [
        (
            31,
            "huge",
            vec![("flask-ebpf-exporter.io/routes", huge.as_str())],
        ),
        (
            32,
            "deep",
            vec![("flask-ebpf-exporter.io/routes", deep.as_str())],
        ),
        (
            33,
            "quiet",
            vec![
                ("flask-ebpf-exporter.io/routes", bad_but_ignored),
                ("flask-ebpf-exporter.io/monitor", "false"),
            ],
        ),
    ] {
        put_web_pod(&api, n, name, &annotations);
    }
    put_web_pod(
        &api,
        34,
        "steady",
        &[("flask-ebpf-exporter.io/routes", "GET /items/<int:item_id>")],
    );
    let serving = start_pod(&venv, Server::GunicornGthread, Driver::Cgroupfs, 34);
    let exporter = Exporter::start(&api.exporter_args(NODE, &[]));
    let sent = send_traffic(serving.app.port);
    let steady = "shop/steady/web/steady/Pod".to_owned();
    let samples = eventually(
        Duration::from_secs(15),
        || exporter.metrics(),
        |samples| requests_by_pod(samples).get(&steady) == Some(&sent),
    );
    assert_eq!(requests_by_pod(&samples).get(&steady), Some(&sent));
    // The steady pod's own rule applies; the hostile pods' rules are
    // refused whole, once each; the opted-out pod's are never read.
    let paths: BTreeSet<&str> = samples
        .iter()
        .filter(|s| s.name == "flask_http_request_duration_seconds_count")
        .filter_map(|s| s.labels.get("path").map(String::as_str))
        .collect();
    assert!(paths.contains("/items/<int:item_id>"), "{paths:?}");
    assert_eq!(
        value(
            &samples,
            "flask_ebpf_exporter_kubernetes_route_rule_errors_total"
        ),
        2.0
    );
    assert_eq!(exporter.status_of("/healthz"), 200);
    drop(serving);
}

/// Starts gunicorn serving `shop:create_app()` as a container runtime
/// would: in the pod's cgroups, in a mount namespace of its own, chrooted
/// into a root whose /srv (a tmpfs mounted only in that namespace) holds
/// the app. The node sees an empty directory; the app's files exist only
/// through /proc/<pid>/root. The interpreter and venv are bind-mounted at
/// their own paths.
const CHROOTED_GUNICORN: &str = r#"
set -e
root=$1 port=$2 shop=$3 gunicorn=$4
shift 4
mount -t tmpfs rootfs "$root"
mkdir -p "$root/usr" "$root/etc" "$root/dev" "$root/proc" "$root/tmp" "$root/srv"
for link in bin lib lib64 sbin; do ln -s "usr/$link" "$root/$link"; done
mount --rbind /usr "$root/usr"
mount --rbind /etc "$root/etc"
mount --rbind /dev "$root/dev"
mount -t proc proc "$root/proc"
for path in "$@"; do mkdir -p "$root$path"; mount --rbind "$path" "$root$path"; done
cp -r "$shop" "$root/srv/shop"
exec chroot "$root" sh -c 'cd /srv && exec "$0" --no-control-socket -w 2 -b "127.0.0.1:$1" "shop:create_app()"' "$gunicorn" "$port"
"#;

#[test]
fn a_containers_source_is_read_inside_its_own_root() {
    let _turn = one_at_a_time();
    let venv = require_prerequisites();
    let api = KubeApi::start();
    let n = 30;
    put_web_pod(&api, n, "chrooted", &[]);
    let cgroups = PodCgroups::create(Driver::Systemd, &PODS.uid(n), &container_id(n));
    let root = tempfile::tempdir().expect("root dir");
    let port = free_port();
    let venv = std::fs::canonicalize(&venv).expect("venv");
    // The interpreter the venv was made from, unless it is under /usr.
    let interpreter = std::fs::canonicalize(venv.join("bin/python")).expect("python");
    let mut binds = vec![venv.clone()];
    if let Some(prefix) = interpreter.parent().and_then(std::path::Path::parent)
        && !prefix.starts_with("/usr")
    {
        binds.push(prefix.to_path_buf());
    }
    let mut unshare = std::process::Command::new("unshare");
    unshare
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(CHROOTED_GUNICORN)
        .arg("sh")
        .arg(root.path())
        .arg(port.to_string())
        .arg(workspace().join("tests/fixtures/shop"))
        .arg(venv.join("bin/gunicorn"))
        .args(&binds);
    let mut command = in_cgroups(&unshare, &cgroups.procs_files());
    let server = spawn_process("chrooted gunicorn", &mut command);
    wait_for_port(port, Duration::from_secs(20));
    // Nothing of the app on the node's side of the mount.
    assert!(
        std::fs::read_dir(root.path())
            .expect("root")
            .next()
            .is_none()
    );
    assert!(!std::path::Path::new("/srv/shop").exists());

    let exporter = Exporter::start(&api.exporter_args(NODE, &["--pod-wait", "3s"]));
    let requests = [
        ("/catalog/items/5", 200, "/catalog/items/<int:item_id>"),
        ("/catalog/items/1000", 404, "/catalog/items/<int:item_id>"),
        ("/catalog/tags/python", 200, "/catalog/tags/<slug>"),
        ("/catalog/tags/rust", 200, "/catalog/tags/<slug>"),
        (
            "/catalog/assets/css/site.css",
            200,
            "/catalog/assets/<path:asset>",
        ),
        ("/api/v1/orders/7", 200, "/api/v1/orders/<int:order_id>"),
        ("/health", 200, "/health"),
        ("/nowhere", 404, "None"),
    ];
    // The manual's screenshots want a page with some traffic.
    let screenshots = std::env::var_os("DEBUG_PAGE_SCREENSHOTS").map(std::path::PathBuf::from);
    let rounds = if screenshots.is_some() {
        SCREENSHOT_ROUNDS
    } else {
        1
    };
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for (target, status, rule) in requests.iter().cycle().take(requests.len() * rounds) {
        let response = http_get(port, target).expect("request");
        assert_eq!(response.status, *status, "{target}");
        *expected.entry((*rule).to_owned()).or_default() += 1;
    }
    let by_path = |samples: &[Sample]| -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for sample in samples
            .iter()
            .filter(|s| s.name == "flask_http_request_duration_seconds_count")
            .filter(|s| s.labels.get("pod").is_some_and(|p| p == "chrooted"))
        {
            if let Some(path) = sample.labels.get("path") {
                *counts.entry(path.clone()).or_default() += sample.value as u64;
            }
        }
        counts
    };
    let samples = eventually(
        Duration::from_secs(20),
        || exporter.metrics(),
        |samples| by_path(samples) == expected,
    );
    assert_eq!(by_path(&samples), expected);
    let chrooted = |routes: &serde_json::Value| {
        routes["workloads"]
            .as_array()
            .and_then(|all| all.iter().find(|w| w["workload"]["workload"] == "chrooted"))
            .cloned()
    };
    // The page is a snapshot the pipeline refreshes.
    let routes = eventually(
        Duration::from_secs(10),
        || {
            let page = exporter.debug_page("/debug/routes").expect("debug page");
            serde_json::from_slice::<serde_json::Value>(&page.body).expect("JSON")
        },
        |routes| chrooted(routes).is_some(),
    );
    let workload = chrooted(&routes).unwrap_or_else(|| panic!("no chrooted workload in {routes}"));
    let source = &workload["source_rules"];
    assert_eq!(
        source["entrypoint"], "gunicorn shop:create_app()",
        "{source}"
    );
    let places: Vec<&str> = source["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .filter_map(|rule| rule["at"].as_str())
        .collect();
    assert!(
        places.len() >= 10 && places.iter().all(|at| at.starts_with("/srv/shop/")),
        "{places:?}"
    );
    if let Some(dir) = screenshots {
        take_screenshots(&dir, exporter, port, &requests);
    }
    drop(server);
}

/// Rounds of the requests behind the manual's screenshots.
const SCREENSHOT_ROUNDS: usize = 15;

/// docs/'s screenshots of `port`'s app in a root of its own: /debug/routes
/// and /debug/pods in Kubernetes mode from `exporter`, then /debug/routes in
/// local mode, from an agent that watches only the app's port.
fn take_screenshots(
    dir: &std::path::Path,
    exporter: Exporter,
    port: u16,
    requests: &[(&str, u16, &str)],
) {
    let page = "/debug/routes?format=html&refresh=0";
    let url = |exporter: &Exporter| format!("http://{}{page}", exporter.debug_address);
    screenshot(&url(&exporter), &dir.join("debug-routes-kubernetes.png"));
    let pods = format!(
        "http://{}/debug/pods?format=html&refresh=0",
        exporter.debug_address
    );
    screenshot(&pods, &dir.join("debug-pods-kubernetes.png"));
    drop(exporter);
    let local = Exporter::start(&["--port", &port.to_string()]);
    let sent = (requests.len() * SCREENSHOT_ROUNDS) as u64;
    for (target, _, _) in requests.iter().cycle().take(sent as usize) {
        http_get(port, target).expect("request");
    }
    let counted =
        |samples: &[Sample]| value(samples, "flask_http_request_duration_seconds_count") as u64;
    let samples = eventually(
        Duration::from_secs(20),
        || local.metrics(),
        |samples| counted(samples) >= sent,
    );
    assert_eq!(counted(&samples), sent, "local mode counted");
    // The page is a snapshot the pipeline refreshes once a second.
    std::thread::sleep(Duration::from_millis(1500));
    screenshot(&url(&local), &dir.join("debug-routes-local.png"));
}

/// A sample's name and labels.
type SeriesKey = (String, Vec<(String, String)>);

/// Each `flask_http_*` sample keyed by its name and labels without `pod`
/// and `container`, summed: what aggregation by workload should export.
fn summed_over_pods(samples: &[Sample]) -> BTreeMap<SeriesKey, f64> {
    let mut sums = BTreeMap::new();
    for sample in samples.iter().filter(|s| s.name.starts_with("flask_http_")) {
        let labels: Vec<(String, String)> = sample
            .labels
            .iter()
            .filter(|(name, _)| *name != "pod" && *name != "container")
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        *sums.entry((sample.name.clone(), labels)).or_insert(0.0) += sample.value;
    }
    sums
}

#[test]
fn aggregation_by_workload_exports_the_sums_of_its_pods() {
    let _turn = one_at_a_time();
    let venv = require_prerequisites();
    let api = KubeApi::start();
    api.put_object(owned_by(
        "ReplicaSet",
        "shop",
        "cart-6c7d8e9f0",
        ("Deployment", "cart"),
    ));
    let put_cart = |n: usize, name: &str| {
        let (uid, id) = (PODS.uid(n), container_id(n));
        let containers = [("web", Some(id.as_str()))];
        api.put_pod(pod(&spec(
            name,
            &uid,
            Some(("ReplicaSet", "cart-6c7d8e9f0")),
            &containers,
        )));
    };
    put_cart(31, "cart-6c7d8e9f0-aaaaa");
    put_cart(32, "cart-6c7d8e9f0-bbbbb");
    let pod_a = start_pod(&venv, Server::GunicornSync, Driver::Systemd, 31);
    let pod_b = start_pod(&venv, Server::GunicornGthread, Driver::Cgroupfs, 32);
    // Two agents side by side see the same requests: one per pod, one per
    // workload.
    let grace = ["--deleted-pod-grace", "3s"];
    let per_pod = Exporter::start(&api.exporter_args(NODE, &grace));
    let aggregated = Exporter::start(
        &api.exporter_args(NODE, &[grace[0], grace[1], "--aggregate-by", "workload"]),
    );

    let mut sent = send_traffic(pod_a.app.port) + send_traffic(pod_b.app.port);
    for target in ["/boom", "/status/503", "/items/7"] {
        http_get(pod_b.app.port, target).expect("request");
        sent += 1;
    }
    let workload = "shop/cart-6c7d8e9f0-aaaaa/web/cart/Deployment";
    let counted = |samples: &[Sample]| {
        labelled(samples, "flask_http_request_total", "workload", "cart") as u64
    };
    // Gauges are set once a second: both agents must have set them since
    // the last request.
    let workers = |samples: &[Sample]| value(samples, "flask_http_workers");
    let (fine, coarse) = eventually(
        Duration::from_secs(20),
        || (per_pod.metrics(), aggregated.metrics()),
        |(fine, coarse)| {
            counted(fine) == sent
                && counted(coarse) == sent
                && workers(fine) > 0.0
                && workers(fine) == workers(coarse)
        },
    );
    assert!(
        requests_by_pod(&fine).contains_key(workload),
        "{:#?}",
        requests_by_pod(&fine)
    );
    assert_eq!(counted(&coarse), sent);
    // No series of the aggregated agent names a pod or a container.
    for sample in coarse.iter().filter(|s| s.name.starts_with("flask_http_")) {
        assert!(
            !sample.labels.contains_key("pod") && !sample.labels.contains_key("container"),
            "{sample:?}"
        );
        assert_eq!(
            sample.labels.get("workload").map(String::as_str),
            Some("cart")
        );
    }
    // Each aggregated series is the sum of the per-pod ones, series by
    // series. Counts are exact. Each agent times requests from its own
    // programs' events, and one agent's program runs between the other's
    // and the event, so times differ by about a program's run: sums within
    // 10 µs a request (one pod's share is milliseconds), and bucket counts
    // compared in the unit test that feeds both the same exchanges.
    let (expected, got) = (summed_over_pods(&fine), summed_over_pods(&coarse));
    let kinds = |sums: &BTreeMap<SeriesKey, f64>| sums.keys().cloned().collect::<BTreeSet<_>>();
    assert_eq!(kinds(&got), kinds(&expected), "the same series");
    let mut compared = 0;
    for (key, want) in &expected {
        let have = got[key];
        let (name, _) = key;
        if name.ends_with("_bucket") {
            continue;
        }
        if name.ends_with("_sum") {
            assert!(
                (have - want).abs() <= 10e-6 * sent as f64,
                "{key:?}: {have} against {want}"
            );
        } else {
            assert_eq!(have, *want, "{key:?}");
            compared += 1;
        }
    }
    assert!(compared >= 10, "{compared} series compared");
    let series_of = |samples: &[Sample]| {
        samples
            .iter()
            .filter(|s| s.name.starts_with("flask_http_"))
            .count()
    };
    eprintln!(
        "{} series per pod for two pods, {} per workload",
        series_of(&fine),
        series_of(&coarse)
    );
    assert!(series_of(&coarse) < series_of(&fine));

    // One pod deleted: per pod its series go after the grace period; the
    // workload's stay, its counts with them, while the other pod serves.
    drop(pod_a);
    api.delete_pod("shop", "cart-6c7d8e9f0-aaaaa");
    let fine = eventually(
        Duration::from_secs(15),
        || per_pod.metrics(),
        |samples| !requests_by_pod(samples).contains_key(workload),
    );
    assert!(!requests_by_pod(&fine).contains_key(workload));
    let more = send_traffic(pod_b.app.port);
    let coarse = eventually(
        Duration::from_secs(10),
        || aggregated.metrics(),
        |samples| counted(samples) == sent + more,
    );
    assert_eq!(
        counted(&coarse),
        sent + more,
        "the deleted pod's requests stay in the sums"
    );
    assert_eq!(
        value(&coarse, "flask_ebpf_exporter_identities_removed_total"),
        0.0
    );
    // The last pod deleted: the workload's series go.
    drop(pod_b);
    api.delete_pod("shop", "cart-6c7d8e9f0-bbbbb");
    let coarse = eventually(
        Duration::from_secs(15),
        || aggregated.metrics(),
        |samples| counted(samples) == 0,
    );
    assert_eq!(counted(&coarse), 0, "released with its last pod");
    assert_eq!(
        value(&coarse, "flask_ebpf_exporter_identities_removed_total"),
        1.0
    );
}
