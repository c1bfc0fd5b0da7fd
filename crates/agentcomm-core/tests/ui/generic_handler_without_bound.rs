// A handler generic over the message type would claim every type, received or not: it needs the bound
// `where Self: Receives<M>`, which holds for exactly the types in `receives` (see tests/handlers.rs).
use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, Message)]
struct Joined { player: String }

#[derive(Debug, Serialize, Deserialize, Message)]
struct Left { player: String }

#[agent(receives = [Joined, Left])]
struct Auditor;

impl<M: Message + std::fmt::Debug> Handle<M> for Auditor {
    async fn handle(&self, message: M, _ctx: &Context<Self>) -> HandlerResult {
        println!("{message:?}");
        Ok(())
    }
}

fn main() {}
