use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Message)]
struct Ping { n: u32 }

#[agent(recieves = [Ping])]
struct Pinger;

fn main() {}
