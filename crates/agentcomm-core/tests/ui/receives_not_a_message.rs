use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct PlainStruct { value: u32 }

#[agent(receives = [PlainStruct])]
struct Listener;

fn main() {}
