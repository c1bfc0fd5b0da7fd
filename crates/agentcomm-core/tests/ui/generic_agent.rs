use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Message)]
struct Ping { n: u32 }

#[agent(sends = [Ping])]
struct Pinger<S> {
    state: S,
}

fn main() {}
