//! What several test binaries of core share: a worker agent whose jobs sleep as long as they say.

use std::time::Duration;

use agentcomm_core::prelude::*;
use agentcomm_core::runtime::AgentHandle;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// A job that takes `sleep_ms` to handle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
pub struct Job {
    pub sleep_ms: u64,
}

/// Publishes jobs.
#[agent(sends = [Job])]
pub struct Client;

/// Handles jobs, saying on `started` when each begins.
#[agent(receives = [Job])]
pub struct Worker {
    pub started: mpsc::UnboundedSender<()>,
}

impl Handle<Job> for Worker {
    async fn handle(&self, job: Job, _ctx: &Context<Self>) -> HandlerResult {
        let _ = self.started.send(());
        tokio::time::sleep(Duration::from_millis(job.sleep_ms)).await;
        Ok(())
    }
}

/// A runtime on the in-memory router whose `Worker` has started a job of `sleep_ms`: the runtime and
/// the worker's handle.
pub async fn busy_worker(sleep_ms: u64) -> (Runtime, AgentHandle) {
    let runtime = Runtime::new(MemoryRouter::new());
    let (started, mut started_rx) = mpsc::unbounded_channel();
    let agent = runtime.spawn(Worker { started }).await.unwrap();
    runtime
        .publisher::<Client>()
        .publish("s1", Job { sleep_ms })
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), started_rx.recv())
        .await
        .expect("the job starts within 10 s");
    (runtime, agent)
}
