use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use anyhow::Context as _;
use clap::Parser as _;
use flask_ebpf_exporter::{
    capture::{Capture, CaptureOptions},
    config::{Config, Mode, PodSelection},
    debug::DebugState,
    identity::{
        Attribution, HoldLimits, Identity, PodIdentity, SharedPodIndex,
        kubernetes::{self, PodWatch, WatchMetrics},
        local::{LOCAL_LABELS, LocalIdentity, ProcessFilter},
        pods::{POD_LABELS, Selection},
    },
    metrics::Metrics,
    pipeline::Pipeline,
    routes::{RouteLabeler, RouteOptions, flask_rules::RuleSet},
    server::{self, Readiness, ServerState},
    stream::ConnectionTable,
};
use tracing::info;

/// Requests held while their pod is looked up, at most: about 10 s of a
/// busy node's traffic; beyond it they are exported as unknown at once.
const MAX_HELD_REQUESTS: usize = 100_000;

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&config.log).context("--log")?)
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(config))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let readiness = Arc::new(Readiness::default());
    let mode = config.mode().map_err(anyhow::Error::msg)?;
    let (user_rules, rule_errors) =
        RuleSet::parse(&config.user_rules_text().map_err(anyhow::Error::msg)?);
    if let Some(error) = rule_errors.first() {
        anyhow::bail!("{error} (in --route or --routes-file)");
    }
    let label_names: &[&str] = match mode {
        Mode::Local => &LOCAL_LABELS,
        Mode::Kubernetes { .. } => &POD_LABELS,
    };
    let metrics = Arc::new(Metrics::new(label_names).context("registering metrics")?);
    let identity = match &mode {
        Mode::Local => Identity::Local(LocalIdentity::new(ProcessFilter {
            pids: config.pids.clone(),
            command: config.command.clone(),
            ports: config.ports.clone(),
        })),
        Mode::Kubernetes {
            kubeconfig,
            node_name,
        } => {
            let client = kubernetes::client(kubeconfig.as_deref()).await?;
            let index = SharedPodIndex::default();
            readiness.require_sync();
            let watch_metrics =
                WatchMetrics::register(metrics.registry()).context("registering metrics")?;
            let pods_known = watch_metrics.pods.clone();
            let watch = PodWatch {
                client,
                node_name: node_name.clone(),
                selection: Selection {
                    opt_in: config.pod_selection == PodSelection::OptIn,
                    namespaces: config.namespaces.clone(),
                },
                index: index.clone(),
                metrics: watch_metrics,
                readiness: readiness.clone(),
            };
            tokio::spawn(watch.run());
            Identity::Pods(PodIdentity::new(index, pods_known))
        }
    };

    let debug = config
        .debug_endpoints
        .then(|| Arc::new(DebugState::default()));
    let capture = Capture::load(CaptureOptions {
        capture_bytes: config.capture_bytes,
        ring_buffer_bytes: config.ring_buffer_bytes,
    })?;
    let pipeline = Pipeline {
        capture,
        table: ConnectionTable::new(),
        identity,
        attribution: Attribution::new(HoldLimits {
            wait: config.pod_wait,
            max_held: MAX_HELD_REQUESTS,
        }),
        deleted_pod_grace: config.deleted_pod_grace,
        labeler: RouteLabeler::new(RouteOptions {
            mode: config.path_label,
            max_paths_per_workload: config.max_paths_per_workload,
            segment_cap: config.route_segment_cap as usize,
            user_rules: Arc::new(user_rules),
        }),
        metrics: metrics.clone(),
        readiness: readiness.clone(),
        debug: debug.clone(),
    };
    let shutdown = Arc::new(AtomicBool::new(false));
    let pipeline_shutdown = shutdown.clone();
    let pipeline_thread = std::thread::Builder::new()
        .name("pipeline".to_owned())
        .spawn(move || pipeline.run(pipeline_shutdown))
        .context("starting the pipeline thread")?;

    info!(listen = %config.listen, ?mode, path_label = ?config.path_label, "serving /metrics, /healthz, /readyz");
    axum::serve(
        listener,
        server::router(ServerState {
            metrics,
            readiness,
            debug,
        }),
    )
    .with_graceful_shutdown(shutdown_signal())
    .await
    .context("serving HTTP")?;
    shutdown.store(true, Ordering::SeqCst);
    pipeline_thread
        .join()
        .map_err(|_| anyhow::anyhow!("pipeline thread panicked"))?;
    info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}
