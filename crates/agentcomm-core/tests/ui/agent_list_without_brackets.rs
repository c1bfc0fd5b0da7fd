use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Message)]
struct Ping { n: u32 }

// One type still goes in a list.
#[agent(sends = Ping)]
struct Pinger;

fn main() {}
