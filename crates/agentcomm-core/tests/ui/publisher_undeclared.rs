use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Message)]
struct PaymentRequest { amount: f64 }

#[derive(Serialize, Deserialize, Message)]
struct Refund { amount: f64 }

#[agent(sends = [PaymentRequest])]
struct PaymentClient;

async fn run(runtime: Runtime) -> agentcomm_core::Result<()> {
    runtime.publisher::<PaymentClient>().publish("s1", Refund { amount: 1.0 }).await?;
    Ok(())
}

fn main() {
    let _ = run;
}
