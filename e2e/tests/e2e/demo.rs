//! `cargo xtask demo` as a user runs it: it prints what to open, and what
//! it prints answers while it runs. It starts a real gunicorn and the real
//! agent (the one the workspace's tests built), on the real kernel.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    process::{Command, Stdio},
};

use flask_ebpf_exporter_e2e as support;

/// GET `url` (http://host:port/path); the status and the body.
fn get(url: &str) -> (u16, String) {
    let rest = url.strip_prefix("http://").expect("an http URL");
    let (address, path) = rest.split_at(rest.find('/').expect("a path"));
    let mut stream = TcpStream::connect(address).expect("connect");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|status| status.parse().ok())
        .expect("a status");
    (status, response)
}

#[test]
fn the_demo_prints_urls_that_answer_and_metrics_of_its_traffic() {
    let agent = support::agent_binary();
    let mut demo = Command::new(support::built_binary("xtask"))
        .args(["demo", "--seconds", "4"])
        .env("CARGO_MANIFEST_DIR", support::workspace().join("xtask"))
        .env("FLASK_EBPF_EXPORTER_BIN", &agent)
        .stdout(Stdio::piped())
        .spawn()
        .expect("cargo xtask demo");
    let stdout = demo.stdout.take().expect("stdout");
    let mut printed = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("a line");
        let done = line.contains("Ctrl-C stops the demo");
        printed.push(line);
        if done {
            break;
        }
    }
    let url = |name: &str| {
        printed
            .iter()
            .find_map(|line| {
                let line = line.trim();
                line.strip_prefix(name)
                    .map(|rest| rest.trim().to_owned())
                    .filter(|url| url.starts_with("http://"))
            })
            .unwrap_or_else(|| panic!("no {name} URL in:\n{}", printed.join("\n")))
    };
    // While it runs, what it says to open answers.
    let (status, metrics) = get(&url("metrics"));
    assert_eq!(status, 200);
    assert!(metrics.contains("flask_http_request_duration_seconds_count{"));
    let (status, routes) = get(&url("routes"));
    assert_eq!(status, 200);
    assert!(
        routes.contains("/catalog/items/&lt;int:item_id&gt;"),
        "{routes}"
    );
    let (status, _) = get(&url("who serves"));
    assert_eq!(status, 200);
    let (status, item) = get(&url("app"));
    assert_eq!(status, 200, "{item}");
    // The lines of /metrics it shows: the blueprint's rule read from the
    // app's source, its 404s, and the 500s of /checkout.
    let all = printed.join("\n");
    for wanted in [
        r#"path="/catalog/items/<int:item_id>",port="#,
        r#"path="/checkout",port="#,
        r#"status="500"} 10"#,
    ] {
        assert!(all.contains(wanted), "{wanted} not in:\n{all}");
    }
    let status = demo.wait().expect("the demo ends");
    assert!(status.success(), "{status}");
}
