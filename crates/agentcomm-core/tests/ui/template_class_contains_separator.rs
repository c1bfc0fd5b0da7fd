use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

// Every channel of this type would be named `billing.Invoice.<direction>.<session>`, which cannot be
// split back at '.' into its class, direction and session.
#[derive(Serialize, Deserialize, Message)]
#[message(name = "billing.Invoice", channel = "{class}.{direction}.{session_id}")]
struct Invoice { total: f64 }

fn main() {}
