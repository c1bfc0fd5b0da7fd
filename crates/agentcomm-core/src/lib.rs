//! # agentcomm-core
//!
//! Typed, reliable messaging between agents. Derive [`Message`] on your message types, declare each
//! agent with the messages it receives and sends (`#[agent(receives = [..], sends = [..])]`), run the
//! agents on a [`Runtime`] over a router — [`MemoryRouter`] here, Redis or RabbitMQ from their own
//! crates — and the compiler refuses an agent that sends what it did not declare.
//!
//! ```
//! use std::time::Duration;
//! use agentcomm_core::prelude::*;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Serialize, Deserialize, Message)]
//! #[message(direction = "request")]
//! struct PaymentRequest { amount: f64, user_id: String }
//!
//! #[derive(Debug, Serialize, Deserialize, Message)]
//! #[message(direction = "response")]
//! struct PaymentResponse { success: bool, transaction_id: String }
//!
//! #[agent(receives = [PaymentRequest], sends = [PaymentResponse])]
//! struct PaymentAgent;
//!
//! impl Handle<PaymentRequest> for PaymentAgent {
//!     async fn handle(&self, request: PaymentRequest, ctx: &Context<Self>) -> HandlerResult {
//!         let transaction_id = format!("TXN-{}", ctx.message_id());
//!         ctx.reply(PaymentResponse { success: request.amount > 0.0, transaction_id }).await?;
//!         Ok(())
//!     }
//! }
//!
//! #[agent(sends = [PaymentRequest])]
//! struct PaymentClient;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> agentcomm_core::Result<()> {
//! let runtime = Runtime::new(MemoryRouter::new());
//! runtime.spawn(PaymentAgent).await?;
//! let client = runtime.publisher::<PaymentClient>();
//! let response: PaymentResponse = client
//!     .request("session456", PaymentRequest { amount: 100.0, user_id: "user123".into() })
//!     .await?;
//! assert!(response.success);
//! runtime.shutdown(Duration::from_secs(5)).await?;
//! # Ok(())
//! # }
//! ```
//!
//! The modules follow the concepts: [`message`], [`channel`], [`envelope`], [`codec`], [`router`] (the
//! contract backends implement), [`memory`], [`agent`](mod@agent), [`runtime`], [`bus`], [`logging`], [`config`],
//! [`error`].

#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

// Lets the derive macros' `::agentcomm_core::...` paths resolve inside this crate's own tests.
#[allow(unused_extern_crates)]
extern crate self as agentcomm_core;

pub mod agent;
pub mod backoff;
pub mod bus;
pub mod channel;
pub mod codec;
pub mod config;
pub mod envelope;
pub mod error;
mod frame_msgpack;
pub mod logging;
pub mod memory;
pub mod message;
pub mod router;
pub mod runtime;

pub use agent::{Agent, Context, Handle, HandlerError, HandlerResult, Publisher, Receives, Sends};
pub use bus::Bus;
pub use channel::{Channel, ChannelPattern, parse_channel};
pub use codec::Codec;
pub use envelope::{Envelope, MessageId};
pub use error::{Error, RequestFailure, Result};
pub use memory::MemoryRouter;
pub use message::{Message, ValidationError};
pub use router::{Capabilities, Router};
pub use runtime::{AgentHandle, AgentOptions, Runtime};

/// `#[derive(Message)]`: see [`message`].
#[cfg(feature = "derive")]
pub use agentcomm_derive::Message;
/// `#[agent(receives = [..], sends = [..])]`: see [`agent`](mod@agent).
#[cfg(feature = "derive")]
pub use agentcomm_derive::agent;

/// What most users need, in one import: `use agentcomm_core::prelude::*;`.
pub mod prelude {
    pub use crate::agent::{
        Agent, Context, Handle, HandlerError, HandlerResult, Publisher, Receives, Sends,
    };
    pub use crate::channel::{Channel, ChannelPattern, parse_channel};
    pub use crate::codec::Codec;
    pub use crate::envelope::Envelope;
    pub use crate::error::{Error, Result};
    pub use crate::memory::MemoryRouter;
    pub use crate::message::{Message, ValidationError};
    pub use crate::router::Router;
    pub use crate::runtime::{AgentOptions, Runtime};
    #[cfg(feature = "derive")]
    pub use agentcomm_derive::{Message, agent};
}

/// Paths the derive macros generate code against. Not public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::agent::{Agent, Context, Handle, HandlerResult, Rejection, Sends};
    pub use crate::channel::{ChannelPattern, ChannelTemplate, TemplatePart};
    pub use crate::error::Result;
    pub use crate::message::{Message, ValidationError, rules};
    pub use crate::router::BoxFuture;
    pub use crate::runtime::decode_message;
    pub use std::boxed::Box;
    pub use std::option::Option::{self, None, Some};
    pub use std::result::Result::{Err, Ok};
    pub use std::vec::Vec;

    /// The error of a delivered class the agent does not declare.
    pub fn undeclared(agent: &'static str, class: &str) -> Rejection {
        Rejection {
            reason: crate::envelope::headers::REASON_UNDECLARED_CLASS,
            error: crate::error::Error::MessageClassNotRegistered {
                class: class.to_string(),
                registry: format!("agent '{agent}' (it does not declare this class in `receives`)"),
            },
        }
    }

    /// A message type no value can have: every agent "sends" it so that `Sends` never has a single impl
    /// (see the impls below).
    #[derive(Debug, serde::Serialize, serde::Deserialize)]
    pub enum NeverSent {}

    impl Message for NeverSent {
        const CLASS: &'static str = "agentcomm.NeverSent";
    }

    /// The second of the two (one would again be a single impl when `sends` is empty).
    #[derive(Debug, serde::Serialize, serde::Deserialize)]
    pub enum NeverSentEither {}

    impl Message for NeverSentEither {
        const CLASS: &'static str = "agentcomm.NeverSentEither";
    }

    // Two impls that can never be used keep `Sends` from having a single impl for an agent, from which
    // the compiler would infer the message type of `ctx.publish(..)` and report "mismatched types"
    // instead of "agent `X` does not declare that it sends `Y`". They are blanket impls here rather
    // than impls the agent macro writes next to each agent: the `diagnostic::` attribute they carry
    // would there resolve in the user's module, where a module of their own named `diagnostic` (or
    // `#[no_implicit_prelude]`) breaks it.
    #[diagnostic::do_not_recommend]
    impl<A: Agent> Sends<NeverSent> for A {}

    #[diagnostic::do_not_recommend]
    impl<A: Agent> Sends<NeverSentEither> for A {}

    #[diagnostic::do_not_recommend]
    impl<A: Agent> ListedInSends<NeverSent> for A {}

    #[diagnostic::do_not_recommend]
    impl<A: Agent> ListedInSends<NeverSentEither> for A {}

    /// Marks that agent `Self` lists `M` in `sends`: implemented once per listed type by
    /// `#[agent(...)]`, and required by [`Sends`], so that `impl Sends<M> for MyAgent {}` written by
    /// hand, which would let the agent send a type its declaration and its `SENDS` do not name, does
    /// not compile.
    #[diagnostic::on_unimplemented(
        message = "`Sends<{M}>` is implemented by `#[agent(sends = [..])]` only, not by hand",
        label = "`{M}` is not in the `sends` list of `{Self}`",
        note = "remove the `impl Sends<{M}> for {Self}` and add `{M}` to the agent's declaration: `#[agent(sends = [..., {M}])]` on `{Self}`"
    )]
    pub trait ListedInSends<M: ?Sized> {}

    /// Marks that agent `Self` lists `M` in `receives`: implemented once per listed type by
    /// `#[agent(...)]`, so that one type listed twice through two paths (`[Ping, msgs::Ping]`) is a
    /// compile error (conflicting implementations) rather than a refused spawn; and required by
    /// [`Receives`](crate::Receives), which [`Handle`] requires, so that a handler for a type the
    /// agent does not list, which the runtime would never subscribe to nor call, does not compile
    /// (nor does an `impl Receives<M>` written by hand to let one through). Its message is the one
    /// users see in both cases: the compiler reports the innermost unmet bound.
    #[diagnostic::on_unimplemented(
        message = "agent `{Self}` does not receive `{M}`: a handler for it would never run",
        label = "`{M}` is not in the `receives` list of `{Self}`",
        note = "add `{M}` to the agent's declaration: `#[agent(receives = [..., {M}])]` on `{Self}` (the runtime subscribes to and dispatches only the types listed there), or remove the handler",
        note = "a handler generic over the message type needs the bound `where Self: Receives<M>`"
    )]
    pub trait ListedInReceives<M: ?Sized> {}

    /// Whether two class names are one (`==` on `str` is not `const`).
    pub const fn same_class(a: &str, b: &str) -> bool {
        let (a, b) = (a.as_bytes(), b.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        let mut index = 0;
        while index < a.len() {
            if a[index] != b[index] {
                return false;
            }
            index += 1;
        }
        true
    }

    /// Fails to compile unless `M` is a message.
    pub const fn assert_message<M: Message>() {}

    /// Fails to compile unless `A` handles `M`.
    pub const fn assert_handles<A: Handle<M>, M: Message>() {}
}

/// The README's Rust examples compile and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
mod readme {}
