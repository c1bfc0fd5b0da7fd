// `Sends` written by hand would let an agent send a type its declaration does not list (and its
// `SENDS`, which the runtime reads, would not name it): only `#[agent(sends = [..])]` implements it.
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

impl Sends<AuditEvent> for PaymentAgent {}

impl Handle<PaymentRequest> for PaymentAgent {
    async fn handle(&self, _request: PaymentRequest, ctx: &Context<Self>) -> HandlerResult {
        ctx.publish(AuditEvent { note: "paid".into() }).await?;
        Ok(())
    }
}

fn main() {}
