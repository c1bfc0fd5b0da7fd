use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

// The compiler accepts the derive's helper attribute anywhere in the item; on a variant the derive
// would ignore it without a word.
#[derive(Serialize, Deserialize, Message)]
enum Command {
    #[message(name = "Charge")]
    Charge { account: String },
    Refund,
}

fn main() {}
