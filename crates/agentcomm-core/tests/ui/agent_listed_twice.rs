use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Message)]
struct Ping { n: u32 }

#[agent(sends = [Ping, Ping])]
struct Pinger;

fn main() {}
