//! The macros' generated code works wherever users write them: with the prelude's names (`Result`,
//! `Option`, `Some`, `Ok`, `Box`, `Vec`, ...) shadowed by the user's own, next to a module named
//! `diagnostic`, in a `#[no_implicit_prelude]` module, inside `macro_rules!` macros
//! that pass the types and fields in as arguments, next to lowercase constants named like the variables
//! they declare, where lints are forbidden, and with agentcomm-core under another name
//! (`crate = path`). (This file fails to compile, rather than fail at run time, when that breaks.)

use std::time::Duration;

use agentcomm_core::prelude::{Context, Handle, HandlerResult, MemoryRouter, Runtime, agent};
use agentcomm_core::{Error, Message};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Names the generated code must not pick up from the caller's scope.
#[allow(dead_code)]
mod shadowing {
    pub struct Result;
    pub struct Option;
    pub struct Some;
    pub struct None;
    pub struct Ok;
    pub struct Err;
    pub struct Box;
    pub struct Vec;
    pub struct ChannelPattern;
}
#[allow(unused_imports)]
use shadowing::*;

/// A module of the user's named like the `diagnostic::` attribute namespace.
#[allow(dead_code)]
mod diagnostic {
    pub fn report() {}
}

/// A module without any prelude: the generated code must name everything it uses from a crate root.
#[no_implicit_prelude]
#[allow(dead_code)]
mod without_prelude {
    #[derive(Debug, ::serde::Serialize, ::serde::Deserialize, ::agentcomm_core::Message)]
    #[message(direction = "request", validate = Self::check)]
    pub struct Bare {
        #[message(non_empty)]
        pub name: ::std::string::String,
        #[message(min = 1)]
        pub count: u32,
    }

    impl Bare {
        fn check(&self) -> ::std::result::Result<(), ::agentcomm_core::ValidationError> {
            ::std::result::Result::Ok(())
        }
    }

    /// A second type, so that the agent's check of its received and sent classes is generated here.
    #[derive(Debug, ::serde::Serialize, ::serde::Deserialize, ::agentcomm_core::Message)]
    pub struct BareNote {
        pub text: ::std::string::String,
    }

    #[::agentcomm_core::agent(receives = [Bare], sends = [Bare, BareNote])]
    pub struct BareAgent;

    impl ::agentcomm_core::Handle<Bare> for BareAgent {
        async fn handle(
            &self,
            _bare: Bare,
            _ctx: &::agentcomm_core::Context<Self>,
        ) -> ::agentcomm_core::HandlerResult {
            ::std::result::Result::Ok(())
        }
    }
}

/// Lowercase constants and statics named like every variable the macros declare (the names they used
/// to declare, and the ones they declare now): a `let` or a parameter of such a name would be a pattern
/// matching the constant, and the expansion would not compile.
#[allow(dead_code, non_upper_case_globals)]
mod constants {
    use agentcomm_core::prelude::{Context, Handle, HandlerResult, agent};
    use serde::{Deserialize, Serialize};

    const session: u8 = 0;
    const ctx: u8 = 0;
    static class: u8 = 0;
    const message: u8 = 0;
    static check: u8 = 0;
    const value: u8 = 0;
    const __agentcomm_session: u8 = 0;
    const __agentcomm_ctx: u8 = 0;
    static __agentcomm_class: u8 = 0;
    const __agentcomm_message: u8 = 0;
    static __agentcomm_check: u8 = 0;
    const __agentcomm_value: u8 = 0;

    #[derive(Debug, Clone, Serialize, Deserialize, agentcomm_core::Message)]
    #[message(direction = "request", validate = Self::valid)]
    pub struct Guarded {
        #[message(non_empty)]
        pub name: String,
        #[message(min = 1, max = 10)]
        pub count: u32,
    }

    impl Guarded {
        fn valid(&self) -> ::std::result::Result<(), agentcomm_core::ValidationError> {
            ::std::result::Result::Ok(())
        }
    }

    #[agent(receives = [Guarded], sends = [Guarded])]
    pub struct GuardedAgent;

    impl Handle<Guarded> for GuardedAgent {
        async fn handle(&self, guarded: Guarded, context: &Context<Self>) -> HandlerResult {
            context.reply(guarded).await?;
            ::std::result::Result::Ok(())
        }
    }
}

/// Code whose lint levels are forbidden from being lowered (`forbid`, which no `allow` may override,
/// not even one the macros generate): the expansion must not need any.
#[forbid(dead_code, non_snake_case)]
mod forbidding {
    use agentcomm_core::prelude::{Context, Handle, HandlerResult, agent};

    #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, agentcomm_core::Message)]
    #[message(direction = "request", validate = Self::valid)]
    pub struct Strict {
        #[message(non_empty)]
        pub name: String,
    }

    impl Strict {
        fn valid(&self) -> ::std::result::Result<(), agentcomm_core::ValidationError> {
            ::std::result::Result::Ok(())
        }
    }

    #[agent(receives = [Strict], sends = [Strict])]
    pub struct StrictAgent;

    impl Handle<Strict> for StrictAgent {
        async fn handle(&self, strict: Strict, context: &Context<Self>) -> HandlerResult {
            context.reply(strict).await?;
            ::std::result::Result::Ok(())
        }
    }
}

const WAIT: Duration = Duration::from_secs(5);

/// A message type whose name and ruled field come from a macro's arguments.
macro_rules! ruled_message {
    ($name:ident { $field:ident : $ty:ty }) => {
        #[derive(Debug, Clone, Serialize, Deserialize, agentcomm_core::Message)]
        #[message(validate = $name::check)]
        struct $name {
            #[message(non_empty)]
            $field: $ty,
        }

        impl $name {
            fn check(&self) -> ::std::result::Result<(), agentcomm_core::ValidationError> {
                if self.$field.len() > 8 {
                    return ::std::result::Result::Err(agentcomm_core::ValidationError::new(
                        stringify!($field),
                        "short",
                    ));
                }
                ::std::result::Result::Ok(())
            }
        }
    };
}

ruled_message!(Label { text: String });

/// An agent whose name and received type come from a macro's arguments (as plain identifiers, the
/// way a macro that generates many agents passes them).
macro_rules! forwarding_agent {
    ($agent:ident receives $message:ident) => {
        #[agent(receives = [$message])]
        struct $agent {
            seen: mpsc::UnboundedSender<String>,
        }

        impl Handle<$message> for $agent {
            async fn handle(&self, message: $message, _ctx: &Context<Self>) -> HandlerResult {
                let _ = self.seen.send(message.text);
                ::std::result::Result::Ok(())
            }
        }
    };
}

forwarding_agent!(LabelAgent receives Label);

#[agent(sends = [Label])]
struct Labeller;

/// agentcomm-core under another name, as a crate that renames the dependency in its Cargo.toml
/// (`comm = { package = "agentcomm-core", .. }`) sees it; both spellings of the key.
mod renamed {
    use ::agentcomm_core as comm;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Serialize, Deserialize, comm::Message)]
    #[message(crate = comm, direction = "request")]
    pub struct Order {
        #[message(min = 1)]
        pub quantity: u32,
    }

    #[comm::agent(crate = "comm", receives = [Order], sends = [Order])]
    pub struct OrderDesk;

    impl comm::Handle<Order> for OrderDesk {
        async fn handle(&self, order: Order, ctx: &comm::Context<Self>) -> comm::HandlerResult {
            ctx.reply(order).await?;
            ::std::result::Result::Ok(())
        }
    }
}

#[tokio::test]
async fn macros_work_with_agentcomm_core_under_another_name() {
    use renamed::{Order, OrderDesk};
    assert_eq!(<OrderDesk as agentcomm_core::Agent>::RECEIVES, ["Order"]);
    assert_eq!(Order { quantity: 0 }.validate().unwrap_err().rule(), "min");
    let runtime = Runtime::new(MemoryRouter::new());
    runtime.spawn(OrderDesk).await.unwrap();
    let answer: Order = tokio::time::timeout(
        WAIT,
        runtime
            .publisher::<OrderDesk>()
            .request("s1", Order { quantity: 3 }),
    )
    .await
    .expect("answered within 5 s")
    .unwrap();
    assert_eq!(answer.quantity, 3);
    runtime.shutdown(WAIT).await.unwrap();
}

#[tokio::test]
async fn macros_work_inside_macro_rules_and_with_shadowed_prelude_names() {
    assert_eq!(<Label as agentcomm_core::Message>::CLASS, "Label");
    assert_eq!(
        <without_prelude::BareAgent as agentcomm_core::Agent>::SENDS,
        ["Bare", "BareNote"]
    );
    let empty = Label { text: " ".into() };
    let long = Label {
        text: "far too long".into(),
    };
    let rules = [empty, long].map(|label| label.validate().unwrap_err().rule().to_string());
    assert_eq!(rules, ["non_empty", "short"]);

    let runtime = Runtime::new(MemoryRouter::new());
    let (seen, mut received) = mpsc::unbounded_channel();
    runtime.spawn(LabelAgent { seen }).await.unwrap();
    let publisher = runtime.publisher::<Labeller>();
    let refused = publisher
        .publish("s1", Label { text: "".into() })
        .await
        .unwrap_err();
    assert!(matches!(refused, Error::Validation { .. }), "{refused:?}");
    publisher
        .publish("s1", Label { text: "ok".into() })
        .await
        .unwrap();
    let text = tokio::time::timeout(WAIT, received.recv())
        .await
        .expect("the agent handled the label within 5 s");
    assert_eq!(text.as_deref(), ::std::option::Option::Some("ok"));
    runtime.shutdown(WAIT).await.unwrap();
}

#[tokio::test]
async fn macros_work_next_to_constants_named_like_their_variables() {
    use constants::{Guarded, GuardedAgent};
    let invalid = Guarded {
        name: "n".into(),
        count: 0,
    };
    assert_eq!(invalid.validate().unwrap_err().rule(), "min");
    let runtime = Runtime::new(MemoryRouter::new());
    runtime.spawn(GuardedAgent).await.unwrap();
    let answer: Guarded = tokio::time::timeout(
        WAIT,
        runtime.publisher::<GuardedAgent>().request(
            "s1",
            Guarded {
                name: "n".into(),
                count: 3,
            },
        ),
    )
    .await
    .expect("answered within 5 s")
    .unwrap();
    assert_eq!(answer.count, 3);
    runtime.shutdown(WAIT).await.unwrap();
}

#[tokio::test]
async fn macros_work_where_lints_are_forbidden() {
    use forbidding::{Strict, StrictAgent};
    let runtime = Runtime::new(MemoryRouter::new());
    runtime.spawn(StrictAgent).await.unwrap();
    let answer: Strict = tokio::time::timeout(
        WAIT,
        runtime
            .publisher::<StrictAgent>()
            .request("s1", Strict { name: "n".into() }),
    )
    .await
    .expect("answered within 5 s")
    .unwrap();
    assert_eq!(answer.name, "n");
    runtime.shutdown(WAIT).await.unwrap();
}
