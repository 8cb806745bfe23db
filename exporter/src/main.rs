use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use anyhow::Context as _;
use clap::Parser as _;
use flask_ebpf_exporter::{
    capture::{Capture, CaptureCounters, CaptureOptions},
    config::{Config, Mode, Settings, StageSettings},
    debug::DebugState,
    health::Health,
    identity::{
        IdentityStage,
        containers::PodIdentity,
        kubernetes::{self, PodWatch, WatchMetrics},
        local::{LocalIdentity, ProcessFilter},
        pods::{Selection, SharedPodIndex},
    },
    pipeline::{Pipeline, Stages},
    preflight::{self, Granted},
    routes::discovery::helper::child as helper,
    rules::regexes::RegexMemory,
    server::{
        self, ServerState,
        accept::{self, ConnectionFamilies, ListenerLimits},
    },
    telemetry::{Budget, Budgets},
};
use prometheus::Registry;
use tracing::info;

fn main() -> anyhow::Result<()> {
    // The route-discovery helper: the agent starts its own binary so.
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new(helper::SUBCOMMAND)) {
        std::process::exit(helper::main());
    }
    let config = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&config.log).context("--log")?)
        .with_writer(std::io::stderr)
        .init();
    let settings = config.settings()?;
    // Before any thread starts: capabilities raised here pass to the
    // threads started after.
    let granted = preflight::check()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(settings, granted))
}

async fn run(settings: Settings, granted: Granted) -> anyhow::Result<()> {
    let Settings {
        listen,
        debug_listen,
        listener_limits,
        mode,
        local_filter,
        pod_selection,
        capture,
        stages,
    } = settings;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let health = Arc::new(Health::default());
    let registry = Registry::new();
    // The agent's own CPU, memory and file descriptors (process_*), for the
    // dashboard's health row.
    registry
        .register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .context("registering process metrics")?;
    let connections =
        ConnectionFamilies::register(&registry).context("registering connection metrics")?;
    let debug_listener = match debug_listen {
        Some(address) => Some(
            tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("binding {address} (--debug-listen)"))?,
        ),
        None => None,
    };
    let identity = identity_stage(&mode, local_filter, pod_selection, &registry, &health).await?;
    let debug = debug_listen.map(|_| Arc::new(DebugState::default()));
    let path_label = stages.routes.path_label;
    let pipeline = pipeline(
        Parts {
            identity,
            stages,
            capture,
            debug: debug.clone(),
            granted,
        },
        &registry,
        &health,
    )?;
    let shutdown = Arc::new(AtomicBool::new(false));
    let pipeline_shutdown = shutdown.clone();
    let pipeline_thread = std::thread::Builder::new()
        .name("pipeline".to_owned())
        .spawn(move || pipeline.run(pipeline_shutdown))
        .context("starting the pipeline thread")?;

    info!(%listen, ?mode, ?path_label, "serving /metrics, /healthz, /readyz");
    if let Some(listen) = debug_listen {
        info!(%listen, "serving /debug/routes, /debug/pods, /debug/connections");
    }
    let state = ServerState {
        registry,
        health,
        debug,
    };
    let listeners = Listeners {
        metrics: listener,
        debug: debug_listener,
        limits: listener_limits,
        connections,
    };
    serve(listeners, state).await;
    shutdown.store(true, Ordering::SeqCst);
    pipeline_thread
        .join()
        .map_err(|_| anyhow::anyhow!("pipeline thread panicked"))?;
    info!("stopped");
    Ok(())
}

/// The agent's two listeners and their bounds.
struct Listeners {
    /// `/metrics`, `/healthz` and `/readyz`.
    metrics: tokio::net::TcpListener,
    /// The debug pages, when on.
    debug: Option<tokio::net::TcpListener>,
    limits: ListenerLimits,
    connections: ConnectionFamilies,
}

/// Serves the endpoints until SIGTERM or Ctrl-C.
async fn serve(listeners: Listeners, state: ServerState) {
    let (stop, stopped) = tokio::sync::watch::channel(());
    let debug_server = listeners.debug.map(|listener| {
        let mut stopped = stopped.clone();
        tokio::spawn(accept::serve(
            listener,
            server::debug_router(state.clone()),
            listeners.limits,
            listeners.connections.listener("debug"),
            async move {
                let _ = stopped.changed().await;
            },
        ))
    });
    accept::serve(
        listeners.metrics,
        server::router(state),
        listeners.limits,
        listeners.connections.listener("metrics"),
        shutdown_signal(),
    )
    .await;
    let _ = stop.send(());
    if let Some(debug_server) = debug_server
        && let Err(error) = debug_server.await
    {
        tracing::error!(%error, "the debug pages' server failed");
    }
}

/// Local mode's process filters, or Kubernetes mode's pod watch (started
/// here, on the runtime).
async fn identity_stage(
    mode: &Mode,
    local_filter: ProcessFilter,
    selection: Selection,
    registry: &Registry,
    health: &Arc<Health>,
) -> anyhow::Result<IdentityStage> {
    let (kubeconfig, node_name) = match mode {
        Mode::Local => {
            let local = LocalIdentity::new(local_filter)
                .context("starting the thread that finds local servers")?;
            return Ok(IdentityStage::Local(local));
        }
        Mode::Kubernetes {
            kubeconfig,
            node_name,
        } => (kubeconfig, node_name),
    };
    let client = kubernetes::client(kubeconfig.as_deref()).await?;
    let index = SharedPodIndex::default();
    health.require_sync();
    let watch_metrics = WatchMetrics::register(registry).context("registering metrics")?;
    let pods_known = watch_metrics.pods.clone();
    let watch = PodWatch {
        client,
        node_name: node_name.clone(),
        selection,
        index: index.clone(),
        metrics: watch_metrics,
        health: health.clone(),
    };
    tokio::spawn(watch.run());
    Ok(IdentityStage::Pods(PodIdentity::new(index, pods_known)))
}

/// What the pipeline is built from: the identity stage started on the
/// runtime, the other stages' settings, and the capture's.
struct Parts {
    identity: IdentityStage,
    stages: StageSettings,
    capture: CaptureOptions,
    debug: Option<Arc<DebugState>>,
    granted: Granted,
}

/// Every stage, each registering its own counters; the BPF programs are
/// loaded and attached here.
fn pipeline(parts: Parts, registry: &Registry, health: &Arc<Health>) -> anyhow::Result<Pipeline> {
    let Parts {
        mut identity,
        stages,
        capture,
        debug,
        granted,
    } = parts;
    let registering = "registering metrics";
    let budgets = Budgets::register(registry).context(registering)?;
    RegexMemory::node().count_refusals_in(budgets.counter(Budget::RuleRegexBytes));
    RegexMemory::count_workload_refusals_in(budgets.counter(Budget::WorkloadRuleRegexBytes));
    flask_ebpf_exporter::procfs::sockets::count_cut_scans_in(budgets.counter(Budget::ProcScan));
    if let IdentityStage::Local(local) = &mut identity {
        local.count_refusals_in(budgets.counter(Budget::LocalServerLookups));
    }
    let stages = Stages::new(stages, identity, registry, &budgets).context(registering)?;
    let capture = Capture::load(
        &granted,
        capture,
        CaptureCounters::register(registry, &budgets).context(registering)?,
    )?;
    Ok(Pipeline {
        capture,
        selections_seen: stages.identity.selections(),
        stages,
        health: health.clone(),
        debug,
    })
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
