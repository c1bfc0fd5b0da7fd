use agentcomm_core::prelude::*;

// Two versions of one message crate (tests/fixtures: both libraries are named `orders`): one module
// path, and their `Order` at one line and column. Still two types of one class name.
#[agent(receives = [orders_v1::Order], sends = [orders_v2::Order])]
struct Upgrader;

impl Handle<orders_v1::Order> for Upgrader {
    async fn handle(&self, order: orders_v1::Order, ctx: &Context<Self>) -> HandlerResult {
        ctx.publish(orders_v2::Order { id: order.id, note: None }).await?;
        Ok(())
    }
}

fn main() {}
