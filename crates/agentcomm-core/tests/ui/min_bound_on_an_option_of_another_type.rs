use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Message)]
struct Offer {
    #[message(min = "1")]
    quantity: Option<u32>,
}

fn main() {}
