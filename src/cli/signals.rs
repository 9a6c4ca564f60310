//! Clean shutdown on SIGINT and SIGTERM.

use std::future::Future;

/// Installs the SIGINT and SIGTERM handlers now (call it inside the
/// runtime, before announcing readiness) and returns a future that
/// completes at the first of them.
pub fn shutdown() -> impl Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                    _ = int.recv() => tracing::info!("SIGINT: shutting down"),
                }
            }
            _ => {
                tracing::warn!("no signal handlers: stop this process with SIGKILL");
                std::future::pending::<()>().await;
            }
        }
    }
}
