// A handler for a type the agent does not list in `receives` would never run: the runtime subscribes
// to, and dispatches, only the listed types, so every such message would be lost without a word.
use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Message)]
struct JoinLobby { player: String }

#[derive(Serialize, Deserialize, Message)]
struct LeaveLobby { player: String }

#[agent(receives = [JoinLobby])]
struct LobbyAgent;

impl Handle<JoinLobby> for LobbyAgent {
    async fn handle(&self, _message: JoinLobby, _ctx: &Context<Self>) -> HandlerResult {
        Ok(())
    }
}

impl Handle<LeaveLobby> for LobbyAgent {
    async fn handle(&self, _message: LeaveLobby, _ctx: &Context<Self>) -> HandlerResult {
        Ok(())
    }
}

fn main() {}
