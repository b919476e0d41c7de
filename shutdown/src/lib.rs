//! How every Conclave server stops. Pods are stopped with SIGTERM (deletion,
//! rollout, drain) and a container's first process is PID 1, which the
//! kernel does not stop on SIGTERM by default: a server that does not handle
//! it keeps running until the kubelet's SIGKILL, a grace period later.

use std::time::Duration;
use tokio::task::JoinSet;

/// The stop signals, registered: a server listens before it starts
/// serving, so a registration failure stops it at start, not at the end.
#[derive(Debug)]
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn listen() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves at the next SIGTERM or SIGINT.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Waits at most `grace` for every task in `tasks` to end; returns how many
/// were still running (they are aborted when the set is dropped).
pub async fn join_within<T: 'static>(tasks: &mut JoinSet<T>, grace: Duration) -> usize {
    let all = async { while tasks.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(grace, all).await;
    tasks.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn join_within_waits_for_quick_tasks_and_counts_the_slow_ones() {
        let mut tasks = JoinSet::new();
        tasks.spawn(tokio::time::sleep(Duration::from_secs(1)));
        tasks.spawn(tokio::time::sleep(Duration::from_secs(2)));
        assert_eq!(join_within(&mut tasks, Duration::from_secs(5)).await, 0);
        tasks.spawn(tokio::time::sleep(Duration::from_secs(1)));
        tasks.spawn(tokio::time::sleep(Duration::from_secs(60)));
        assert_eq!(join_within(&mut tasks, Duration::from_secs(5)).await, 1);
    }
}
