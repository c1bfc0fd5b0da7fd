//! Agents: the long-running parts of a system, with declared contracts.
//!
//! `#[agent(receives = [A, B], sends = [C])]` on a struct implements [`Agent`], [`Receives<A>`] and
//! [`Sends<C>`]; each received type needs an `impl Handle<A> for TheAgent`. Sending a type that is not
//! declared, receiving one without a handler, or handling one that is not received (the runtime
//! subscribes to and dispatches only the types in `receives`, so that handler would never run) does
//! not compile:
//!
//! ```
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
//!         ctx.reply(PaymentResponse { success: request.amount > 0.0, transaction_id: "TXN1".into() }).await?;
//!         Ok(())
//!     }
//! }
//!
//! assert_eq!(PaymentAgent::RECEIVES, &["PaymentRequest"]);
//! assert_eq!(PaymentAgent::SENDS, &["PaymentResponse"]);
//! ```

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::__private::{ListedInReceives, ListedInSends};
use crate::bus::{Bus, channel_of};
use crate::channel::{Channel, ChannelPattern, ChannelTemplate, RESPONSE_DIRECTION, parse_channel};
use crate::envelope::{Envelope, MessageId};
use crate::error::{Error, Result};
use crate::message::Message;
use crate::router::{BoxFuture, PublishOutcome};

/// An agent: a declared set of received and sent message types. Implemented by `#[agent(...)]`.
pub trait Agent: Send + Sync + Sized + 'static {
    /// The agent's name, used as its default group and in logs.
    const NAME: &'static str;
    /// The classes it receives.
    const RECEIVES: &'static [&'static str];
    /// The classes it sends.
    const SENDS: &'static [&'static str];
    /// The channel templates of the types it sends, in the order of [`Agent::SENDS`] (the default
    /// template for a class without one here). Generated; not for direct use.
    #[doc(hidden)]
    const __SENDS_TEMPLATES: &'static [ChannelTemplate] = &[];

    /// The patterns the agent subscribes to, for one session or all. Generated; not for direct use.
    #[doc(hidden)]
    fn __receive_patterns(session: Option<&str>) -> Result<Vec<ChannelPattern>>;

    /// Decodes the envelope in `ctx` as the declared type of its class and starts its handler.
    /// Generated; not for direct use.
    #[doc(hidden)]
    fn __dispatch<'a>(
        &'a self,
        ctx: &'a Context<Self>,
    ) -> Result<BoxFuture<'a, HandlerResult>, Rejection>;
}

/// Marks that agent `Self` declares it sends `M`. Implemented by `#[agent(sends = [...])]` only: an
/// impl written by hand does not compile, so that the declaration (and the agent's [`Agent::SENDS`],
/// which the runtime reads) stays the one list of what the agent sends.
#[diagnostic::on_unimplemented(
    message = "agent `{Self}` does not declare that it sends `{M}`",
    label = "`{M}` is not in the `sends` list of `{Self}`",
    note = "add it to the agent's declaration: `#[agent(sends = [..., {M}])]` on `{Self}`"
)]
pub trait Sends<M: Message>: Agent + ListedInSends<M> {}

/// Holds when agent `Self` lists `M` in `receives`: a bound for code generic over the message type,
/// such as one handler for several received types:
///
/// ```
/// use agentcomm_core::prelude::*;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Serialize, Deserialize, Message)]
/// struct Joined { player: String }
///
/// #[derive(Debug, Serialize, Deserialize, Message)]
/// struct Left { player: String }
///
/// #[agent(receives = [Joined, Left])]
/// struct Auditor;
///
/// impl<M: Message + std::fmt::Debug> Handle<M> for Auditor
/// where
///     Self: Receives<M>,
/// {
///     async fn handle(&self, message: M, _ctx: &Context<Self>) -> HandlerResult {
///         println!("{message:?}");
///         Ok(())
///     }
/// }
/// ```
///
/// It follows from the declaration alone (`#[agent(receives = [..])]` implements the hidden marker it
/// stands for), so it cannot be implemented by hand, and a handler generic over `M` without the bound
/// does not compile: it would claim types the runtime never subscribes to.
pub trait Receives<M: Message>: Agent + ListedInReceives<M> {}

impl<A: Agent + ListedInReceives<M>, M: Message> Receives<M> for A {}

/// Handles one received message type. Implement it for every type in `receives`, and only for those:
/// the runtime subscribes to, and dispatches, the listed types alone, so an `impl Handle<M>` for a type
/// the agent does not list would never run; it does not compile.
#[diagnostic::on_unimplemented(
    message = "agent `{Self}` receives `{M}` but has no handler for it",
    label = "`{Self}` has no `impl Handle<{M}>`",
    note = "add `impl Handle<{M}> for {Self} {{ async fn handle(&self, message: {M}, ctx: &Context<Self>) -> HandlerResult {{ .. }} }}`, or remove `{M}` from `receives`"
)]
pub trait Handle<M: Message>: Agent + Receives<M> {
    /// Handles one message. `Ok` acknowledges it; an error retries it with backoff up to the agent's
    /// maximum attempts, then dead-letters it ([`HandlerError::permanent`] dead-letters at once).
    fn handle(&self, message: M, ctx: &Context<Self>)
    -> impl Future<Output = HandlerResult> + Send;
}

/// What a handler returns.
pub type HandlerResult = std::result::Result<(), HandlerError>;

/// A handler's failure: any error, and whether retrying could help.
///
/// `?` converts any `std::error::Error` into it as a transient failure, retried; except agentcomm's own
/// errors about what this handler sends that it can only meet again (an invalid channel, a message
/// that cannot be encoded), which are permanent: dead-lettered at once as `rejected`. The runtime also
/// dead-letters at once a failure that is `Context::reply`'s [`Error::UnexpectedReply`] (a reply of
/// another class than the request's `reply_to` names); its requester is told ([`Error::RequestFailed`])
/// only if this agent also sends the class it waits for, as for any dead-lettered request (otherwise
/// another agent type receiving the request may answer it). (A
/// validation error stays transient: it may come from a reply another service sent, which may mend.)
pub struct HandlerError {
    error: Box<dyn std::error::Error + Send + Sync>,
    permanent: bool,
}

impl HandlerError {
    /// A transient failure with a message: the message is retried.
    pub fn msg(message: impl fmt::Display) -> Self {
        HandlerError {
            error: message.to_string().into(),
            permanent: false,
        }
    }

    /// A failure that retrying cannot fix: the message is dead-lettered at once.
    pub fn permanent(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        HandlerError {
            error: error.into(),
            permanent: true,
        }
    }

    /// Whether the failure is permanent.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }

    /// The underlying error.
    pub fn error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.error
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(error: E) -> Self {
        let permanent = (&error as &dyn std::any::Any)
            .downcast_ref::<Error>()
            .is_some_and(|error| {
                matches!(
                    error,
                    Error::InvalidChannelFormat { .. }
                        | Error::InvalidChannelComponent { .. }
                        | Error::Codec {
                            operation: "encode",
                            ..
                        }
                )
            });
        HandlerError {
            error: Box::new(error),
            permanent,
        }
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("error", &self.error)
            .field("permanent", &self.permanent)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)?;
        let mut source = self.error.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

/// Why a delivery was refused before any handler ran: it is dead-lettered at once, never retried.
#[derive(Debug)]
pub struct Rejection {
    /// One of the `REASON_*` values of [`crate::envelope::headers`].
    pub reason: &'static str,
    /// What went wrong.
    pub error: Error,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.error)
    }
}

/// What a handler gets besides the message: where it came from, and how to publish, send and reply
/// within the agent's declared contract.
pub struct Context<A: Agent> {
    envelope: Envelope,
    bus: Bus,
    /// Whether a reply to the message's `reply_to` was published.
    replied: AtomicBool,
    _agent: PhantomData<fn() -> A>,
}

impl<A: Agent> Context<A> {
    pub(crate) fn new(envelope: Envelope, bus: Bus) -> Self {
        Context {
            envelope,
            bus,
            replied: AtomicBool::new(false),
            _agent: PhantomData,
        }
    }

    /// Whether [`Context::reply`] published a reply to the request's `reply_to`.
    pub(crate) fn replied(&self) -> bool {
        self.replied.load(Ordering::Relaxed)
    }

    /// Gives the envelope back (the runtime lends it to the handler's context for the call).
    pub(crate) fn into_envelope(self) -> Envelope {
        self.envelope
    }

    /// The envelope of the message being handled.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// The session of the message being handled.
    pub fn session(&self) -> &str {
        self.envelope.session()
    }

    /// The id of the message being handled.
    pub fn message_id(&self) -> MessageId {
        self.envelope.id()
    }

    /// Which delivery attempt this is, from 1.
    pub fn attempt(&self) -> u32 {
        self.envelope.attempt()
    }

    /// The name of the agent.
    pub fn agent(&self) -> &'static str {
        A::NAME
    }

    fn correlation(&self) -> String {
        self.envelope
            .correlation_id()
            .map(str::to_string)
            .unwrap_or_else(|| self.envelope.id().to_string())
    }

    // The public methods below check the contract in their bounds and return the boxed future of an
    // unbounded private method: with `async fn` (or `impl Future`) the compiler would report a missing
    // `Sends` three times per call (argument, call, await) instead of once.

    /// Publishes `message` to the current session, in `M`'s default direction.
    pub fn publish<M: Message>(&self, message: M) -> BoxFuture<'_, Result<PublishOutcome>>
    where
        A: Sends<M>,
    {
        Box::pin(self.publish_unchecked(M::DIRECTION, self.session().to_string(), message))
    }

    /// Sends `message` to another session, in `M`'s default direction.
    pub fn send_to<M: Message>(
        &self,
        session: &str,
        message: M,
    ) -> BoxFuture<'_, Result<PublishOutcome>>
    where
        A: Sends<M>,
    {
        Box::pin(self.publish_unchecked(M::DIRECTION, session.to_string(), message))
    }

    /// Publishes `message` with an explicit direction and session.
    pub fn publish_to<'a, M: Message>(
        &'a self,
        direction: &'a str,
        session: &str,
        message: M,
    ) -> BoxFuture<'a, Result<PublishOutcome>>
    where
        A: Sends<M>,
    {
        Box::pin(self.publish_unchecked(direction, session.to_string(), message))
    }

    async fn publish_unchecked<M: Message>(
        &self,
        direction: &str,
        session: String,
        message: M,
    ) -> Result<PublishOutcome> {
        let correlation = Some(self.correlation());
        self.bus
            .publish_as(direction, &session, &message, correlation, A::NAME)
            .await
    }

    /// Replies to the message being handled: to its `reply_to` when it has one (a request), otherwise to
    /// `M`'s channel in direction `response` on the same session. The reply's correlation id is the
    /// request's id.
    pub fn reply<M: Message>(&self, message: M) -> BoxFuture<'_, Result<PublishOutcome>>
    where
        A: Sends<M>,
    {
        Box::pin(self.reply_unchecked(message))
    }

    async fn reply_unchecked<M: Message>(&self, message: M) -> Result<PublishOutcome> {
        let channel = match self.envelope.reply_to() {
            Some(reply_to) => {
                let target = parse_channel(reply_to)?;
                if target.class() != M::CLASS {
                    return Err(Error::UnexpectedReply {
                        expected: target.class().to_string(),
                        got: M::CLASS.to_string(),
                        reply_to: reply_to.to_string(),
                    });
                }
                Channel::for_message::<M>(target.direction(), target.session())?
            }
            None => Channel::for_message::<M>(RESPONSE_DIRECTION, self.session())?,
        };
        let envelope = self
            .bus
            .envelope(channel, &message)?
            .with_correlation_id(self.envelope.id().to_string());
        let outcome = self.bus.publish_envelope(envelope, Some(A::NAME)).await?;
        if self.envelope.reply_to().is_some() {
            self.replied.store(true, Ordering::Relaxed);
        }
        Ok(outcome)
    }

    /// Sends a request to `session` and waits for the correlated reply, up to the runtime's request
    /// timeout (`RuntimeBuilder::request_timeout`), as [`Publisher::request`] does.
    pub fn request<Req: Message, Resp: Message>(
        &self,
        session: &str,
        message: Req,
    ) -> BoxFuture<'_, Result<Resp>>
    where
        A: Sends<Req>,
    {
        self.request_timeout(session, message, self.bus.request_timeout())
    }

    /// Sends a request to `session` and waits up to `timeout` for the correlated reply.
    pub fn request_timeout<Req: Message, Resp: Message>(
        &self,
        session: &str,
        message: Req,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Resp>>
    where
        A: Sends<Req>,
    {
        Box::pin(self.bus.request_owned::<Req, Resp>(
            session.to_string(),
            message,
            timeout,
            Some(A::NAME),
        ))
    }
}

impl<A: Agent> fmt::Debug for Context<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("agent", &A::NAME)
            .field("envelope", &self.envelope)
            .finish()
    }
}

/// Publishes on behalf of agent `A` from outside a handler (a client, a test, a timer), within `A`'s
/// declared `sends`. Get one from [`crate::runtime::Runtime::publisher`].
pub struct Publisher<A: Agent> {
    bus: Bus,
    _agent: PhantomData<fn() -> A>,
}

impl<A: Agent> Clone for Publisher<A> {
    fn clone(&self) -> Self {
        Publisher {
            bus: self.bus.clone(),
            _agent: PhantomData,
        }
    }
}

impl<A: Agent> Publisher<A> {
    pub(crate) fn new(bus: Bus) -> Self {
        Publisher {
            bus,
            _agent: PhantomData,
        }
    }

    /// Publishes `message` to `session` in `M`'s default direction.
    pub fn publish<M: Message>(
        &self,
        session: &str,
        message: M,
    ) -> BoxFuture<'_, Result<PublishOutcome>>
    where
        A: Sends<M>,
    {
        Box::pin(self.publish_unchecked(M::DIRECTION, session.to_string(), message))
    }

    /// Publishes `message` with an explicit direction and session.
    pub fn publish_to<'a, M: Message>(
        &'a self,
        direction: &'a str,
        session: &str,
        message: M,
    ) -> BoxFuture<'a, Result<PublishOutcome>>
    where
        A: Sends<M>,
    {
        Box::pin(self.publish_unchecked(direction, session.to_string(), message))
    }

    async fn publish_unchecked<M: Message>(
        &self,
        direction: &str,
        session: String,
        message: M,
    ) -> Result<PublishOutcome> {
        self.bus
            .publish_as(direction, &session, &message, None, A::NAME)
            .await
    }

    /// Publishes several messages to `session` in one batch (pipelined by the backend). When any message
    /// is invalid, none is published.
    pub fn publish_batch<M: Message>(
        &self,
        session: &str,
        messages: Vec<M>,
    ) -> BoxFuture<'_, Vec<Result<PublishOutcome>>>
    where
        A: Sends<M>,
    {
        Box::pin(self.publish_batch_unchecked(session.to_string(), messages))
    }

    async fn publish_batch_unchecked<M: Message>(
        &self,
        session: String,
        messages: Vec<M>,
    ) -> Vec<Result<PublishOutcome>> {
        let prepared: Vec<Result<Envelope>> = messages
            .iter()
            .map(|message| {
                channel_of::<M>(M::DIRECTION, &session)
                    .and_then(|channel| self.bus.envelope(channel, message))
            })
            .collect();
        if prepared.iter().any(Result::is_err) {
            return prepared
                .into_iter()
                .map(|prepared| match prepared {
                    Ok(_) => Err(Error::NotPublished {
                        reason: "another message of the batch is invalid, so none was published"
                            .into(),
                    }),
                    Err(error) => Err(error),
                })
                .collect();
        }
        let envelopes = prepared
            .into_iter()
            .map(|prepared| prepared.expect("checked above"))
            .collect();
        self.bus.publish_envelopes(envelopes, Some(A::NAME)).await
    }

    /// Sends a request and waits for the reply, up to the runtime's request timeout.
    pub fn request<Req: Message, Resp: Message>(
        &self,
        session: &str,
        message: Req,
    ) -> BoxFuture<'_, Result<Resp>>
    where
        A: Sends<Req>,
    {
        self.request_timeout(session, message, self.bus.request_timeout())
    }

    /// Sends a request and waits up to `timeout` for the reply.
    pub fn request_timeout<Req: Message, Resp: Message>(
        &self,
        session: &str,
        message: Req,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Resp>>
    where
        A: Sends<Req>,
    {
        Box::pin(self.bus.request_owned::<Req, Resp>(
            session.to_string(),
            message,
            timeout,
            Some(A::NAME),
        ))
    }
}

impl<A: Agent> fmt::Debug for Publisher<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("agent", &A::NAME)
            .finish()
    }
}
