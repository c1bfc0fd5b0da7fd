use agentcomm_core::prelude::*;

mod lobby {
    use agentcomm_core::prelude::*;
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize, Message)]
    pub struct Join { pub player: String }
}
use lobby::Join;

#[agent(receives = [Join, lobby::Join])]
struct LobbyAgent;

impl Handle<Join> for LobbyAgent {
    async fn handle(&self, _message: Join, _ctx: &Context<Self>) -> HandlerResult {
        Ok(())
    }
}

fn main() {}
