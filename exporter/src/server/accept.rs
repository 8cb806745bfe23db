//! The accept loop of the agent's listeners. `/metrics` listens on the
//! node's address, where any host that reaches the node may connect: every
//! connection holds a descriptor and a task, so their number and their time
//! are bounded, and each refusal and timeout is counted.

use std::{future::Future, sync::Arc, time::Duration};

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    task::JoinSet,
};

/// How long a connection lives before it is asked to close once its
/// current response is written (a client then reconnects), and how long
/// that may take: a client that stops reading is not waited for longer.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
const CLOSING_GRACE: Duration = Duration::from_secs(5);

/// One connection to a listener, served by hyper.
type Connection = http1::Connection<TokioIo<TcpStream>, TowerToHyperService<Router>>;

/// Bounds of one listener's connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Connections served at once; the listener accepts and closes the rest.
    pub connections: usize,
    /// Time to send a request's headers, from the connection or the
    /// previous response (so it is also the idle timeout).
    pub header_timeout: Duration,
}

/// The families counting every listener's connections, by `listener`.
#[derive(Clone, Debug)]
pub struct ConnectionFamilies {
    open: IntGaugeVec,
    refused: IntCounterVec,
    timed_out: IntCounterVec,
}

impl ConnectionFamilies {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let open = IntGaugeVec::new(
            Opts::new(
                "flask_ebpf_exporter_http_connections",
                "Connections open to the agent's own listeners",
            ),
            &["listener"],
        )?;
        let refused = IntCounterVec::new(
            Opts::new(
                "flask_ebpf_exporter_http_connections_refused_total",
                "Connections to the agent's listeners closed at once: the listener served its most already",
            ),
            &["listener"],
        )?;
        let timed_out = IntCounterVec::new(
            Opts::new(
                "flask_ebpf_exporter_http_connections_timed_out_total",
                "Connections to the agent's listeners closed because a request's headers did not \
                 arrive in time, or a response was not read in time",
            ),
            &["listener"],
        )?;
        registry.register(Box::new(open.clone()))?;
        registry.register(Box::new(refused.clone()))?;
        registry.register(Box::new(timed_out.clone()))?;
        Ok(ConnectionFamilies {
            open,
            refused,
            timed_out,
        })
    }

    /// The counters of one listener, exported from zero.
    pub fn listener(&self, name: &str) -> ConnectionCounters {
        ConnectionCounters {
            open: self.open.with_label_values(&[name]),
            refused: self.refused.with_label_values(&[name]),
            timed_out: self.timed_out.with_label_values(&[name]),
        }
    }
}

/// One listener's connection counters.
#[derive(Clone, Debug)]
pub struct ConnectionCounters {
    open: IntGauge,
    refused: IntCounter,
    timed_out: IntCounter,
}

/// Serves `router` on `listener` within `limits` until `stop` completes;
/// then the open connections are dropped.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ListenerLimits,
    counters: ConnectionCounters,
    stop: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.connections));
    let mut connections = JoinSet::new();
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            () = &mut stop => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of descriptors, mostly: the pending connections
                    // wait in the backlog meanwhile.
                    tracing::warn!(%error, "could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            counters.refused.inc();
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        let counters = counters.clone();
        counters.open.inc();
        connections.spawn(async move {
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            if !finish(connection).await {
                counters.timed_out.inc();
            }
            counters.open.dec();
            drop(permit);
        });
    }
    connections.shutdown().await;
}

/// Serves one connection to its end, asking it to close at its lifetime;
/// false when it ran out of time.
async fn finish(connection: Connection) -> bool {
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = tokio::time::sleep(CONNECTION_LIFETIME) => {
            connection.as_mut().graceful_shutdown();
            match tokio::time::timeout(CLOSING_GRACE, connection.as_mut()).await {
                Ok(result) => result,
                Err(_) => return false,
            }
        }
    };
    match result {
        Ok(()) => true,
        Err(error) if error.is_timeout() => false,
        // A client that went away or spoke something else than HTTP/1.
        Err(error) => {
            tracing::debug!(%error, "connection to a listener ended");
            true
        }
    }
}
