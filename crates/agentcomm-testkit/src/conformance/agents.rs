//! The messages and agents of the scenarios that go through the runtime. Class names start with
//! `Conformance` so that they are recognisable on a shared broker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, watch};

/// A unit of work: `run` and `seq` identify it, `label` must not be empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[message(name = "ConformanceWork", direction = "task")]
pub struct Work {
    pub run: String,
    pub seq: u64,
    #[message(non_empty)]
    pub label: String,
}

/// A message type with its own channel template (no class in the name, dots between parts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[message(
    name = "ConformanceTemplated",
    channel = "conformance.{direction}.{session_id}"
)]
pub struct Templated {
    pub seq: u64,
}

/// A request the echo agent answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[message(name = "ConformanceEchoRequest", direction = "request")]
pub struct EchoRequest {
    pub run: String,
    pub seq: u64,
}

/// The echo agent's reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[message(name = "ConformanceEchoResponse", direction = "response")]
pub struct EchoResponse {
    pub run: String,
    pub seq: u64,
}

/// Fails every attempt, counting attempts per message.
#[agent(name = "ConformanceFailingAgent", receives = [Work])]
pub struct FailingAgent {
    pub calls: Arc<Mutex<HashMap<u64, u32>>>,
}

impl Handle<Work> for FailingAgent {
    async fn handle(&self, work: Work, _ctx: &Context<Self>) -> HandlerResult {
        *self
            .calls
            .lock()
            .expect("calls lock")
            .entry(work.seq)
            .or_default() += 1;
        Err(HandlerError::msg(
            "conformance: this handler fails on purpose",
        ))
    }
}

/// Handles work and reports each handled sequence number.
#[agent(name = "ConformanceWorker", receives = [Work])]
pub struct Worker {
    pub handled: watch::Sender<Vec<u64>>,
}

impl Handle<Work> for Worker {
    async fn handle(&self, work: Work, _ctx: &Context<Self>) -> HandlerResult {
        self.handled.send_modify(|handled| handled.push(work.seq));
        Ok(())
    }
}

/// Says when a handler starts, waits for the gate, then records that it finished (waking whoever
/// waits on `finished`). Work of another run (a backend whose names leak between runs) is
/// acknowledged at once and not recorded.
#[agent(name = "ConformanceGatedAgent", receives = [Work])]
pub struct GatedAgent {
    pub run: String,
    pub started: mpsc::UnboundedSender<u64>,
    pub gate: Arc<Semaphore>,
    pub finished: Arc<watch::Sender<Vec<u64>>>,
}

impl Handle<Work> for GatedAgent {
    async fn handle(&self, work: Work, _ctx: &Context<Self>) -> HandlerResult {
        if work.run != self.run {
            return Ok(());
        }
        let _ = self.started.send(work.seq);
        let _permit = self.gate.acquire().await?;
        self.finished
            .send_modify(|finished| finished.push(work.seq));
        Ok(())
    }
}

/// Replies to each request with the same run and sequence number.
#[agent(name = "ConformanceEchoAgent", receives = [EchoRequest], sends = [EchoResponse])]
pub struct EchoAgent;

impl Handle<EchoRequest> for EchoAgent {
    async fn handle(&self, request: EchoRequest, ctx: &Context<Self>) -> HandlerResult {
        ctx.reply(EchoResponse {
            run: request.run,
            seq: request.seq,
        })
        .await?;
        Ok(())
    }
}

/// Answers requests like [`EchoAgent`], but fails every request whose `seq` is in `fail`, and holds
/// each of the others, once it has said so in `started`, until its `seq` is in `released`. Requests
/// of another run (a backend whose names leak between runs) are acknowledged at once and not
/// answered.
#[agent(name = "ConformanceGatedEchoAgent", receives = [EchoRequest], sends = [EchoResponse])]
pub struct GatedEchoAgent {
    pub run: String,
    pub fail: Vec<u64>,
    pub started: Arc<watch::Sender<Vec<u64>>>,
    pub released: watch::Receiver<Vec<u64>>,
}

impl Handle<EchoRequest> for GatedEchoAgent {
    async fn handle(&self, request: EchoRequest, ctx: &Context<Self>) -> HandlerResult {
        if request.run != self.run {
            return Ok(());
        }
        if self.fail.contains(&request.seq) {
            return Err(HandlerError::msg(
                "conformance: this request fails on purpose",
            ));
        }
        self.started
            .send_modify(|started| started.push(request.seq));
        self.released
            .clone()
            .wait_for(|released| released.contains(&request.seq))
            .await?;
        ctx.reply(EchoResponse {
            run: request.run,
            seq: request.seq,
        })
        .await?;
        Ok(())
    }
}

/// A reply type with its own channel template (no class in the name, dots between parts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[message(
    name = "ConformanceTemplatedEchoResponse",
    direction = "response",
    channel = "conformance_echo.{direction}.{session_id}"
)]
pub struct TemplatedEchoResponse {
    pub run: String,
    pub seq: u64,
}

/// A request answered with a [`TemplatedEchoResponse`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[message(name = "ConformanceTemplatedEchoRequest", direction = "request")]
pub struct TemplatedEchoRequest {
    pub run: String,
    pub seq: u64,
}

/// Replies to each request with a templated reply of the same run and sequence number.
#[agent(
    name = "ConformanceTemplatedEchoAgent",
    receives = [TemplatedEchoRequest],
    sends = [TemplatedEchoResponse]
)]
pub struct TemplatedEchoAgent;

impl Handle<TemplatedEchoRequest> for TemplatedEchoAgent {
    async fn handle(&self, request: TemplatedEchoRequest, ctx: &Context<Self>) -> HandlerResult {
        ctx.reply(TemplatedEchoResponse {
            run: request.run,
            seq: request.seq,
        })
        .await?;
        Ok(())
    }
}
