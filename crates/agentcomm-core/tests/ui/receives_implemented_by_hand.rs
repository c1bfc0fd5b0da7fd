// `Receives` written by hand, to let through a handler for a type `receives` does not list, is refused
// like the handler itself: the runtime would still never subscribe to that type nor call the handler.
use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Message)]
struct JoinLobby { player: String }

#[derive(Serialize, Deserialize, Message)]
struct LeaveLobby { player: String }

#[agent(receives = [JoinLobby])]
struct LobbyAgent;

impl Receives<LeaveLobby> for LobbyAgent {}

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
