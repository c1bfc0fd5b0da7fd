use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

// Two versions of a message in two modules have one class name by default, the type's: the runtime
// dispatches a delivery by its class, so an agent receiving both could not tell them apart.
mod v1 {
    use super::*;

    #[derive(Serialize, Deserialize, Message)]
    pub struct Order { pub id: u32 }
}

mod v2 {
    use super::*;

    #[derive(Serialize, Deserialize, Message)]
    pub struct Order { pub id: u32, pub note: Option<String> }
}

#[agent(receives = [v1::Order, v2::Order])]
struct Both;

impl Handle<v1::Order> for Both {
    async fn handle(&self, _: v1::Order, _: &Context<Self>) -> HandlerResult {
        Ok(())
    }
}

impl Handle<v2::Order> for Both {
    async fn handle(&self, _: v2::Order, _: &Context<Self>) -> HandlerResult {
        Ok(())
    }
}

fn main() {}
