//! Prometheus past one server, with the shipped files run by real
//! Prometheus servers (Debian's): `scrape-config-sharded.yaml` as two shards
//! over eight nodes, and `agent-remote-write.yaml` in agent mode sending to
//! a remote store (a Prometheus that receives remote writes). Debian's
//! Prometheus has no Kubernetes discovery: the node targets come from
//! `file_sd` with the labels `role: node` gives, and nothing else in the
//! jobs changes.

use flask_ebpf_exporter_e2e as support;

use std::{collections::BTreeSet, fs, time::Duration};

use serde_json::{Value, json};
use support::*;

/// Node targets as `role: node` gives them: the kubelet's address and the
/// node's metadata.
fn node_targets(nodes: &[(String, String)]) -> Value {
    Value::Array(
        nodes
            .iter()
            .map(|(name, ip)| {
                json!({
                    "targets": [format!("{ip}:10250")],
                    "labels": {
                        "__meta_kubernetes_node_name": name,
                        "__meta_kubernetes_node_address_InternalIP": ip,
                        "__meta_kubernetes_node_label_topology_kubernetes_io_zone": "eu-west-1a",
                    }
                })
            })
            .collect(),
    )
}

/// A loopback address of this test's own (`third` tells tests apart), so
/// the shipped port 9810 is free whatever else runs.
fn node_ip(third: u32, fourth: u32) -> String {
    let pid = std::process::id();
    format!(
        "127.{}.{}.{fourth}",
        (pid & 0x3f) * 4 + third,
        (pid >> 6) & 0xff
    )
}

/// The `node` label of every `up` series a shard has.
fn nodes_scraped(port: u16) -> BTreeSet<String> {
    prometheus_query(port, "up")
        .iter()
        .filter_map(|sample| sample["metric"]["node"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn two_shards_scrape_every_node_exactly_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Eight nodes; an agent runs on the first only, the others are down
    // (a shard scrapes them all the same, and records up = 0).
    let nodes: Vec<(String, String)> = (1..=8)
        .map(|n| (format!("node-{n}"), node_ip(0, n)))
        .collect();
    let agent = Exporter::start_on(
        format!("{}:9810", nodes[0].1).parse().expect("address"),
        &[],
        "/readyz",
    );
    let targets = dir.path().join("nodes.json");
    fs::write(&targets, node_targets(&nodes).to_string()).expect("targets");

    let sharded = shipped_prometheus_config("scrape-config-sharded.yaml");
    let shards = 2;
    let mut prometheus = Vec::new();
    for shard in 0..shards {
        let mut job = file_sd_node_job(&sharded, &targets);
        // What each shard's copy of the file sets: the number of shards and
        // its own index.
        let relabel = job["relabel_configs"]
            .as_array_mut()
            .expect("relabel_configs");
        let hashmod = relabel
            .iter_mut()
            .find(|rule| rule["action"] == "hashmod")
            .expect("a hashmod rule");
        hashmod["modulus"] = json!(shards);
        let keep = relabel
            .iter_mut()
            .find(|rule| rule["action"] == "keep")
            .expect("a keep rule");
        keep["regex"] = json!(shard.to_string());
        let mut global = sharded["global"].clone();
        global["external_labels"]["shard"] = json!(shard.to_string());
        global["scrape_interval"] = json!("1s");
        let config = json!({"global": global, "scrape_configs": [job]});
        let config_file = dir.path().join(format!("shard-{shard}.yml"));
        fs::write(&config_file, config.to_string()).expect("config");
        let data = dir.path().join(format!("data-{shard}"));
        prometheus.push(start_prometheus(&config_file, &data));
    }

    let all: BTreeSet<String> = nodes.iter().map(|(name, _)| name.clone()).collect();
    let scraped = eventually(
        Duration::from_secs(30),
        || {
            prometheus
                .iter()
                .map(|(_, port)| nodes_scraped(*port))
                .collect::<Vec<_>>()
        },
        |by_shard| by_shard.iter().map(BTreeSet::len).sum::<usize>() >= all.len(),
    );
    println!("nodes by shard: {scraped:?}");
    let union: BTreeSet<String> = scraped.iter().flatten().cloned().collect();
    assert_eq!(union, all, "every node scraped");
    assert_eq!(
        scraped.iter().map(BTreeSet::len).sum::<usize>(),
        all.len(),
        "no node scraped twice: {scraped:?}"
    );
    assert!(
        scraped.iter().all(|nodes| !nodes.is_empty()),
        "each shard has its share: {scraped:?}"
    );
    // The node with an agent is up in its shard, and only there.
    let up_in: Vec<f64> = prometheus
        .iter()
        .map(|(_, port)| {
            prometheus_query(*port, r#"up{node="node-1"}"#)
                .iter()
                .filter_map(|s| s["value"][1].as_str()?.parse::<f64>().ok())
                .sum()
        })
        .collect();
    assert_eq!(
        up_in.iter().filter(|&&up| up == 1.0).count(),
        1,
        "{up_in:?}"
    );
    drop(agent);
}

#[test]
fn agent_mode_remote_writes_the_agents_series() {
    let venv = require_prerequisites();
    let dir = tempfile::tempdir().expect("tempdir");
    // The remote store: a Prometheus that receives remote writes.
    let store_config = dir.path().join("store.yml");
    fs::write(&store_config, json!({"global": {}}).to_string()).expect("config");
    let (_store, store_port) = start_prometheus_with(
        &store_config,
        &[
            format!("--storage.tsdb.path={}", dir.path().join("store").display()),
            "--web.enable-remote-write-receiver".to_owned(),
        ],
    );

    // A node with the agent, watching an app that serves a few requests.
    let app = App::start(&venv, Server::GunicornGthread, false);
    let node = ("node-1".to_owned(), node_ip(1, 1));
    let _agent = Exporter::start_on(
        format!("{}:9810", node.1).parse().expect("address"),
        &["--port", &app.port.to_string()],
        "/readyz",
    );
    let targets = dir.path().join("nodes.json");
    fs::write(&targets, node_targets(&[node]).to_string()).expect("targets");

    // The shipped agent-mode file, its remote write pointed at the store.
    let shipped = shipped_prometheus_config("agent-remote-write.yaml");
    let mut remote_write = shipped["remote_write"].clone();
    remote_write[0]["url"] = json!(format!("http://127.0.0.1:{store_port}/api/v1/write"));
    let mut global = shipped["global"].clone();
    global["scrape_interval"] = json!("1s");
    let config = json!({
        "global": global,
        "remote_write": remote_write,
        "scrape_configs": [file_sd_node_job(&shipped, &targets)],
    });
    let config_file = dir.path().join("agent.yml");
    fs::write(&config_file, config.to_string()).expect("config");
    let (_prometheus_agent, _) = start_prometheus_with(
        &config_file,
        &[
            "--enable-feature=agent".to_owned(),
            format!("--storage.agent.path={}", dir.path().join("wal").display()),
        ],
    );

    let sent = get_items(app.port, 7);
    // In the store, with the node's label and the agent's external label.
    let promql = r#"sum(flask_http_request_total{job="flask-ebpf-exporter", node="node-1", cluster="my-cluster"})"#;
    let total = |result: &Vec<Value>| -> f64 {
        result
            .iter()
            .filter_map(|s| s["value"][1].as_str()?.parse::<f64>().ok())
            .sum()
    };
    let result = eventually(
        Duration::from_secs(40),
        || prometheus_query(store_port, promql),
        |result| total(result) >= f64::from(sent),
    );
    assert_eq!(total(&result), f64::from(sent), "{result:?}");
}
