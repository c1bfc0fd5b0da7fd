use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

// Replies travel to the session `inbox-<hex>`, which '-' after `{session_id}` would forbid: every
// request waiting for an `Answer` would fail.
#[derive(Serialize, Deserialize, Message)]
#[message(direction = "response", channel = "{class}.{session_id}-{direction}")]
struct Answer { n: u32 }

fn main() {}
