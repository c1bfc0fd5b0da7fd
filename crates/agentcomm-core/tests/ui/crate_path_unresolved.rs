use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

// `crate = ..` names where agentcomm-core is; a wrong one is reported on the path given.
#[derive(Serialize, Deserialize, Message)]
#[message(crate = agentcom)]
struct Ping { n: u32 }

fn main() {}
