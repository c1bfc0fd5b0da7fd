//! Several connections to one in-memory bus, so the in-memory router runs the conformance suite like a
//! broker does.
//!
//! A [`MemoryRouter`] is one in-process bus, and closing it closes everything on it. A real broker has
//! many clients: each closes its own connection and the others go on. [`MemoryConnection`] gives the
//! in-memory bus that shape: a [`Router`] over a shared [`MemoryRouter`] whose `close()` stops only the
//! subscriptions made through it and refuses further use of it, leaving the bus and the other
//! connections working. [`MemoryBackend`] hands out such connections to the conformance suite.
//!
//! ```
//! use agentcomm_core::prelude::*;
//! use agentcomm_core::router::SubscribeOptions;
//! use agentcomm_testkit::memory::MemoryConnection;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> agentcomm_core::Result<()> {
//! let bus = MemoryRouter::new();
//! let (first, second) = (MemoryConnection::new(bus.clone()), MemoryConnection::new(bus.clone()));
//! let mut subscription = second.subscribe(SubscribeOptions::new(ChannelPattern::parse("Ping:*:*")?)).await?;
//! first.close().await?;
//! assert!(first.publish(Envelope::new(parse_channel("Ping:event:s1")?, "application/json", &b"{}"[..])).await.is_err());
//! bus.publish(Envelope::new(parse_channel("Ping:event:s1")?, "application/json", &b"{}"[..])).await?;
//! assert!(subscription.next().await.is_some());
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use futures::Stream;

use agentcomm_core::envelope::Envelope;
use agentcomm_core::error::{Error, Result};
use agentcomm_core::memory::{MemoryConfig, MemoryRouter};
use agentcomm_core::router::{
    BoxFuture, Capabilities, Delivery, Health, HealthStatus, PublishOutcome, Router, SharedRouter,
    SubscribeOptions, Subscription, SubscriptionCloser, SubscriptionControl,
};

use crate::conformance::ConformanceBackend;

/// One connection to a shared in-memory bus. See the [module documentation](self).
pub struct MemoryConnection {
    bus: MemoryRouter,
    closed: AtomicBool,
    /// The open subscriptions made through this connection, so that `close()` can stop them. Each
    /// leaves the map when it is closed or dropped, so subscribe/close loops do not grow it.
    subscriptions: Arc<Mutex<HashMap<u64, SubscriptionCloser>>>,
    next_subscription: AtomicU64,
}

impl MemoryConnection {
    /// A new connection to `bus` (a clone of a [`MemoryRouter`] shares its bus).
    pub fn new(bus: MemoryRouter) -> Self {
        MemoryConnection {
            bus,
            closed: AtomicBool::new(false),
            subscriptions: Arc::default(),
            next_subscription: AtomicU64::new(0),
        }
    }

    /// How many subscriptions made through this connection are open (neither closed nor dropped).
    pub fn open_subscriptions(&self) -> usize {
        self.subscriptions.lock().expect("connection lock").len()
    }

    /// The bus this connection is on.
    pub fn bus(&self) -> &MemoryRouter {
        &self.bus
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(closed_error())
        } else {
            Ok(())
        }
    }
}

fn closed_error() -> Error {
    Error::Closed {
        what: "this in-memory connection",
        hint: "it was closed; open another with MemoryConnection::new (the bus itself is still open)",
    }
}

/// A subscription of the bus, seen through its connection: it reports how much it holds, and its
/// closing (or dropping) takes it off the connection's list.
struct ConnectionSubscription {
    inner: Subscription,
}

impl Stream for ConnectionSubscription {
    type Item = Delivery;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        Pin::new(&mut self.get_mut().inner).poll_next(cx)
    }

    /// What the bus subscription holds, so that `Subscription::buffered` stays exact.
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.inner.buffered(), None)
    }
}

struct ConnectionControl {
    id: u64,
    closer: SubscriptionCloser,
    subscriptions: Weak<Mutex<HashMap<u64, SubscriptionCloser>>>,
}

impl SubscriptionControl for ConnectionControl {
    fn close(&self) -> BoxFuture<'static, Result<()>> {
        // Taken off the list now, not when the future runs: `Subscription`'s drop may not await it.
        if let Some(subscriptions) = self.subscriptions.upgrade() {
            subscriptions
                .lock()
                .expect("connection lock")
                .remove(&self.id);
        }
        let closer = self.closer.clone();
        Box::pin(async move { closer.close().await })
    }
}

impl fmt::Debug for MemoryConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryConnection")
            .field("bus", &self.bus)
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .field(
                "subscriptions",
                &self.subscriptions.lock().map(|s| s.len()).unwrap_or(0),
            )
            .finish()
    }
}

impl Router for MemoryConnection {
    fn backend(&self) -> &str {
        self.bus.backend()
    }

    fn capabilities(&self) -> Capabilities {
        self.bus.capabilities()
    }

    fn publish(&self, envelope: Envelope) -> BoxFuture<'_, Result<PublishOutcome>> {
        Box::pin(async move {
            self.check_open()?;
            self.bus.publish(envelope).await
        })
    }

    fn publish_batch(
        &self,
        envelopes: Vec<Envelope>,
    ) -> BoxFuture<'_, Vec<Result<PublishOutcome>>> {
        Box::pin(async move {
            if self.check_open().is_err() {
                return envelopes.iter().map(|_| Err(closed_error())).collect();
            }
            self.bus.publish_batch(envelopes).await
        })
    }

    fn subscribe(&self, options: SubscribeOptions) -> BoxFuture<'_, Result<Subscription>> {
        Box::pin(async move {
            self.check_open()?;
            let subscription = self.bus.subscribe(options.clone()).await?;
            let id = self.next_subscription.fetch_add(1, Ordering::Relaxed);
            {
                let mut subscriptions = self.subscriptions.lock().expect("connection lock");
                // Re-checked under the lock: a close that ran meanwhile must not miss this subscription.
                if !self.closed.load(Ordering::Acquire) {
                    subscriptions.insert(id, subscription.closer());
                    let control = ConnectionControl {
                        id,
                        closer: subscription.closer(),
                        subscriptions: Arc::downgrade(&self.subscriptions),
                    };
                    return Ok(Subscription::from_stream(
                        ConnectionSubscription {
                            inner: subscription,
                        },
                        Arc::new(control),
                        &options,
                    ));
                }
            }
            subscription.close().await?;
            Err(closed_error())
        })
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        Box::pin(async move {
            let health = self.bus.health().await;
            if self.closed.load(Ordering::Acquire) {
                let mut health = health
                    .connected(false)
                    .detail("this connection is closed (the bus is still open)");
                health.status = HealthStatus::Unhealthy;
                health
            } else {
                health
            }
        })
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let closers = {
                let mut subscriptions = self.subscriptions.lock().expect("connection lock");
                self.closed.store(true, Ordering::Release);
                std::mem::take(&mut *subscriptions)
            };
            // Every subscription is stopped even when one fails to; the first failure is reported.
            let mut first_error = None;
            for (_, closer) in closers {
                if let Err(error) = closer.close().await {
                    first_error.get_or_insert(error);
                }
            }
            first_error.map_or(Ok(()), Err)
        })
    }
}

/// The in-memory router as a conformance backend: every [`connect`](ConformanceBackend::connect) is a
/// new [`MemoryConnection`] to the same bus.
///
/// ```no_run
/// // tests/conformance_memory.rs
/// use agentcomm_testkit::memory::MemoryBackend;
///
/// agentcomm_testkit::conformance_tests!(MemoryBackend::new());
/// ```
#[derive(Debug, Clone)]
pub struct MemoryBackend {
    bus: MemoryRouter,
    connections: Arc<Mutex<Vec<Weak<MemoryConnection>>>>,
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBackend {
    /// A backend on a new bus with the default settings.
    pub fn new() -> Self {
        Self::on(MemoryRouter::new())
    }

    /// A backend on a new bus with these settings.
    pub fn with_config(config: MemoryConfig) -> Self {
        Self::on(MemoryRouter::with_config(config))
    }

    /// A backend on an existing bus.
    pub fn on(bus: MemoryRouter) -> Self {
        MemoryBackend {
            bus,
            connections: Arc::default(),
        }
    }

    /// The bus.
    pub fn bus(&self) -> &MemoryRouter {
        &self.bus
    }

    /// How many connections handed out are still in use and open.
    pub fn open_connections(&self) -> usize {
        let mut connections = self.connections.lock().expect("backend lock");
        connections.retain(|connection| connection.strong_count() > 0);
        connections
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|connection| !connection.closed.load(Ordering::Acquire))
            .count()
    }
}

impl ConformanceBackend for MemoryBackend {
    fn name(&self) -> &str {
        "memory"
    }

    fn declared_capabilities(&self) -> Capabilities {
        Capabilities::none()
            .ordered_per_channel(true)
            .consumer_groups(true)
            .redelivery(true)
            .publish_confirms(true)
            .reports_unroutable(true)
            .no_duplicates(true)
    }

    fn connect(&self) -> BoxFuture<'_, Option<SharedRouter>> {
        let connection = Arc::new(MemoryConnection::new(self.bus.clone()));
        self.connections
            .lock()
            .expect("backend lock")
            .push(Arc::downgrade(&connection));
        Box::pin(async move { Some(connection as SharedRouter) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentcomm_core::channel::{ChannelPattern, parse_channel};
    use std::time::Duration;

    fn ping(session: &str) -> Envelope {
        Envelope::new(
            parse_channel(&format!("Ping:event:{session}")).unwrap(),
            "application/json",
            &b"{}"[..],
        )
    }

    #[tokio::test]
    async fn closing_a_connection_ends_only_its_own_subscriptions() {
        let backend = MemoryBackend::new();
        let first = backend.connect().await.unwrap();
        let second = backend.connect().await.unwrap();
        let pattern = ChannelPattern::parse("Ping:*:*").unwrap();
        let mut closed_one = first
            .subscribe(SubscribeOptions::new(pattern.clone()))
            .await
            .unwrap();
        let mut open_one = second
            .subscribe(SubscribeOptions::new(pattern))
            .await
            .unwrap();
        assert_eq!(backend.open_connections(), 2);

        first.close().await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(1), closed_one.next())
            .await
            .expect("the closed connection's subscription ends");
        assert!(ended.is_none());
        let error = first.publish(ping("s1")).await.unwrap_err();
        assert!(
            error.to_string().contains("in-memory connection is closed"),
            "{error}"
        );
        assert!(!first.health().await.connected);
        assert_eq!(backend.open_connections(), 1);

        let outcome = second.publish(ping("s1")).await.unwrap();
        assert_eq!(outcome, PublishOutcome::Delivered(1));
        let delivery = tokio::time::timeout(Duration::from_secs(1), open_one.next())
            .await
            .unwrap()
            .expect("the other connection still receives");
        assert_eq!(delivery.envelope().session(), "s1");
        assert!(second.health().await.connected);
    }

    #[tokio::test]
    async fn closed_and_dropped_subscriptions_leave_the_connection() {
        let connection = MemoryConnection::new(MemoryRouter::new());
        let pattern = ChannelPattern::parse("Ping:*:*").unwrap();
        for round in 0..50 {
            let subscription = connection
                .subscribe(SubscribeOptions::new(pattern.clone()))
                .await
                .unwrap();
            if round % 2 == 0 {
                subscription.close().await.unwrap();
            }
            drop(subscription);
        }
        assert_eq!(connection.open_subscriptions(), 0);
        let _kept = connection
            .subscribe(SubscribeOptions::new(pattern))
            .await
            .unwrap();
        assert_eq!(connection.open_subscriptions(), 1);
        assert_eq!(connection.bus().health().await.get("subscriptions"), 1);
    }

    #[tokio::test]
    async fn a_subscription_through_a_connection_reports_what_it_buffers() {
        let connection = MemoryConnection::new(MemoryRouter::new());
        let mut subscription = connection
            .subscribe(SubscribeOptions::new(
                ChannelPattern::parse("Ping:*:*").unwrap(),
            ))
            .await
            .unwrap();
        for _ in 0..3 {
            connection.publish(ping("s1")).await.unwrap();
        }
        assert_eq!(subscription.buffered(), 3);
        subscription.next().await.unwrap().ack().await.unwrap();
        assert_eq!(subscription.buffered(), 2);
        assert_eq!(subscription.description(), "fan-out on Ping:*:*");
    }

    #[tokio::test]
    async fn a_batch_after_close_is_refused_as_closed() {
        let connection = MemoryConnection::new(MemoryRouter::new());
        connection.close().await.unwrap();
        let results = connection.publish_batch(vec![ping("s1"), ping("s2")]).await;
        assert_eq!(results.len(), 2);
        for result in results {
            assert!(matches!(result, Err(Error::Closed { .. })), "{result:?}");
        }
    }

    /// Regression: the in-memory router ended a closed fan-out subscription's stream at once, dropping
    /// what it had buffered, although the router contract (and its own docs) say buffered deliveries
    /// stay readable. Fixed in `agentcomm-core/src/memory.rs`.
    #[tokio::test]
    async fn a_closed_fan_out_subscription_still_yields_what_it_buffered() {
        let router = MemoryRouter::new();
        let mut subscription = router
            .subscribe(SubscribeOptions::new(
                ChannelPattern::parse("Ping:*:*").unwrap(),
            ))
            .await
            .unwrap();
        for _ in 0..3 {
            router.publish(ping("s1")).await.unwrap();
        }
        assert_eq!(subscription.buffered(), 3);
        subscription.close().await.unwrap();
        let mut read = 0;
        while let Some(delivery) = tokio::time::timeout(Duration::from_secs(1), subscription.next())
            .await
            .expect("the stream ends")
        {
            delivery.ack().await.unwrap();
            read += 1;
        }
        assert_eq!(read, 3);
        assert_eq!(router.health().await.get("dropped"), 0);
    }
}
