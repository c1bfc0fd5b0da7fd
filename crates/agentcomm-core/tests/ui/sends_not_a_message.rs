use agentcomm_core::prelude::*;

#[agent(sends = [String])]
struct Announcer;

fn main() {}
