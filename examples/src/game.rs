//! A small multi-agent game: players join a lobby, the lobby pairs them, the matchmaker opens a match
//! and tells each player in their own session, players say they are ready, and the match starts.
//!
//! ```text
//! player-N --JoinLobby--> lobby --MatchRequest--> matchmaking --MatchFound--> player-N
//! player-N --PlayerReady--> matchmaking --GameStarted--> player-N
//! ```

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentcomm_core::prelude::*;
use agentcomm_core::router::SharedRouter;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// The lobby's session.
pub const LOBBY: &str = "lobby";
/// The matchmaker's session.
pub const MATCHMAKING: &str = "matchmaking";

/// A player asks to play.
#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(direction = "request")]
pub struct JoinLobby {
    /// The player's name, which is also their session.
    #[message(non_empty)]
    pub player: String,
}

/// The lobby asks the matchmaker to open a match for these players.
#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(direction = "request")]
pub struct MatchRequest {
    /// Who plays.
    pub players: Vec<String>,
}

/// The matchmaker tells a player their match.
#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(direction = "event")]
pub struct MatchFound {
    /// The match.
    pub match_id: String,
    /// Everyone in it.
    pub players: Vec<String>,
}

/// A player is ready to start.
#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(direction = "event")]
pub struct PlayerReady {
    /// Who.
    pub player: String,
    /// For which match.
    pub match_id: String,
}

/// Everyone is ready: the match begins.
#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(direction = "event")]
pub struct GameStarted {
    /// The match.
    pub match_id: String,
    /// Who moves first.
    pub first_player: String,
}

/// Pairs waiting players.
#[agent(receives = [JoinLobby], sends = [MatchRequest])]
#[derive(Debug, Default)]
pub struct LobbyAgent {
    waiting: Mutex<Vec<String>>,
}

impl Handle<JoinLobby> for LobbyAgent {
    async fn handle(&self, join: JoinLobby, ctx: &Context<Self>) -> HandlerResult {
        let pair = {
            let mut waiting = self.waiting.lock().expect("lobby lock");
            if waiting.contains(&join.player) {
                None
            } else {
                waiting.push(join.player);
                (waiting.len() >= 2).then(|| waiting.drain(..2).collect::<Vec<_>>())
            }
        };
        if let Some(players) = pair {
            ctx.send_to(MATCHMAKING, MatchRequest { players }).await?;
        }
        Ok(())
    }
}

/// A match waiting for its players: who plays, and who is ready.
#[derive(Debug, Default)]
struct OpenMatch {
    players: Vec<String>,
    ready: Vec<String>,
}

/// Opens matches and starts them when every player is ready.
#[agent(receives = [MatchRequest, PlayerReady], sends = [MatchFound, GameStarted])]
#[derive(Debug, Default)]
pub struct MatchmakerAgent {
    matches: Mutex<HashMap<String, OpenMatch>>,
    opened: std::sync::atomic::AtomicU64,
}

impl Handle<MatchRequest> for MatchmakerAgent {
    async fn handle(&self, request: MatchRequest, ctx: &Context<Self>) -> HandlerResult {
        let number = self
            .opened
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let match_id = format!("match-{number}");
        self.matches.lock().expect("matchmaker lock").insert(
            match_id.clone(),
            OpenMatch {
                players: request.players.clone(),
                ready: Vec::new(),
            },
        );
        for player in &request.players {
            let found = MatchFound {
                match_id: match_id.clone(),
                players: request.players.clone(),
            };
            ctx.send_to(player, found).await?;
        }
        Ok(())
    }
}

impl Handle<PlayerReady> for MatchmakerAgent {
    async fn handle(&self, ready: PlayerReady, ctx: &Context<Self>) -> HandlerResult {
        let start = {
            let mut matches = self.matches.lock().expect("matchmaker lock");
            let Some(open) = matches.get_mut(&ready.match_id) else {
                return Err(HandlerError::permanent(format!(
                    "no match {}",
                    ready.match_id
                )));
            };
            if !open.ready.contains(&ready.player) {
                open.ready.push(ready.player);
            }
            (open.ready.len() == open.players.len()).then(|| open.players.clone())
        };
        if let Some(players) = start {
            for player in &players {
                let started = GameStarted {
                    match_id: ready.match_id.clone(),
                    first_player: players[0].clone(),
                };
                ctx.send_to(player, started).await?;
            }
        }
        Ok(())
    }
}

/// What the players saw, shared with the caller.
#[derive(Debug, Default)]
pub struct Scoreboard {
    /// Lines of what happened, in order.
    pub events: Mutex<Vec<String>>,
    /// `(player, match)` for every player whose game started.
    pub started: Mutex<Vec<(String, String)>>,
    changed: Notify,
}

/// One player, listening to its own session only.
#[agent(receives = [MatchFound, GameStarted], sends = [JoinLobby, PlayerReady])]
#[derive(Debug)]
pub struct PlayerAgent {
    name: String,
    scoreboard: Arc<Scoreboard>,
}

impl Handle<MatchFound> for PlayerAgent {
    async fn handle(&self, found: MatchFound, ctx: &Context<Self>) -> HandlerResult {
        self.scoreboard
            .events
            .lock()
            .expect("scoreboard lock")
            .push(format!(
                "{} found {} with {}",
                self.name,
                found.match_id,
                found.players.join(" and ")
            ));
        ctx.send_to(
            MATCHMAKING,
            PlayerReady {
                player: self.name.clone(),
                match_id: found.match_id,
            },
        )
        .await?;
        Ok(())
    }
}

impl Handle<GameStarted> for PlayerAgent {
    async fn handle(&self, started: GameStarted, _ctx: &Context<Self>) -> HandlerResult {
        self.scoreboard
            .events
            .lock()
            .expect("scoreboard lock")
            .push(format!(
                "{} starts {} ({} moves first)",
                self.name, started.match_id, started.first_player
            ));
        self.scoreboard
            .started
            .lock()
            .expect("scoreboard lock")
            .push((self.name.clone(), started.match_id));
        self.scoreboard.changed.notify_waiters();
        Ok(())
    }
}

/// Runs the game with `players` players (an even number) on `router`, printing to `out`.
pub async fn run(
    router: SharedRouter,
    players: usize,
    out: &mut (dyn Write + Send),
) -> Result<Arc<Scoreboard>> {
    let backend = router.backend().to_string();
    let options = crate::backend::options_for(&router);
    let runtime = Runtime::builder_shared(router).build();
    // The lobby and the matchmaker listen to their own sessions; each player to its own.
    runtime
        .spawn_with(LobbyAgent::default(), options.clone().session(LOBBY))
        .await?;
    runtime
        .spawn_with(
            MatchmakerAgent::default(),
            options.clone().session(MATCHMAKING),
        )
        .await?;
    let scoreboard = Arc::new(Scoreboard::default());
    let names: Vec<String> = (1..=players).map(|n| format!("player-{n}")).collect();
    for name in &names {
        let player = PlayerAgent {
            name: name.clone(),
            scoreboard: scoreboard.clone(),
        };
        runtime
            .spawn_with(player, options.clone().session(name.as_str()))
            .await?;
    }
    writeln!(
        out,
        "agentcomm game example on the {backend} router: {players} players"
    )
    .ok();

    let joins = runtime.publisher::<PlayerAgent>();
    for name in &names {
        joins
            .publish(
                LOBBY,
                JoinLobby {
                    player: name.clone(),
                },
            )
            .await?;
    }

    let everyone_started = async {
        loop {
            let notified = scoreboard.changed.notified();
            if scoreboard.started.lock().expect("scoreboard lock").len() >= players {
                return;
            }
            notified.await;
        }
    };
    let finished = tokio::time::timeout(Duration::from_secs(20), everyone_started).await;
    for line in scoreboard.events.lock().expect("scoreboard lock").iter() {
        writeln!(out, "  {line}").ok();
    }
    runtime.shutdown(Duration::from_secs(5)).await?;
    if finished.is_err() {
        return Err(Error::Timeout {
            operation: format!("all {players} players to start their games"),
            after: Duration::from_secs(20),
        });
    }
    writeln!(out, "all {players} players are playing").ok();
    Ok(scoreboard)
}
