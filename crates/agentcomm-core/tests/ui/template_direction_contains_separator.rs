use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Message)]
#[message(channel = "orders_{direction}_{session_id}", direction = "order_placed")]
struct OrderPlaced { order: u64 }

// The default direction, `event`, against a template that splits directions at 'e'.
#[derive(Serialize, Deserialize, Message)]
#[message(channel = "{class}:{direction}e{session_id}")]
struct Shipped { order: u64 }

fn main() {}
