use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Message)]
struct PaymentRequest { amount: f64 }

#[derive(Serialize, Deserialize, Message)]
struct PaymentResponse { ok: bool }

#[derive(Serialize, Deserialize, Message)]
struct AuditEvent { note: String }

#[agent(receives = [PaymentRequest], sends = [PaymentResponse])]
struct PaymentAgent;

impl Handle<PaymentRequest> for PaymentAgent {
    async fn handle(&self, _request: PaymentRequest, ctx: &Context<Self>) -> HandlerResult {
        ctx.publish(AuditEvent { note: "paid".into() }).await?;
        Ok(())
    }
}

fn main() {}
