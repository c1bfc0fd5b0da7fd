// Every way an agent or its publisher sends checks the declaration: one error per call, each naming
// the agent, the type and the fix. (`publish` and `request` have their own cases.)
use std::time::Duration;

use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Message)]
#[message(direction = "request")]
struct PaymentRequest { amount: f64 }

#[derive(Serialize, Deserialize, Message)]
struct PaymentResponse { ok: bool }

#[derive(Serialize, Deserialize, Message)]
struct AuditEvent { note: String }

#[agent(receives = [PaymentRequest], sends = [PaymentResponse])]
struct PaymentAgent;

impl Handle<PaymentRequest> for PaymentAgent {
    async fn handle(&self, _request: PaymentRequest, ctx: &Context<Self>) -> HandlerResult {
        ctx.reply(AuditEvent { note: "a".into() }).await?;
        ctx.send_to("s2", AuditEvent { note: "b".into() }).await?;
        ctx.publish_to("reply", "s2", AuditEvent { note: "c".into() }).await?;
        let _: PaymentResponse = ctx.request("s2", AuditEvent { note: "d".into() }).await?;
        let _: PaymentResponse = ctx
            .request_timeout("s2", AuditEvent { note: "e".into() }, Duration::from_secs(1))
            .await?;
        Ok(())
    }
}

async fn run(runtime: Runtime) -> agentcomm_core::Result<()> {
    let publisher = runtime.publisher::<PaymentAgent>();
    publisher.publish_to("event", "s1", AuditEvent { note: "e".into() }).await?;
    let _ = publisher.publish_batch("s1", vec![AuditEvent { note: "f".into() }]).await;
    let _: PaymentResponse = publisher
        .request_timeout("s1", AuditEvent { note: "g".into() }, Duration::from_secs(1))
        .await?;
    Ok(())
}

fn main() {
    let _ = run;
}
