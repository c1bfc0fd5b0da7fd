use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Message)]
struct Payment {
    #[message(min = 0)]
    amount: f64,
}

fn main() {}
