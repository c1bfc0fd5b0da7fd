use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Message)]
#[message(direction = "to player")]
struct Move { x: u8 }

fn main() {}
