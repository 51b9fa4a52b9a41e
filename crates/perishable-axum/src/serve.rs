//! Serving a router over HTTP/1.1 with graceful shutdown: [`serve`].

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use perishable_core::client_ip::PeerAddr;
use tokio::net::TcpListener;
use tower::ServiceExt as _;

/// How long open requests may run after shutdown begins.
const DRAIN: Duration = Duration::from_secs(30);
/// How long the settlements of finished calls may take to reach the store after that.
const SETTLE: Duration = Duration::from_secs(5);

/// Serves `app` on `listener` over HTTP/1.1 (with upgrades, for the Realtime route's
/// WebSockets) until `shutdown` completes, then stops accepting, lets open requests finish
/// (up to 30 s), and waits for their settlements to reach the store
/// ([`perishable_core::store::settled`], up to 5 s).
///
/// What [`axum::serve()`] does, tuned for a proxy:
///
/// - every request carries its peer address as [`PeerAddr`], which the per-IP limits read (no
///   `into_make_service_with_connect_info` needed);
/// - HTTP/1.1 only: hyper's HTTP/1.1 server directly, rather than detecting cleartext HTTP/2 on
///   every connection, is about 5 KiB less per open connection and a few microseconds less per
///   request (`docs/performance.md`);
/// - a request's headers must arrive within 30 s (a client that trickles them in cannot hold a
///   connection forever), and every socket is `TCP_NODELAY`, so streamed tokens leave at once;
/// - a failed `accept` (out of file descriptors, say) backs off for 50 ms instead of spinning.
///
/// # Example
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let config = perishable_core::Config::builder().upstream_api_key("sk-...").build()?;
/// let app = axum::Router::new().nest("/ai", perishable_axum::router(config));
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
/// perishable_axum::serve(listener, app, async {
///     let _ = tokio::signal::ctrl_c().await;
/// })
/// .await;
/// # Ok(()) }
/// ```
pub async fn serve(listener: TcpListener, app: Router, shutdown: impl Future<Output = ()>) {
    // `signal` tells the connections to finish; `closed` resolves once all of them have
    // dropped their receiver (what axum::serve does, with HTTP upgrades, which hyper-util's
    // GracefulShutdown does not take).
    let (signal, signal_rx) = tokio::sync::watch::channel(());
    let (closed, closed_rx) = tokio::sync::watch::channel(());
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let service =
            app.clone()
                .map_request(move |mut req: http::Request<hyper::body::Incoming>| {
                    // Perishable's own extension (what axum's `ConnectInfo` is copied into
                    // otherwise): one less per request.
                    req.extensions_mut().insert(PeerAddr(peer));
                    req.map(axum::body::Body::new)
                });
        // The timer turns on hyper's 30 s limit for reading a request's headers.
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .serve_connection(
                TokioIo::new(tcp),
                hyper_util::service::TowerToHyperService::new(service),
            )
            // The Realtime route's WebSockets.
            .with_upgrades();
        let mut signal_rx = signal_rx.clone();
        let closed_rx = closed_rx.clone();
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = signal_rx.changed() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(closed_rx);
        });
    }
    drop(listener);
    drop(signal_rx);
    drop(closed_rx);
    let _ = signal.send(());
    if tokio::time::timeout(DRAIN, closed.closed()).await.is_err() {
        tracing::warn!("requests still open after 30 s; closing them");
    }
    // The finished calls' settlements (their real usage, their stream slots) reach the store
    // before this returns and the process exits.
    if tokio::time::timeout(SETTLE, perishable_core::store::settled())
        .await
        .is_err()
    {
        tracing::warn!("settlements still unsent after 5 s: their reservations stand");
    }
}
