//! The agent, built from validated [`Settings`] in one place and in the
//! order it starts: its listeners bound, its own metrics registered, the
//! identity stage started (Kubernetes mode's pod watch, on the runtime),
//! every stage after capture built, and the kernel programs loaded and
//! attached. [`Agent::run`] then drives the [`Pipeline`] on a thread of its
//! own and serves the endpoints until SIGTERM or Ctrl-C.

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use prometheus::Registry;
use tokio::net::TcpListener;
use tracing::info;

use crate::{
    capture::{Capture, CaptureCounters, CaptureError},
    config::{Mode, Settings},
    debug::DebugState,
    health::Health,
    identity::{
        IdentityStage,
        containers::PodIdentity,
        kubernetes::{self, KubeError, PodWatch, WatchMetrics},
        local::{LocalIdentity, ProcessFilter},
        pods::{PodIndex, Selection, SharedPodIndex},
    },
    pipeline::{Pipeline, Stages},
    preflight::Granted,
    procfs,
    rules::regexes::RegexMemory,
    server::{
        self, ServerState,
        accept::{self, ConnectionFamilies, ListenerLimits},
    },
    telemetry::{Budget, Budgets},
};

/// Why the agent could not start, or stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("binding {address} ({flag})")]
    Bind {
        address: SocketAddr,
        flag: &'static str,
        source: io::Error,
    },
    #[error("registering the agent's metrics")]
    Register(#[from] prometheus::Error),
    #[error("starting the thread that finds local servers")]
    LocalServers(#[source] io::Error),
    #[error(transparent)]
    Kubernetes(#[from] KubeError),
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error("starting the pipeline thread")]
    PipelineThread(#[source] io::Error),
    #[error("the pipeline thread panicked")]
    PipelinePanicked,
}

/// A started agent: the kernel programs attached, the endpoints bound,
/// nothing served yet.
pub struct Agent {
    pipeline: Pipeline,
    listeners: Listeners,
    state: ServerState,
}

/// The agent's two listeners and their bounds.
struct Listeners {
    /// `/metrics`, `/healthz` and `/readyz`.
    metrics: TcpListener,
    /// The debug pages, when on.
    debug: Option<TcpListener>,
    limits: ListenerLimits,
    connections: ConnectionFamilies,
}

async fn bind(address: SocketAddr, flag: &'static str) -> Result<TcpListener, AgentError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| AgentError::Bind {
            address,
            flag,
            source,
        })
}

impl Agent {
    /// Builds every part from `settings`. `granted` shows that the host
    /// and the container grant what loading the programs takes.
    pub async fn start(settings: Settings, granted: Granted) -> Result<Self, AgentError> {
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
        let metrics_listener = bind(listen, "--listen").await?;
        let debug_listener = match debug_listen {
            Some(address) => Some(bind(address, "--debug-listen").await?),
            None => None,
        };
        let health = Arc::new(Health::default());
        let registry = Registry::new();
        // The agent's own CPU, memory and file descriptors (process_*), for
        // the dashboard's health row.
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let connections = ConnectionFamilies::register(&registry)?;
        let budgets = Budgets::register(&registry)?;
        RegexMemory::node().count_refusals_in(budgets.counter(Budget::RuleRegexBytes));
        RegexMemory::count_workload_refusals_in(budgets.counter(Budget::WorkloadRuleRegexBytes));
        procfs::sockets::count_cut_scans_in(budgets.counter(Budget::ProcScan));

        let identity = identity_stage(
            &mode,
            local_filter,
            pod_selection,
            &registry,
            &budgets,
            &health,
        )
        .await?;
        let path_label = stages.routes.path_label;
        let stages = Stages::new(stages, identity, &registry, &budgets)?;
        let capture = Capture::load(
            &granted,
            capture,
            CaptureCounters::register(&registry, &budgets)?,
        )?;
        let debug = debug_listen.map(|_| Arc::new(DebugState::default()));
        info!(%listen, ?mode, ?path_label, "serving /metrics, /healthz, /readyz");
        if let Some(listen) = debug_listen {
            info!(%listen, "serving /debug/routes, /debug/pods, /debug/connections");
        }
        Ok(Agent {
            pipeline: Pipeline {
                capture,
                selections_seen: stages.identity.selections(),
                stages,
                health: health.clone(),
                debug: debug.clone(),
            },
            listeners: Listeners {
                metrics: metrics_listener,
                debug: debug_listener,
                limits: listener_limits,
                connections,
            },
            state: ServerState {
                registry,
                health,
                debug,
            },
        })
    }

    /// Runs the pipeline on its thread and serves the endpoints until
    /// SIGTERM or Ctrl-C; then stops the pipeline and waits for it.
    pub async fn run(self) -> Result<(), AgentError> {
        let Agent {
            pipeline,
            listeners,
            state,
        } = self;
        let shutdown = Arc::new(AtomicBool::new(false));
        let pipeline_shutdown = shutdown.clone();
        let pipeline_thread = std::thread::Builder::new()
            .name("pipeline".to_owned())
            .spawn(move || pipeline.run(pipeline_shutdown))
            .map_err(AgentError::PipelineThread)?;
        serve(listeners, state).await;
        shutdown.store(true, Ordering::SeqCst);
        pipeline_thread
            .join()
            .map_err(|_| AgentError::PipelinePanicked)?;
        info!("stopped");
        Ok(())
    }
}

/// Local mode's process filters, or Kubernetes mode's pod watch (started
/// here, on the runtime).
async fn identity_stage(
    mode: &Mode,
    local_filter: ProcessFilter,
    selection: Selection,
    registry: &Registry,
    budgets: &Budgets,
    health: &Arc<Health>,
) -> Result<IdentityStage, AgentError> {
    let (kubeconfig, node_name, grain) = match mode {
        Mode::Local => {
            let mut local = LocalIdentity::new(local_filter).map_err(AgentError::LocalServers)?;
            local.count_refusals_in(budgets.counter(Budget::LocalServerLookups));
            return Ok(IdentityStage::Local(local));
        }
        Mode::Kubernetes {
            kubeconfig,
            node_name,
            grain,
        } => (kubeconfig, node_name, *grain),
    };
    let client = kubernetes::client(kubeconfig.as_deref()).await?;
    let index: SharedPodIndex = Arc::new(Mutex::new(PodIndex::new(grain)));
    health.require_sync();
    let watch_metrics = WatchMetrics::register(registry)?;
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
