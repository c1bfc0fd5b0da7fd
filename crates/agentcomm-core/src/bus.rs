//! The publishing side shared by contexts, publishers, tests and tools: envelopes, logging of publishes,
//! and request/reply.
//!
//! [`Bus`] has no agent contract: it publishes any message. Agents publish through [`crate::Context`]
//! and clients through [`crate::Publisher`], which add the compile-time check of what an agent sends.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::channel::{Channel, ChannelPattern, INBOX_PREFIX, REPLY_DIRECTION};
use crate::codec::Codec;
use crate::envelope::{Envelope, headers};
use crate::error::{Error, RequestFailure, Result};
use crate::message::Message;
use crate::router::{PublishOutcome, SharedRouter, SubscribeOptions};

/// The default time a request waits for its reply.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Publishes messages on a router, and waits for replies.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<BusInner>,
}

struct BusInner {
    router: SharedRouter,
    codec: Codec,
    request_timeout: Duration,
    inbox: Inbox,
}

impl Bus {
    /// A bus on `router`, encoding with `codec`.
    pub fn new(router: SharedRouter, codec: Codec, request_timeout: Duration) -> Self {
        Bus {
            inner: Arc::new(BusInner {
                router,
                codec,
                request_timeout,
                inbox: Inbox::new(),
            }),
        }
    }

    /// The router: publishes raw envelopes, without any agent's contract.
    pub fn router(&self) -> &SharedRouter {
        &self.inner.router
    }

    /// The codec messages are encoded with.
    pub fn codec(&self) -> Codec {
        self.inner.codec
    }

    /// How long a request waits for its reply unless told otherwise.
    pub fn request_timeout(&self) -> Duration {
        self.inner.request_timeout
    }

    /// Validates and encodes `message` into a new envelope on `channel`.
    pub fn envelope<M: Message>(&self, channel: Channel, message: &M) -> Result<Envelope> {
        message.validate().map_err(|source| Error::Validation {
            class: M::CLASS.to_string(),
            source,
        })?;
        let payload = self.inner.codec.encode(M::CLASS, message)?;
        Ok(Envelope::with_class(
            M::CLASS,
            channel,
            self.inner.codec.content_type(),
            payload,
        ))
    }

    /// Publishes `message` to `session` in its default direction.
    pub async fn publish<M: Message>(&self, session: &str, message: &M) -> Result<PublishOutcome> {
        let channel = channel_of::<M>(M::DIRECTION, session)?;
        self.publish_envelope(self.envelope(channel, message)?, None)
            .await
    }

    /// Publishes `message` on `direction` and `session`.
    pub async fn publish_to<M: Message>(
        &self,
        direction: &str,
        session: &str,
        message: &M,
    ) -> Result<PublishOutcome> {
        let channel = channel_of::<M>(direction, session)?;
        self.publish_envelope(self.envelope(channel, message)?, None)
            .await
    }

    /// Publishes `message` on behalf of `agent` (the contract was checked by the caller's bounds).
    pub(crate) async fn publish_as<M: Message>(
        &self,
        direction: &str,
        session: &str,
        message: &M,
        correlation_id: Option<String>,
        agent: &str,
    ) -> Result<PublishOutcome> {
        let channel = channel_of::<M>(direction, session)?;
        let mut envelope = self.envelope(channel, message)?;
        if let Some(correlation_id) = correlation_id {
            envelope = envelope.with_correlation_id(correlation_id);
        }
        self.publish_envelope(envelope, Some(agent)).await
    }

    /// Publishes a ready envelope, logging it for `agent`.
    pub async fn publish_envelope(
        &self,
        envelope: Envelope,
        agent: Option<&str>,
    ) -> Result<PublishOutcome> {
        let key = LogKey::of(&envelope);
        let result = self.inner.router.publish(envelope).await;
        key.log(&result, agent);
        result
    }

    /// Publishes ready envelopes in one batch.
    pub async fn publish_envelopes(
        &self,
        envelopes: Vec<Envelope>,
        agent: Option<&str>,
    ) -> Vec<Result<PublishOutcome>> {
        let keys: Vec<LogKey> = envelopes.iter().map(LogKey::of).collect();
        let results = self.inner.router.publish_batch(envelopes).await;
        for (result, key) in results.iter().zip(keys) {
            key.log(result, agent);
        }
        results
    }

    /// Sends `message` as a request to `session` and waits up to `timeout` for the reply of type `Resp`.
    pub async fn request<Req: Message, Resp: Message>(
        &self,
        session: &str,
        message: &Req,
        timeout: Duration,
    ) -> Result<Resp> {
        self.request_as::<Req, Resp>(session, message, timeout, None)
            .await
    }

    pub(crate) async fn request_owned<Req: Message, Resp: Message>(
        &self,
        session: String,
        message: Req,
        timeout: Duration,
        agent: Option<&'static str>,
    ) -> Result<Resp> {
        self.request_as::<Req, Resp>(&session, &message, timeout, agent)
            .await
    }

    pub(crate) async fn request_as<Req: Message, Resp: Message>(
        &self,
        session: &str,
        message: &Req,
        timeout: Duration,
        agent: Option<&str>,
    ) -> Result<Resp> {
        if timeout.is_zero() {
            // Checked before anything is published: with no time to wait, the request would reach
            // its agent, be handled, and its reply be dropped as unmatched, while the caller is told
            // it timed out.
            return Err(Error::Config {
                variable: "request timeout".into(),
                value: format!("{timeout:?}"),
                expected: "a duration above zero, long enough for the reply to come back (the runtime's \
                           default is 30 s: RuntimeBuilder::request_timeout sets it, request_timeout(..) \
                           overrides it for one request)"
                    .into(),
            });
        }
        let inbox = &self.inner.inbox;
        let reply_channel = Channel::for_message::<Resp>(REPLY_DIRECTION, &inbox.id)?;
        let channel = Channel::for_message::<Req>(Req::DIRECTION, session)?;
        let envelope = self
            .envelope(channel, message)?
            .with_reply_to(reply_channel.canonical());
        let request_envelope_id = envelope.id();
        let request_id = request_envelope_id.to_string();
        let channel_name = envelope.channel().name().to_string();
        // The timeout bounds everything: subscribing the inbox, publishing and waiting for the reply.
        let asking = async {
            // Registered before publishing, so a quick reply finds its waiter; forgotten on every way
            // out, including this future being dropped. Registered only with a live listener, which
            // drops it if its subscription ends: a waiter is never left waiting for replies nobody
            // reads.
            // Most requests find their inbox live, and register at once: no more than a look under
            // the listeners' lock.
            let mut attempts = 0;
            let (waiter, _registration) = loop {
                if let Some(registered) = inbox.expect(&request_id, Resp::CLASS) {
                    break registered;
                }
                // No live subscription: none made yet, one being made, or it ended after `listen`
                // (and one replacing it may be being made). Nothing was published yet, so waiting for
                // the one made again is as good. Bounded, for a router that loses every subscription
                // as soon as it makes it.
                if attempts == INBOX_ATTEMPTS {
                    return Err(inbox_closed());
                }
                attempts += 1;
                inbox.listen::<Resp>(&self.inner.router).await?;
            };
            let outcome = self.publish_envelope(envelope, agent).await?;
            if outcome.is_unroutable() {
                return Err(Error::NoAgentFound {
                    class: Req::CLASS.to_string(),
                    channel: channel_name.clone(),
                });
            }
            waiter.await.map_err(|_| inbox_closed())
        };
        let reply = match tokio::time::timeout(timeout, asking).await {
            Ok(reply) => reply?,
            Err(_) => {
                return Err(Error::Timeout {
                    operation: format!(
                        "the {} reply to {} {request_id} on '{channel_name}' (is an agent that receives {} running and replying? Its handler may also have failed: a dead letter with agentcomm-original-id {request_id} on 'DeadLetter:{}:*' says why. Or the reply was lost on its way: a backend that delivers replies at most once, such as Redis, drops one that comes while this requester's connection is reconnecting, and its replier logs 'no subscriber matched'; send the request again)",
                        Resp::CLASS,
                        Req::CLASS,
                        Req::CLASS,
                        Req::CLASS
                    ),
                    after: timeout,
                });
            }
        };
        if let Some(reason) = reply.header(headers::REQUEST_FAILED) {
            return Err(Error::RequestFailed(Box::new(RequestFailure {
                class: Req::CLASS,
                request_id: request_envelope_id,
                agent: reply
                    .header(headers::AGENT)
                    .unwrap_or("unknown")
                    .to_string(),
                reason: reason.to_string(),
                attempts: reply
                    .header(headers::ATTEMPTS)
                    .and_then(|attempts| attempts.parse().ok())
                    .unwrap_or(0),
                error: reply.header(headers::ERROR).unwrap_or("").to_string(),
            })));
        }
        if reply.class() != Resp::CLASS {
            // A frame of another class with this request's correlation id (a replier that did not go
            // through `Context::reply`, another language's client): not decoded as what it is not.
            return Err(Error::UnexpectedReply {
                expected: Resp::CLASS.to_string(),
                got: reply.class().to_string(),
                reply_to: reply.channel().name().to_string(),
            });
        }
        crate::runtime::decode_message::<Resp>(&reply).map_err(|rejection| rejection.error)
    }

    /// Requests waiting for their reply now.
    pub fn pending_requests(&self) -> usize {
        self.inner.inbox.pending.lock().expect("inbox lock").len()
    }

    /// Replies that arrived for no waiting request (late, after a timeout, or unknown).
    pub fn unmatched_replies(&self) -> u64 {
        self.inner.inbox.unmatched.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bus")
            .field("backend", &self.inner.router.backend())
            .field("codec", &self.inner.codec)
            .field("inbox", &self.inner.inbox.id)
            .finish()
    }
}

/// What a publish is logged with; cheap to take (a copy and two reference counts), formatted only when
/// the log line is written.
struct LogKey {
    id: crate::envelope::MessageId,
    channel: Channel,
    /// Only when it differs from the channel's class (dead letters): rare, so a copy is fine.
    class: Option<String>,
}

impl LogKey {
    fn of(envelope: &Envelope) -> Self {
        let channel = envelope.channel().clone();
        let class = (envelope.class() != channel.class()).then(|| envelope.class().to_string());
        LogKey {
            id: envelope.id(),
            channel,
            class,
        }
    }

    fn log(&self, result: &Result<PublishOutcome>, agent: Option<&str>) {
        let agent = agent.unwrap_or("-");
        let class = self
            .class
            .as_deref()
            .unwrap_or_else(|| self.channel.class());
        let (id, session) = (&self.id, self.channel.session());
        match result {
            Ok(PublishOutcome::Unroutable) => tracing::warn!(
                message_id = %id,
                class,
                session,
                agent,
                channel = self.channel.name(),
                "published, but no subscriber matched and the broker did not keep it"
            ),
            Ok(_) => tracing::debug!(message_id = %id, class, session, agent, "published"),
            Err(error) => tracing::error!(
                message_id = %id,
                class,
                session,
                agent,
                error = %error,
                "publish failed"
            ),
        }
    }
}

thread_local! {
    /// The channel last published to on this thread: a publisher usually sends many messages to one
    /// channel, and building a channel checks and allocates.
    static RECENT_CHANNEL: std::cell::RefCell<Option<(usize, Channel)>> = const { std::cell::RefCell::new(None) };
}

/// `Channel::for_message::<M>(direction, session)`, reusing the last one built on this thread when it is
/// the same.
pub(crate) fn channel_of<M: Message>(direction: &str, session: &str) -> Result<Channel> {
    let template = M::TEMPLATE.source().as_ptr() as usize;
    let reused = RECENT_CHANNEL.with(|recent| {
        recent
            .borrow()
            .as_ref()
            .and_then(|(recent_template, channel)| {
                (*recent_template == template
                    && channel.class() == M::CLASS
                    && channel.direction() == direction
                    && channel.session() == session)
                    .then(|| channel.clone())
            })
    });
    if let Some(channel) = reused {
        return Ok(channel);
    }
    if direction == REPLY_DIRECTION {
        return Err(Error::InvalidChannelComponent {
            component: "direction",
            value: direction.to_string(),
            reason: format!(
                "'{REPLY_DIRECTION}' is reserved for replies routed to a requester's inbox, which agents do not receive; answer a request with `Context::reply`, or publish with another direction"
            ),
            forbidden: String::new(),
        });
    }
    let channel = Channel::for_message::<M>(direction, session)?;
    RECENT_CHANNEL.with(|recent| *recent.borrow_mut() = Some((template, channel.clone())));
    Ok(channel)
}

/// A request's reply inbox stopped listening while the request was under way: its subscription
/// ended, or the task reading it was dropped with the Tokio runtime it ran on (the runtime of the
/// request that first needed it, which need not be this request's).
fn inbox_closed() -> Error {
    Error::Closed {
        what: "the reply inbox",
        hint: "its subscription ended while the request was waiting: the router closed or lost it, or the Tokio runtime that read it ended (a client used from several runtimes, such as #[tokio::test]s sharing one, has its replies read on the runtime of its first request of that reply type: make that one on a runtime that outlives the others); send the request again",
    }
}

/// How many times a request makes (or waits for) its inbox's subscription when each one ends before
/// the request could register: after that it fails with [`Error::Closed`].
const INBOX_ATTEMPTS: u32 = 3;

/// Where this bus's requests get their replies: one fan-out subscription per reply class, on
/// `<ReplyClass>:reply:<inbox id>`.
struct Inbox {
    id: String,
    pending: Arc<Mutex<HashMap<String, Waiting>>>,
    listeners: Arc<Listeners>,
    /// Numbers the listeners, so that an ended one forgets only itself and its own waiters.
    generations: AtomicU64,
    unmatched: Arc<AtomicU64>,
    /// Held by the inbox only: when the bus goes (its last clone dropped), the listening tasks see it
    /// closed and drop their subscriptions, instead of keeping them on the router for as long as it
    /// lives (a router shared with other runtimes outlives this one).
    gone: tokio::sync::watch::Sender<()>,
}

/// A reply class's subscription. It is made by a task of its own, not by the request that needed it
/// first: a request dropped (cancelled, or cut short by its caller's timeout) while a broker router is
/// half-way through subscribing would otherwise drop the router's future there, and leave what it had
/// made so far (a Redis reader connection or SUBSCRIBE, a queue and its consumer) to nobody.
struct Listener {
    generation: u64,
    state: tokio::sync::watch::Sender<Setup>,
}

/// Where a listener's subscription is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Setup {
    /// Being made.
    Making,
    /// Made, and read by the listener's task.
    Live,
    /// Could not be made: the listener is forgotten, and the next request makes another.
    Failed,
}

/// A request waiting for its reply.
struct Waiting {
    class: &'static str,
    /// The listener it was registered with, which drops it when its subscription ends.
    generation: u64,
    reply: oneshot::Sender<Envelope>,
}

/// Forgets a request when dropped (answered, failed, timed out or cancelled).
struct Registration<'a> {
    inbox: &'a Inbox,
    request_id: String,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.inbox
            .pending
            .lock()
            .expect("inbox lock")
            .remove(&self.request_id);
    }
}

/// The listeners of an inbox, by reply class.
type Listeners = Mutex<HashMap<&'static str, Arc<Listener>>>;

/// Forgets `listener` as the listener of `class`, unless another has replaced it already.
fn forget_listener(listeners: &Listeners, class: &'static str, listener: &Arc<Listener>) {
    let mut listeners = listeners
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if listeners
        .get(class)
        .is_some_and(|current| Arc::ptr_eq(current, listener))
    {
        listeners.remove(class);
    }
}

/// A listener's task, from before it first runs to its end. Dropped in whatever way the task ends
/// (its subscription ended, the bus went, the subscribe failed or panicked, or the task was dropped
/// with its Tokio runtime, even before it first ran), it forgets the listener, marks it failed if its
/// subscription was not made, and drops the requests registered with it: the next request of its class
/// makes another instead of waiting, until its timeout, for a task that is gone.
struct ListenerTask {
    listeners: Arc<Listeners>,
    pending: Arc<Mutex<HashMap<String, Waiting>>>,
    listener: Arc<Listener>,
    class: &'static str,
}

impl Drop for ListenerTask {
    fn drop(&mut self) {
        // Forgotten first: a request registers only with the listener it finds (under the same lock),
        // so it either registered before (and is dropped here) or finds this one gone. Only this
        // listener's requests: one made again meanwhile, and those registered with it, are not this
        // one's to end. (A lock poisoned elsewhere is not reason to panic in a drop.)
        forget_listener(&self.listeners, self.class, &self.listener);
        self.listener.state.send_if_modified(|setup| {
            let unfinished = *setup == Setup::Making;
            if unfinished {
                *setup = Setup::Failed;
            }
            unfinished
        });
        let generation = self.listener.generation;
        let class = self.class;
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|_, waiting| waiting.class != class || waiting.generation != generation);
    }
}

impl Inbox {
    fn new() -> Self {
        Inbox {
            id: format!("{INBOX_PREFIX}{}", uuid::Uuid::now_v7().simple()),
            pending: Arc::default(),
            listeners: Arc::default(),
            generations: AtomicU64::new(0),
            unmatched: Arc::default(),
            gone: tokio::sync::watch::Sender::new(()),
        }
    }

    /// Makes sure replies of class `Resp` reach this inbox. The first request of a class has the
    /// subscription made; the others wait for it (only requests of that class wait). Returns once a
    /// subscription was live; it may have ended since (see [`Inbox::expect`]).
    async fn listen<Resp: Message>(&self, router: &SharedRouter) -> Result<()> {
        loop {
            let (listener, new) = {
                let mut listeners = self.listeners.lock().expect("inbox lock");
                match listeners.get(Resp::CLASS) {
                    Some(listener) => (listener.clone(), false),
                    None => {
                        let listener = Arc::new(Listener {
                            generation: self.generations.fetch_add(1, Ordering::Relaxed),
                            state: tokio::sync::watch::Sender::new(Setup::Making),
                        });
                        listeners.insert(Resp::CLASS, listener.clone());
                        (listener, true)
                    }
                }
            };
            if new {
                // Spawned with the lock released: a task that cannot be spawned (no Tokio runtime)
                // is dropped at once, and forgets its listener under that lock.
                let made = self.spawn_listener::<Resp>(router, listener);
                // The subscription's own error, for the request that asked for it.
                return made.await.unwrap_or_else(|_| Err(inbox_closed()));
            }
            let mut state = listener.state.subscribe();
            // The listener holds the sender, and this holds the listener: it cannot be dropped.
            let setup = *state
                .wait_for(|setup| *setup != Setup::Making)
                .await
                .map_err(|_| inbox_closed())?;
            if setup == Setup::Live {
                return Ok(());
            }
            // Failed for the request that made it (which was told why): make another.
        }
    }

    /// Starts the task that subscribes `listener` for replies of class `Resp`, then reads them until
    /// the subscription ends or the bus goes. The receiver gets how subscribing went.
    fn spawn_listener<Resp: Message>(
        &self,
        router: &SharedRouter,
        listener: Arc<Listener>,
    ) -> oneshot::Receiver<Result<()>> {
        let (made, made_receiver) = oneshot::channel();
        let pattern = ChannelPattern::for_message::<Resp>(Some(REPLY_DIRECTION), Some(&self.id));
        let router = router.clone();
        let pending = self.pending.clone();
        let unmatched = self.unmatched.clone();
        let mut bus_gone = self.gone.subscribe();
        // Made here, not in the task: a task dropped before it first runs (its runtime ended) drops
        // it too.
        let task = ListenerTask {
            listeners: self.listeners.clone(),
            pending: self.pending.clone(),
            listener,
            class: Resp::CLASS,
        };
        tokio::spawn(async move {
            let listener = task.listener.clone();
            let subscribed = match pattern {
                Ok(pattern) => router.subscribe(SubscribeOptions::new(pattern)).await,
                Err(error) => Err(error),
            };
            // Not kept for as long as the subscription lives.
            drop(router);
            let mut subscription = match subscribed {
                Ok(subscription) => subscription,
                Err(error) => {
                    drop(task);
                    if let Err(Err(error)) = made.send(Err(error)) {
                        tracing::warn!(
                            class = Resp::CLASS,
                            error = %error,
                            "could not subscribe a reply inbox (the request that asked for it had already given up); the next request tries again"
                        );
                    }
                    return;
                }
            };
            listener.state.send_replace(Setup::Live);
            // The request that asked for it may be gone: the subscription serves the next ones.
            let _ = made.send(Ok(()));
            loop {
                let delivery = tokio::select! {
                    delivery = subscription.next() => delivery,
                    // Nothing is ever sent: this resolves (with an error) once the bus is dropped.
                    _ = bus_gone.changed() => None,
                };
                let Some(delivery) = delivery else { break };
                let envelope = delivery.envelope().clone();
                let waiting = envelope
                    .correlation_id()
                    .and_then(|id| pending.lock().expect("inbox lock").remove(id));
                // A reply whose requester timed out between the lookup and the send is unmatched too.
                let unwanted = match waiting {
                    Some(waiting) => waiting.reply.send(envelope).err(),
                    None => Some(envelope),
                };
                if let Some(envelope) = unwanted {
                    unmatched.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        message_id = %envelope.id(),
                        class = envelope.class(),
                        correlation_id = envelope.correlation_id().unwrap_or("-"),
                        "a reply arrived for no waiting request (it came after its request timed out, or was never asked for); dropped"
                    );
                }
                if let Err(error) = delivery.ack().await {
                    tracing::warn!(error = %error, "could not acknowledge a reply");
                }
            }
            // The subscription ended: the next request of this class subscribes again, and the ones
            // waiting on this subscription are told at once instead of waiting out their timeout.
            drop(task);
        });
        made_receiver
    }

    /// Registers a request waiting for a reply of `class` with the class's listener, if its
    /// subscription is live now; `None` when it is not (ended since [`Inbox::listen`], or one replacing
    /// it is still being made).
    fn expect(
        &self,
        request_id: &str,
        class: &'static str,
    ) -> Option<(oneshot::Receiver<Envelope>, Registration<'_>)> {
        // Under the listeners' lock: its listener cannot end between this look and the registration.
        let listeners = self.listeners.lock().expect("inbox lock");
        let listener = listeners.get(class)?;
        if *listener.state.borrow() != Setup::Live {
            return None;
        }
        let (reply, receiver) = oneshot::channel();
        let request_id = request_id.to_string();
        self.pending.lock().expect("inbox lock").insert(
            request_id.clone(),
            Waiting {
                class,
                generation: listener.generation,
                reply,
            },
        );
        Some((
            receiver,
            Registration {
                inbox: self,
                request_id,
            },
        ))
    }
}
