use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Message)]
#[message(direction = "reply")]
struct Answer { n: u8 }

fn main() {}
