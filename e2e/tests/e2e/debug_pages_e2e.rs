//! The debug pages in a real browser: Debian's Chromium, headless, renders
//! each page while a real Flask app under gunicorn has traffic behind it;
//! the test reads the rendered DOM (`--dump-dom`) for what a user would
//! read there. The pages carry no script at all, so they work the same
//! with JavaScript off (Chromium's `--dump-dom` itself needs scripts on).
//!
//! The manual's screenshots come from kubernetes_e2e's app in a root of
//! its own (`DEBUG_PAGE_SCREENSHOTS=DIR`).

use flask_ebpf_exporter_e2e as support;

use std::{net::SocketAddr, process::Command, time::Duration};

use scraper::{ElementRef, Html, Selector};
use support::*;

/// Chromium's rendering of `url`.
fn rendered(url: &str) -> Html {
    let output = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--dump-dom",
            url,
        ])
        .output()
        .expect("chromium (Debian package chromium; cargo xtask setup installs it)");
    assert!(output.status.success(), "chromium {url}: {output:?}");
    let dom = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(dom.contains("</html>"), "{url}: {dom}");
    let page = Html::parse_document(&dom);
    // Sorting, refreshing and navigating are links and a meta refresh.
    assert!(
        page.select(&select("script")).next().is_none(),
        "{url} carries a script"
    );
    page
}

fn select(selector: &str) -> Selector {
    Selector::parse(selector).expect("selector")
}

fn text(element: ElementRef<'_>) -> String {
    element.text().collect::<String>().trim().to_owned()
}

/// One row of the routes table, as a user reads it.
#[derive(Debug)]
struct Row {
    route: String,
    endpoint: String,
    named_by: String,
    why: String,
    requests: u64,
    errors: u64,
    p50_ms: f64,
    p99_ms: f64,
    statuses: String,
}

/// "1.23 ms" or "2.50 s", in milliseconds.
fn milliseconds(text: &str) -> f64 {
    let (number, unit) = text.split_once(' ').expect("a figure and its unit");
    let number: f64 = number.parse().expect("a number");
    match unit {
        "ms" => number,
        "s" => number * 1e3,
        other => panic!("unit {other}"),
    }
}

fn routes_rows(page: &Html) -> Vec<Row> {
    page.select(&select("table.routes tbody tr"))
        .map(|row| {
            let cell = |class: &str| {
                row.select(&select(&format!("td.{class}")))
                    .next()
                    .map(text)
                    .unwrap_or_default()
            };
            let cells: Vec<ElementRef<'_>> = row.select(&select("td")).collect();
            Row {
                route: text(cells[0]),
                endpoint: text(cells[1]),
                named_by: row
                    .select(&select("span.source"))
                    .next()
                    .map(text)
                    .unwrap_or_default(),
                why: row
                    .select(&select("div.why"))
                    .next()
                    .map(text)
                    .unwrap_or_default(),
                requests: cell("requests").parse().expect("requests"),
                errors: cell("errors-count").parse().expect("errors"),
                p50_ms: milliseconds(&cell("p50")),
                p99_ms: milliseconds(&cell("p99")),
                statuses: cell("statuses"),
            }
        })
        .collect()
}

fn debug_url(address: SocketAddr, path_and_query: &str) -> String {
    format!("http://{address}{path_and_query}")
}

#[test]
fn debug_pages_read_well_in_a_browser() {
    let venv = require_prerequisites();
    let app = App::start(&venv, Server::GunicornGthread, false);
    let port = app.port.to_string();
    let exporter = Exporter::start(&["--port", &port]);
    // A fast route, a route four times slower (both inside
    // prometheus-flask-exporter's first bucket), errors and misses.
    get_items(app.port, 60);
    for _ in 0..30 {
        let response = http_get(app.port, "/slow?seconds=0.004").expect("slow");
        assert_eq!(response.status, 200);
    }
    for _ in 0..10 {
        assert_eq!(http_get(app.port, "/boom").expect("boom").status, 500);
    }
    for _ in 0..5 {
        assert_eq!(http_get(app.port, "/missing").expect("missing").status, 404);
    }
    // The pages show a snapshot taken once a second.
    eventually(
        Duration::from_secs(15),
        || {
            let response = exporter.debug_page("/debug/routes").expect("debug page");
            serde_json::from_slice::<serde_json::Value>(&response.body).expect("JSON")
        },
        |json| {
            json["workloads"][0]["routes"]
                .as_array()
                .is_some_and(|routes| {
                    routes
                        .iter()
                        .filter_map(|r| r["requests"].as_u64())
                        .sum::<u64>()
                        >= 105
                })
        },
    );

    let page = rendered(&debug_url(
        exporter.debug_address,
        "/debug/routes?format=html",
    ));
    let rows = routes_rows(&page);
    let row = |route: &str| {
        rows.iter()
            .find(|row| row.route == route)
            .unwrap_or_else(|| panic!("no row {route}: {rows:#?}"))
    };
    let items = row("/items/<int:item_id>");
    assert_eq!(items.requests, 60);
    assert_eq!(items.endpoint, "item");
    assert_eq!(items.named_by, "source rule");
    assert!(items.why.contains("app.py:"), "{}", items.why);
    assert_eq!(items.statuses, "200 × 60");
    let slow = row("/slow");
    assert_eq!(slow.requests, 30);
    // Read from the sketch, not interpolated in a 0–5 ms bucket: the slow
    // route's median is at least its 4 ms of sleep, the fast one's well
    // under it.
    assert!(slow.p50_ms >= 4.0, "{slow:?}");
    assert!(items.p50_ms < 3.0, "{items:?}");
    assert!(slow.p50_ms > items.p50_ms * 1.5, "{slow:?} {items:?}");
    assert!(slow.p99_ms >= slow.p50_ms && items.p99_ms >= items.p50_ms);
    let boom = row("/boom");
    assert_eq!((boom.requests, boom.errors), (10, 10));
    assert_eq!(boom.statuses, "500 × 10");
    let unmatched = row("None");
    assert_eq!(unmatched.named_by, "unmatched");
    assert!(unmatched.why.contains("404"), "{}", unmatched.why);
    assert_eq!(unmatched.requests, 5);
    // Sorted by requests by default, largest first.
    assert_eq!(rows[0].route, "/items/<int:item_id>");
    // Auto-refresh is on, with a way to turn it off.
    assert!(
        page.select(&select("meta[http-equiv=refresh]"))
            .next()
            .is_some()
    );
    let toggle = page
        .select(&select("a#refresh-toggle"))
        .next()
        .expect("the refresh toggle");
    assert_eq!(text(toggle), "Stop auto-refresh");

    // Sorting: the links in the column headers, followed as a user would.
    for (sort, first) in [
        ("errors", Some("/boom")),
        ("p99", None),
        ("requests", Some("/items/<int:item_id>")),
    ] {
        let link = page
            .select(&select(&format!("th a[data-sort={sort}]")))
            .next()
            .and_then(|a| a.value().attr("href"))
            .unwrap_or_else(|| panic!("no {sort} header link"))
            .to_owned();
        let sorted = rendered(&debug_url(exporter.debug_address, &link));
        let rows = routes_rows(&sorted);
        // Largest first. Under load a fast route's p99 may catch up with
        // the slow one's: the order is checked, not who leads.
        let key = |row: &Row| match sort {
            "errors" => row.errors as f64,
            "p99" => row.p99_ms,
            _ => row.requests as f64,
        };
        assert!(
            rows.windows(2).all(|pair| key(&pair[0]) >= key(&pair[1])),
            "sorted by {sort}: {rows:#?}"
        );
        if let Some(first) = first {
            assert_eq!(rows[0].route, first, "sorted by {sort}: {rows:#?}");
        }
        let marked = sorted
            .select(&select("th"))
            .find(|th| text(*th).ends_with('▼'))
            .map(text);
        assert!(
            marked.as_deref().is_some_and(|header| header
                .to_lowercase()
                .contains(if sort == "errors" { "5xx" } else { sort })),
            "{marked:?}"
        );
    }

    // Turning auto-refresh off, by its link: no reload, and a way back.
    let off = toggle.value().attr("href").expect("href").to_owned();
    let still = rendered(&debug_url(exporter.debug_address, &off));
    assert!(
        still
            .select(&select("meta[http-equiv=refresh]"))
            .next()
            .is_none()
    );
    let toggle = still
        .select(&select("a#refresh-toggle"))
        .next()
        .expect("toggle");
    assert_eq!(text(toggle), "Refresh every 5 s");
    assert_eq!(routes_rows(&still).len(), rows.len(), "the same rows");

    // The pods page: this server's load.
    let pods = rendered(&debug_url(
        exporter.debug_address,
        "/debug/pods?format=html",
    ));
    let load_row = pods
        .select(&select("tr"))
        .map(text)
        .find(|row| row.contains(&format!("port={port}")) && row.contains('%'))
        .expect("a load row for the app's server");
    assert!(load_row.contains("100.0 %"), "all complete: {load_row}");
    // The connections page: every connection opened.
    let connections = rendered(&debug_url(
        exporter.debug_address,
        "/debug/connections?format=html",
    ));
    let opened: u64 = connections
        .select(&select("tr"))
        .map(text)
        .find_map(|row| row.strip_prefix("opened in all")?.trim().parse().ok())
        .expect("opened in all");
    assert!(opened >= 105, "{opened}");
}
