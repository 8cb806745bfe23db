//! A real Prometheus (Debian's package) for the tests: started and asked,
//! and the shipped node job made runnable by it.

use std::{path::Path, process::Command, process::Stdio, time::Duration};

use serde_json::{Value, json};

use crate::{Running, eventually, free_port, http_get, spawn_process, wait_for_port, workspace};

/// A real Prometheus (Debian's package) with `config_file`, its storage in
/// `data_dir`, once ready; and its port.
pub fn start_prometheus(config_file: &Path, data_dir: &Path) -> (Running, u16) {
    start_prometheus_with(
        config_file,
        &[format!("--storage.tsdb.path={}", data_dir.display())],
    )
}

/// A real Prometheus with `config_file` and these other flags (its storage,
/// features), once ready; and its port.
pub fn start_prometheus_with(config_file: &Path, flags: &[String]) -> (Running, u16) {
    let port = free_port();
    let prometheus = spawn_process(
        "prometheus",
        Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .args(flags)
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    wait_for_port(port, Duration::from_secs(20));
    // It listens before its storage is open, answering "Service
    // Unavailable" as text until then.
    let ready = eventually(
        Duration::from_secs(20),
        || http_get(port, "/-/ready").map_or(0, |r| r.status),
        |&status| status == 200,
    );
    assert_eq!(ready, 200, "Prometheus never became ready");
    (prometheus, port)
}

/// GET against Prometheus' HTTP API, returning `data`.
pub fn prometheus_api(port: u16, path_and_query: &str) -> Value {
    let response = http_get(port, path_and_query).expect("Prometheus API");
    let body: Value = serde_json::from_slice(&response.body).expect("JSON");
    assert_eq!(body["status"], "success", "{body}");
    body["data"].clone()
}

/// Prometheus' answer to an instant query.
pub fn prometheus_query(port: u16, promql: &str) -> Vec<Value> {
    let encoded = percent_encoding::utf8_percent_encode(promql, percent_encoding::NON_ALPHANUMERIC);
    prometheus_api(port, &format!("/api/v1/query?query={encoded}"))["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// A config shipped in manifests/prometheus/.
pub fn shipped_prometheus_config(file: &str) -> Value {
    let path = workspace().join("manifests/prometheus").join(file);
    serde_yaml_ng::from_str(&std::fs::read_to_string(&path).expect("shipped config")).expect("YAML")
}

/// A shipped config's node job, with `kubernetes_sd_configs` (which
/// Debian's Prometheus lacks) swapped for `file_sd_configs` reading
/// `targets`, scraped every second; nothing else changed.
pub fn file_sd_node_job(config: &Value, targets: &Path) -> Value {
    let mut job = config["scrape_configs"][0].clone();
    assert_eq!(job["kubernetes_sd_configs"][0]["role"], "node");
    let object = job.as_object_mut().expect("job");
    object.remove("kubernetes_sd_configs");
    object.insert(
        "file_sd_configs".to_owned(),
        json!([{"files": [targets.to_str().expect("path")], "refresh_interval": "1s"}]),
    );
    object.insert("scrape_interval".to_owned(), json!("1s"));
    job
}
