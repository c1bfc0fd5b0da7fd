use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Message)]
struct PaymentRequest { amount: f64 }

#[derive(Serialize, Deserialize, Message)]
struct PaymentResponse { ok: bool }

#[agent(sends = [PaymentResponse])]
struct PaymentClient;

async fn run(runtime: Runtime) -> agentcomm_core::Result<()> {
    let _answer: PaymentResponse = runtime
        .publisher::<PaymentClient>()
        .request("s1", PaymentRequest { amount: 1.0 })
        .await?;
    Ok(())
}

fn main() {
    let _ = run;
}
