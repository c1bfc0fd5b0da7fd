use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Message)]
struct Bid {
    #[message(non_empty)]
    amount: u32,
}

fn main() {}
