use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Message)]
struct Tick { n: u32 }

#[derive(Serialize, Deserialize, Message)]
struct Alarm { level: u8 }

// Declares no `sends` at all: publishing anything names the agent, the type and the fix (not a
// "mismatched types" inferred from a single impl).
#[agent(receives = [Tick])]
struct Clock;

impl Handle<Tick> for Clock {
    async fn handle(&self, _tick: Tick, ctx: &Context<Self>) -> HandlerResult {
        ctx.publish(Alarm { level: 1 }).await?;
        Ok(())
    }
}

fn main() {}
