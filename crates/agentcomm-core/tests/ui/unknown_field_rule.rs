use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Message)]
struct PaymentRequest {
    #[message(positive)]
    amount: f64,
}

fn main() {}
