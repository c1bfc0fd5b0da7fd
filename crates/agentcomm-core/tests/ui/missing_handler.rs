use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Message)]
struct JoinLobby { player: String }

#[derive(Serialize, Deserialize, Message)]
struct LeaveLobby { player: String }

#[agent(receives = [JoinLobby, LeaveLobby])]
struct LobbyAgent;

impl Handle<JoinLobby> for LobbyAgent {
    async fn handle(&self, _message: JoinLobby, _ctx: &Context<Self>) -> HandlerResult {
        Ok(())
    }
}

fn main() {}
