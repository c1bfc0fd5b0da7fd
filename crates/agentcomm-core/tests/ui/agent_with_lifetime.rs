use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Message)]
struct Ping { n: u32 }

#[agent(sends = [Ping])]
struct Pinger<'a> {
    name: &'a str,
}

fn main() {}
