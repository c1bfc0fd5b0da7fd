use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

// Two versions of a message in two modules have one class name by default, the type's: an agent that
// receives one and sends the other receives its own output too, and this one would loop for ever.
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

#[agent(receives = [v1::Order], sends = [v2::Order])]
struct Upgrader;

impl Handle<v1::Order> for Upgrader {
    async fn handle(&self, order: v1::Order, ctx: &Context<Self>) -> HandlerResult {
        ctx.publish(v2::Order { id: order.id, note: None }).await?;
        Ok(())
    }
}

// One type through an alias is one type: no error here.
type Reply = v1::Order;

#[agent(receives = [v1::Order], sends = [Reply])]
struct Echo;

impl Handle<v1::Order> for Echo {
    async fn handle(&self, order: v1::Order, ctx: &Context<Self>) -> HandlerResult {
        ctx.reply(order).await?;
        Ok(())
    }
}

fn main() {}
