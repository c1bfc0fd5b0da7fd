//! # agentcomm-redis
//!
//! The Redis backend of agentcomm, on [fred](https://docs.rs/fred): a [`RedisRouter`] implements
//! [`agentcomm_core::Router`] in one of two delivery modes ([`DeliveryMode`]):
//!
//! - **Streams** (the default): durable, at-least-once. One Redis stream per message class, consumer
//!   groups for groups of agents, `XACK` on success, redelivery of failed and abandoned entries, entries
//!   of dead consumers claimed by the others, a dead-letter channel after too many deliveries, trimming,
//!   and, on request (`idempotent_publish(true)`), publishes stored once across reconnects. Replies
//!   (the `reply` direction) are also published over pub/sub, where reply inboxes listen.
//! - **Pub/sub**: fan-out, at-most-once, the lowest latency. Subscriptions are restored after every
//!   reconnect; every message a subscriber misses is counted (`lost`, `dropped`, `lagged` in health),
//!   never silently gone.
//!
//! ```no_run
//! use agentcomm_core::prelude::*;
//! use agentcomm_core::router::SubscribeOptions;
//! use agentcomm_redis::{DeliveryMode, RedisRouter};
//!
//! # async fn run() -> agentcomm_core::Result<()> {
//! let router = RedisRouter::builder("redis://127.0.0.1:6379")
//!     .mode(DeliveryMode::Streams)
//!     .connect()
//!     .await?;
//! let pattern = ChannelPattern::parse("PaymentRequest:*:*")?;
//! let mut subscription = router
//!     .subscribe(SubscribeOptions::new(pattern).group("payments"))
//!     .await?;
//! let channel = parse_channel("PaymentRequest:request:s1")?;
//! router.publish(Envelope::new(channel, "application/json", &br#"{"amount":10.0}"#[..])).await?;
//! let delivery = subscription.next().await.expect("a delivery");
//! delivery.ack().await?;
//! router.close().await?;
//! # Ok(()) }
//! ```
//!
//! The design (key names, how patterns find streams, Redis Cluster) is in `docs/redis.md`.

#![deny(missing_docs)]

mod builder;
mod connection;
mod counters;
mod handoff;
mod hashing;
mod keys;
mod pubsub;
mod router;
pub mod sequence;
mod streams;
#[cfg(test)]
mod unit_redis;

/// The fred crate this backend is built on, for its types in the builder (`TlsConnector`).
pub use fred;

pub use builder::{
    ACCEPTED_URLS, DELIVERY_MODE_VAR, DeliveryMode, MAX_BROADCAST_CAPACITY, RedisRouterBuilder,
};
pub use router::RedisRouter;
