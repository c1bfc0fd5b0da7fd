use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Message)]
#[message(channel = "payments.{direction}.{user}")]
struct PaymentRequest { amount: f64 }

fn main() {}
