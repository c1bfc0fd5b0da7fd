use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Message)]
enum Command {
    Charge {
        #[message(non_empty)]
        account: String,
    },
    Refund,
}

fn main() {}
