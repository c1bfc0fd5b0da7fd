//! The handlers `Handle`'s bound on `receives` accepts: a type listed by one path and handled by another
//! (a full `crate::` path, a `use` under another name, a type alias), an agent declared in one module
//! and handled in another, and one handler generic over the message type, bounded by `Receives`. Each
//! compiles (this file fails to compile when the bound refuses one) and is called for its messages.
//! The refused handlers are in `tests/ui` (`handler_not_in_receives`, `generic_handler_without_bound`,
//! `receives_implemented_by_hand`).

use std::time::Duration;

use agentcomm_core::prelude::*;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(5);

mod msgs {
    use agentcomm_core::Message;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Serialize, Deserialize, Message)]
    pub struct Joined {
        pub player: String,
    }

    #[derive(Debug, Serialize, Deserialize, Message)]
    pub struct Moved {
        pub player: String,
    }

    pub mod nested {
        use agentcomm_core::Message;
        use serde::{Deserialize, Serialize};

        #[derive(Debug, Serialize, Deserialize, Message)]
        pub struct Left {
            pub player: String,
        }
    }
}

/// Declared here, with full paths and a renamed import; handled in `handlers`.
mod agents {
    use agentcomm_core::prelude::agent;
    use tokio::sync::mpsc;

    use crate::handlers::msgs::Moved as Relocated;

    #[agent(receives = [
        crate::handlers::msgs::Joined,
        crate::handlers::msgs::nested::Left,
        Relocated
    ])]
    pub struct Lobby {
        pub seen: mpsc::UnboundedSender<String>,
    }
}

mod handlers {
    use agentcomm_core::prelude::{Context, Handle, HandlerResult};

    use crate::handlers::agents::Lobby;
    use crate::handlers::msgs::{self, nested::Left};

    type MovedAlias = msgs::Moved;

    impl Handle<msgs::Joined> for Lobby {
        async fn handle(&self, joined: msgs::Joined, _ctx: &Context<Self>) -> HandlerResult {
            let _ = self.seen.send(format!("joined {}", joined.player));
            Ok(())
        }
    }

    impl Handle<Left> for Lobby {
        async fn handle(&self, left: Left, _ctx: &Context<Self>) -> HandlerResult {
            let _ = self.seen.send(format!("left {}", left.player));
            Ok(())
        }
    }

    impl Handle<MovedAlias> for crate::handlers::agents::Lobby {
        async fn handle(&self, moved: MovedAlias, _ctx: &Context<Self>) -> HandlerResult {
            let _ = self.seen.send(format!("moved {}", moved.player));
            Ok(())
        }
    }
}

/// One handler for every type it receives, which `Receives` bounds to exactly those.
#[agent(receives = [msgs::Joined, msgs::nested::Left])]
struct Auditor {
    seen: mpsc::UnboundedSender<String>,
}

impl<M: Message + std::fmt::Debug> Handle<M> for Auditor
where
    Self: Receives<M>,
{
    async fn handle(&self, message: M, _ctx: &Context<Self>) -> HandlerResult {
        let _ = self.seen.send(format!("{} {message:?}", M::CLASS));
        Ok(())
    }
}

#[agent(sends = [msgs::Joined, msgs::Moved, msgs::nested::Left])]
struct Door;

/// Compiles only when `A` receives `M`.
fn receives<A: Receives<M>, M: Message>() {}

async fn next(received: &mut mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(WAIT, received.recv())
        .await
        .expect("a handler ran within 5 s")
        .expect("the agent holds the sender")
}

#[test]
fn receives_holds_for_each_listed_type_whatever_the_path() {
    receives::<agents::Lobby, msgs::Joined>();
    receives::<agents::Lobby, msgs::nested::Left>();
    receives::<agents::Lobby, msgs::Moved>();
    receives::<Auditor, msgs::Joined>();
    receives::<Auditor, msgs::nested::Left>();
}

#[tokio::test]
async fn handlers_of_listed_types_are_called_whatever_the_path_or_module() {
    let runtime = Runtime::new(MemoryRouter::new());
    let (seen, mut received) = mpsc::unbounded_channel();
    runtime.spawn(agents::Lobby { seen }).await.unwrap();
    let door = runtime.publisher::<Door>();
    door.publish(
        "s1",
        msgs::Joined {
            player: "ann".into(),
        },
    )
    .await
    .unwrap();
    assert_eq!(next(&mut received).await, "joined ann");
    door.publish(
        "s1",
        msgs::nested::Left {
            player: "bob".into(),
        },
    )
    .await
    .unwrap();
    assert_eq!(next(&mut received).await, "left bob");
    door.publish(
        "s1",
        msgs::Moved {
            player: "cy".into(),
        },
    )
    .await
    .unwrap();
    assert_eq!(next(&mut received).await, "moved cy");
    runtime.shutdown(WAIT).await.unwrap();
}

#[tokio::test]
async fn a_handler_generic_over_the_message_type_is_called_for_each_received_type() {
    let runtime = Runtime::new(MemoryRouter::new());
    let (seen, mut received) = mpsc::unbounded_channel();
    runtime.spawn(Auditor { seen }).await.unwrap();
    let door = runtime.publisher::<Door>();
    door.publish(
        "s1",
        msgs::Joined {
            player: "ann".into(),
        },
    )
    .await
    .unwrap();
    assert_eq!(
        next(&mut received).await,
        r#"Joined Joined { player: "ann" }"#
    );
    door.publish(
        "s1",
        msgs::nested::Left {
            player: "bob".into(),
        },
    )
    .await
    .unwrap();
    assert_eq!(next(&mut received).await, r#"Left Left { player: "bob" }"#);
    runtime.shutdown(WAIT).await.unwrap();
}
