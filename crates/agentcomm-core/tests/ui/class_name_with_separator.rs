use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Message)]
#[message(name = "billing:PaymentRequest")]
struct PaymentRequest { amount: f64 }

fn main() {}
